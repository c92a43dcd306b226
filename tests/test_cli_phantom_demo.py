"""`petriage phantom` and `petriage demo`, run as a user would (through main)."""

from __future__ import annotations

import csv
import re

from node.cli import main


def test_phantom_command_writes_an_rsna_dataset_and_says_where(tmp_path, capsys):
    code = main(["phantom", "--out", str(tmp_path), "--studies", "2", "--seed", "4", "--matrix", "64",
                 "--slices", "20", "--slice-spacing", "15", "--transfer-syntax", "rle", "--order", "reversed"])
    assert code == 0
    out = capsys.readouterr().out
    assert "wrote 2 studies" in out
    assert "phantom 1/2 studies" in out and "phantom 2/2 studies" in out  # progress reaches a log file too
    with (tmp_path / "train.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 40


def test_phantom_command_refuses_bad_options_with_exit_code_2_and_no_traceback(tmp_path, capsys):
    assert main(["phantom", "--out", str(tmp_path), "--transfer-syntax", "jpeg-xl"]) == 2
    err = capsys.readouterr().err
    assert "transfer syntax 'jpeg-xl'" in err and "Traceback" not in err
    assert main(["phantom", "--out", str(tmp_path), "--positive-fraction", "1.5"]) == 2
    assert main(["phantom", "--out", str(tmp_path), "--companions", "mri"]) == 2
    assert not (tmp_path / "train.csv").exists()


def test_demo_makes_validates_and_shows_a_positive_and_a_negative_study(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path), "--matrix", "96", "--slices", "30"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "PE-positive" in printed and "PE-negative" in printed
    assert "petriage-pe-demo" in printed and "synthetic training data" in printed  # the bundled model ran
    assert printed.count("done: PE") == 2 and "not for diagnostic use" in printed  # both analysed and sent
    assert len(list((tmp_path / "png").glob("result-*.png"))) == 2 * 4  # key images + summary, from the PACS
    assert " ".join(printed.split()).count("KOS 1, SC 4, SEG 1, SR 1") == 2  # every object, read back from the PACS
    from node.commands.demo_pacs import ORTHANC

    assert ("Orthanc" in printed) == (ORTHANC is not None)  # Orthanc is the PACS wherever it is installed
    pngs = sorted(p.name for p in (tmp_path / "png").glob("*.png"))
    assert "positive-overlay.png" in pngs and "negative-axial.png" in pngs
    # per study: CTPA, scout, lung (10 mm slabs here), non-contrast (5 mm)
    assert len(list((tmp_path / "dicom").rglob("*.dcm"))) == 2 * (30 + 1 + 30 + 60)
    # the demo's store stays, with a console user whose fresh password the demo printed
    from node.store import Store, database_url
    from node.web import users

    match = re.search(r"as user demo, password (\S+) \(new at every demo\)", printed)
    assert match, printed[-600:]
    assert users.verify(Store(database_url(tmp_path / "node", None)), "demo", match.group(1)) is not None
