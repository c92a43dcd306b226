"""What a radiologist recognises a study by (accession, date, description, patient), read from the spool.

The store keeps no patient data; the console reads these few header fields from one spooled instance
of the study when a logged-in user asks, and keeps them in memory only (a bounded cache per console
process). A study whose files housekeeping has removed shows none of them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import pydicom
from sqlalchemy import func, select

from node.store import Store, instances

TAGS = ["AccessionNumber", "StudyDate", "StudyTime", "StudyDescription", "PatientName", "PatientID", "Modality"]


@dataclass(frozen=True)
class StudyHeader:
    accession_number: str = ""
    study_date: str = ""  # YYYY-MM-DD, or ""
    study_time: str = ""  # HH:MM, or ""
    study_description: str = ""
    patient_name: str = ""  # family^given as written, carets shown as ", " and " "
    patient_id: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) >= 8 and value[:8].isdigit() else ""


def _time(value: str) -> str:
    return f"{value[:2]}:{value[2:4]}" if len(value) >= 4 and value[:4].isdigit() else ""


def _name(value: str) -> str:
    parts = [p.strip() for p in value.split("=")[0].split("^")]
    family, given = (parts + ["", ""])[:2]
    return f"{family}, {given}".strip(", ") if given else family


def read_header(path: Path) -> StudyHeader:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=TAGS)
    return StudyHeader(_text(ds, "AccessionNumber"), _date(_text(ds, "StudyDate")), _time(_text(ds, "StudyTime")),
                       _text(ds, "StudyDescription"), _name(_text(ds, "PatientName")), _text(ds, "PatientID"))


class HeaderCache:
    """StudyInstanceUID -> StudyHeader, read once from the study's first spooled instance."""

    def __init__(self, store: Store, capacity: int = 20000):
        self.store, self.capacity = store, capacity
        self._cache: OrderedDict[str, StudyHeader] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, uids: list[str]) -> dict[str, StudyHeader]:
        with self._lock:
            found = {u: self._cache[u] for u in uids if u in self._cache}
        missing = [u for u in uids if u not in found]
        if missing:
            with self.store.engine.connect() as conn:
                rows = conn.execute(select(instances.c.study_instance_uid, func.min(instances.c.path))
                                    .where(instances.c.study_instance_uid.in_(missing))
                                    .group_by(instances.c.study_instance_uid)).all()
            first = {str(uid): str(path) for uid, path in rows}
            for uid in missing:
                header = StudyHeader()
                if uid in first:
                    try:
                        header = read_header(Path(first[uid]))
                    except (OSError, ValueError, pydicom.errors.InvalidDicomError):
                        header = StudyHeader()  # removed or unreadable: shown without
                found[uid] = header
            with self._lock:
                for uid in missing:
                    self._cache[uid] = found[uid]
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        return found
