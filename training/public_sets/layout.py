"""Write imported studies in the RSNA-STR PE layout, one study at a time, resumably.

Each finished study leaves ``DST/rows/<Study>.csv`` (its ``train.csv`` rows) last, so a study is either
complete or absent: a rerun skips the studies whose rows exist and ``finish`` assembles ``train.csv``
from all of them. Masks follow the project's format (docs/phantom.md): ``masks/<Study>.npz`` with the
SOP Instance UIDs of the images that show an embolus and their masks; the public sets outline every
embolus on every slice, so every PE-positive image is listed.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node.phantom.dataset import RSNA_COLUMNS, RSNA_STUDY_COLUMNS
from training import TrainingError


@dataclass
class ImportedStudy:
    """One study as written: its UIDs, its images in slice order and each image's embolus mask."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: list[str]
    masks: list[np.ndarray]  # per image (Rows, Columns), non-zero inside an embolus
    source: str  # the case's name in the public set
    notes: dict = field(default_factory=dict)

    @property
    def positive_images(self) -> int:
        return sum(1 for m in self.masks if m.any())


class RsnaLayout:
    """DST in the RSNA-STR PE layout, filled study by study."""

    def __init__(self, out: Path, dataset: str):
        self.out, self.dataset = Path(out), dataset
        for sub in ("train", "masks", "rows"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        # the cases an earlier run finished: each finished study's .json names its source
        self._done = {json.loads(p.with_suffix(".json").read_text())["source"]
                      for p in (self.out / "rows").glob("*.csv") if p.with_suffix(".json").is_file()}

    def series_folder(self, study_uid: str, series_uid: str) -> Path:
        folder = self.out / "train" / study_uid / series_uid
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def done(self, source: str) -> bool:
        """Whether a case was imported by an earlier run (its rows file names the source)."""
        return source in self._done

    def add(self, study: ImportedStudy) -> None:
        if len(study.masks) != len(study.sop_instance_uids):
            raise TrainingError(f"{study.source}: {len(study.masks)} masks for {len(study.sop_instance_uids)} images")
        uid = study.study_instance_uid
        positive = [i for i, m in enumerate(study.masks) if m.any()]
        if positive:
            np.savez_compressed(self.out / "masks" / f"{uid}.npz",
                                sop_instance_uid=np.array([study.sop_instance_uids[i] for i in positive]),
                                mask=np.stack([(study.masks[i] > 0).astype(np.uint8) for i in positive]))
        label = int(bool(positive))
        study_cols = {c: 0 for c in RSNA_STUDY_COLUMNS}
        study_cols["negative_exam_for_pe"] = 1 - label
        shows = set(positive)
        rows_path = self.out / "rows" / f"{uid}.csv"
        (self.out / "rows" / f"{uid}.json").write_text(json.dumps(
            {"source": study.source, "dataset": self.dataset, "images": len(study.sop_instance_uids),
             "positive_images": len(positive), **study.notes}))
        tmp = rows_path.with_suffix(".tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=RSNA_COLUMNS)
            for i, sop in enumerate(study.sop_instance_uids):
                w.writerow({"StudyInstanceUID": uid, "SeriesInstanceUID": study.series_instance_uid,
                            "SOPInstanceUID": sop, "pe_present_on_image": int(i in shows), **study_cols})
        os.replace(tmp, rows_path)  # last: the study exists for a rerun only once everything is written
        self._done.add(study.source)

    def finish(self, skipped: Iterable[tuple[str, str]] = ()) -> Path:
        """Assemble train.csv from every imported study; write import.json with what was skipped and why."""
        rows = sorted((self.out / "rows").glob("*.csv"))
        if not rows:
            raise TrainingError(f"{self.out}: no study was imported")
        tmp = self.out / "train.csv.tmp"
        with tmp.open("w", newline="") as fh:
            fh.write(",".join(RSNA_COLUMNS) + "\n")
            for p in rows:
                fh.write(p.read_text())
        os.replace(tmp, self.out / "train.csv")
        studies = [json.loads(p.with_suffix(".json").read_text()) for p in rows]
        (self.out / "import.json").write_text(json.dumps(
            {"dataset": self.dataset, "studies": studies, "skipped": [{"source": s, "reason": r} for s, r in skipped]},
            indent=1) + "\n")
        return self.out / "train.csv"
