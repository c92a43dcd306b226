"""Damaged instances are left out of their series, each with an event that names it and why; the
study is analysed on what remains when the missing-slice rule allows it, else skipped with the
reason. Bad data never becomes "internal error".

The damage is done to real phantom files the way transit and vendors damage them: a decimal string
with trailing bytes, a header attribute gone, a file cut short, pixel data of the wrong length.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import warnings
from pathlib import Path

import pydicom
import pytest

from conftest import SMALL
from node.assembly import Assembler
from node.config import StudySettings
from node.frames import frame_count, is_multi_frame_ct
from node.inference import Engine
from node.phantom import generate_study, write_study
from node.screening import header_problem
from node.series import index_series, screen_pixels
from node.store import JobState, Received, Store
from node.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2026, 12, 4, 12, 0, 0, tzinfo=dt.UTC)


def _poke(path: Path, keyword: str, value: bytes) -> None:
    """Overwrite an element's value bytes in the file, keeping its length (as a flipped byte would)."""
    raw = bytearray(path.read_bytes())
    tag = pydicom.datadict.tag_for_keyword(keyword)
    needle = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    at = raw.index(needle, 132 + 12 + int.from_bytes(raw[140:144], "little"))
    length = int.from_bytes(raw[at + 6:at + 8], "little")  # explicit VR, short form
    raw[at + 8:at + 8 + length] = value.ljust(length)[:length]
    path.write_bytes(bytes(raw))


def damage(path: Path, kind: str) -> None:
    if kind == "decimal-with-garbage":  # '-1024\xff\xff\xff', as in the fuzzing report
        _poke(path, "RescaleIntercept", b"-10\xff\xff\xff")
    elif kind == "rows-missing":
        ds = pydicom.dcmread(path)
        del ds.Rows
        ds.save_as(path)
    elif kind == "cut-short":
        path.write_bytes(path.read_bytes()[:-3000])
    elif kind == "pixel-data-length":
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        ds.save_as(path)
    elif kind == "odd-length-rows":  # Rows (US) three bytes long: pydicom's BytesLengthException on reading
        raw = bytearray(path.read_bytes())
        at = raw.index(b"\x28\x00\x10\x00US", 132 + 12 + int.from_bytes(raw[140:144], "little"))
        raw[at + 6:at + 8] = (3).to_bytes(2, "little")
        raw[at + 10:at + 10] = b"\x00"
        path.write_bytes(bytes(raw))
    elif kind == "unknown-vr-sop-class":  # as the fuzz harness made it: 'U@' for UI
        raw = bytearray(path.read_bytes())
        at = raw.index(b"\x08\x00\x16\x00UI", 132 + 12 + int.from_bytes(raw[140:144], "little"))
        raw[at + 4:at + 6] = b"U@"
        path.write_bytes(bytes(raw))
    elif kind == "orientation-garbage":
        _poke(path, "ImageOrientationPatient", b"1\\0\\0\\0\\1\\x")
    else:
        raise AssertionError(kind)


KINDS = ["decimal-with-garbage", "rows-missing", "cut-short", "pixel-data-length", "orientation-garbage",
         "odd-length-rows", "unknown-vr-sop-class"]


def _spool(store: Store, paths: list[Path]) -> str:
    uid = ""
    for p in paths:
        raw = p.read_bytes()
        sop = str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        uid = str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)
        store.record_instance(Received(sop, uid, "1.9", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", p,
                                       len(raw), "MODALITY"), T0)
    return uid


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(ROOT / "models" / "demo", device="cpu")


def _run(store: Store, engine: Engine) -> dict:
    clock = lambda: T0 + dt.timedelta(minutes=5)  # noqa: E731
    Assembler(store, StudySettings(quiet_seconds=20, max_wait_seconds=300), clock).sweep()
    done = Worker(store, engine, owner="test", clock=clock).run_once()
    assert done is not None
    return done


def _headers(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_end_slice_is_left_out_with_an_event_and_the_study_is_still_analysed(tmp_path, engine, kind):
    paths = write_study(generate_study(401, pe=False, options=SMALL), tmp_path / "s")["ctpa"]
    headers = _headers(paths)
    end = max(range(len(paths)), key=lambda i: float(headers[i].ImagePositionPatient[2]))  # the head end
    sop = str(headers[end].SOPInstanceUID)
    damage(paths[end], kind)
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    uid = _spool(store, paths)
    done = _run(store, engine)
    assert done["state"] == JobState.DONE, done["reason"]
    assert done["reason"].endswith("; 1 instance(s) left out (queue show lists them)")
    summary = json.loads(done["result"])
    assert summary["slices"] == SMALL.slices - 1  # the model ran on the remaining slices
    assert len(summary["excluded"]) == 1 and summary["excluded"][0].startswith(f"{sop}: ")
    events = [e["detail"] for e in store.events_of(uid) if e["kind"] == "instance-excluded"]
    assert events == [f"job {done['id']}: {summary['excluded'][0]}"]


@pytest.mark.parametrize("kind", ["decimal-with-garbage", "pixel-data-length"])
def test_a_damaged_slice_in_the_middle_skips_the_study_by_the_missing_slice_rule_with_both_reasons(
        tmp_path, engine, kind):
    paths = write_study(generate_study(402, pe=False, options=SMALL), tmp_path / "s")["ctpa"]
    headers = _headers(paths)
    order = sorted(range(len(paths)), key=lambda i: float(headers[i].ImagePositionPatient[2]))
    damage(paths[order[len(order) // 2]], kind)
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    uid = _spool(store, paths)
    done = _run(store, engine)
    assert done["state"] == JobState.SKIPPED
    assert "slices missing" in done["reason"] and "1 damaged or inconsistent instance(s) were left out" in \
        done["reason"]
    assert [e["kind"] for e in store.events_of(uid)].count("instance-excluded") == 1


def test_several_slices_that_do_not_decode_are_all_found_in_one_pass(tmp_path):
    paths = write_study(generate_study(403, pe=False, options=SMALL), tmp_path / "s")["ctpa"]
    index = index_series(paths)
    for i in (0, 1, len(index) - 1):
        damage(index.paths[i], "pixel-data-length")
    screened = screen_pixels(index_series(paths))
    assert len(screened) == len(index) - 3
    assert {e.sop_instance_uid for e in screened.excluded} == {index.sop_instance_uids[i]
                                                                for i in (0, 1, len(index) - 1)}
    assert all("pixel data" in e.reason for e in screened.excluded)


def test_header_checks_name_what_is_wrong(tmp_path):
    path = write_study(generate_study(404, pe=False, options=SMALL), tmp_path / "s")["ctpa"][0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert header_problem(ds) is None
    for keyword, value, words in [("BitsAllocated", 12, "BitsAllocated 12"),
                                  ("PhotometricInterpretation", "RGB", "MONOCHROME"),
                                  ("PixelSpacing", [0.0, 1.0], "not a CT pixel size"),
                                  ("ImageOrientationPatient", [1, 0, 0, 1, 0, 0], "orthogonal unit vectors"),
                                  ("RescaleSlope", 0, "cannot map pixels to HU"),
                                  ("ImagePositionPatient", [0.0, 0.0], "three numbers")]:
        bad = copy.deepcopy(ds)
        bad[keyword] = pydicom.DataElement(pydicom.datadict.tag_for_keyword(keyword),
                                           pydicom.datadict.dictionary_VR(keyword), value)
        assert words in (header_problem(bad) or ""), keyword
    odd = copy.deepcopy(ds)  # Rows (US) with three bytes: pydicom raises its own BytesLengthException on reading
    odd[0x00280010] = pydicom.dataelem.RawDataElement(pydicom.tag.Tag(0x00280010), "US", 3, b"\x01\x02\x03", 0,
                                                      False, True)
    assert (header_problem(odd) or "").startswith("a header value cannot be read (BytesLengthException")
    unreadable_uid = copy.deepcopy(ds)
    unreadable_uid[0x0020000D] = pydicom.dataelem.RawDataElement(pydicom.tag.Tag(0x0020000D), "XX", 4, b"1.2.",
                                                                 0, False, True)
    assert header_problem(unreadable_uid) == "StudyInstanceUID cannot be read (NotImplementedError)"
    unreadable_class = copy.deepcopy(ds)  # found by the fuzz harness: selection counted frames with it
    unreadable_class[0x00080016] = pydicom.dataelem.RawDataElement(pydicom.tag.Tag(0x00080016), "U@", 4, b"1.2.",
                                                                   0, False, True)
    assert header_problem(unreadable_class) == "SOPClassUID cannot be read (NotImplementedError)"
    assert not is_multi_frame_ct(unreadable_class) and frame_count(unreadable_class) == 1


def test_invalid_patient_data_is_never_quoted_in_logs_or_warnings(tmp_path, engine, caplog, capfd):
    import logging

    from conftest import free_port
    from node.config import HL7Settings, NotifySettings, load_config

    paths = write_study(generate_study(405, pe=True, options=SMALL), tmp_path / "s")["ctpa"]
    for p in paths:  # values pydicom would call invalid, as some vendors send them
        ds = pydicom.dcmread(p)
        ds.PatientName = "SECRETNAME " + "X" * 70  # no caret: highdicom calls it invalid
        ds.PatientID = "SECRETID\x01"
        ds.PatientBirthDate = "1957x402"
        ds.save_as(p)
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    _spool(store, paths)
    caplog.set_level(logging.DEBUG)
    clock = lambda: T0 + dt.timedelta(minutes=5)  # noqa: E731
    Assembler(store, StudySettings(quiet_seconds=20, max_wait_seconds=300), clock).sweep()
    nobody = load_config(None, environ={}, overrides=[
        f"destinations=[{{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {free_port()}}}]"]).destinations
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:  # the filters in force, as in the node's processes
        done = Worker(store, engine, owner="test", clock=clock, outbox_root=tmp_path / "outbox",
                      destinations=nobody, notify=NotifySettings(results="all", hl7=HL7Settings(
                          host="127.0.0.1", port=free_port()))).run_once()
    captured = capfd.readouterr()
    assert done is not None and done["state"] == JobState.SENDING  # nobody listens: results wait
    hl7 = store.notifications_of(done["study_instance_uid"])[0]["payload"]
    assert "SECRETID" in hl7 and "1957x402" not in hl7  # the RIS gets the ID; no invalid birth date
    said = caplog.text + captured.out + captured.err + "".join(str(w.message) for w in caught)
    for secret in ("SECRETNAME", "SECRETID", "1957x402"):
        assert secret not in said
