"""A CT series as a volume: slices sorted along the slice normal (never by InstanceNumber), in HU."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from node.errors import NodeError


class SeriesError(NodeError):
    """A series that cannot be made into one consistent volume; the message says why."""


@dataclass(frozen=True)
class Volume:
    """Sorted slices of one series, head first."""

    hu: np.ndarray  # (slices, rows, columns) float32
    sop_instance_uids: tuple[str, ...]
    positions_mm: np.ndarray  # position of each slice along the normal
    pixel_spacing_mm: tuple[float, float]
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str


def _f(values) -> np.ndarray:
    return np.array([float(v) for v in values], dtype=float)


def read_volume(paths: Sequence[Path]) -> Volume:
    """Read a single-frame CT series and sort it along the slice normal.

    The order is head first: the slice whose position projects furthest towards the patient's head
    (+z) comes first, whatever the files' order, names or InstanceNumbers.
    """
    if not paths:
        raise SeriesError("no files")
    datasets = [pydicom.dcmread(p) for p in paths]
    first = datasets[0]
    try:
        iop = _f(first.ImageOrientationPatient)
    except AttributeError as exc:
        raise SeriesError("ImageOrientationPatient is missing") from exc
    normal = np.cross(iop[:3], iop[3:])
    if np.linalg.norm(normal) < 0.5:
        raise SeriesError(f"ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors")
    if normal[2] < 0:  # point the normal at the head, so head-first is descending position
        normal = -normal
    shape = (first.Rows, first.Columns)
    for ds in datasets:
        if ds.StudyInstanceUID != first.StudyInstanceUID or ds.SeriesInstanceUID != first.SeriesInstanceUID:
            raise SeriesError("files from more than one series")
        if (ds.Rows, ds.Columns) != shape or not np.allclose(_f(ds.ImageOrientationPatient), iop, atol=1e-3):
            raise SeriesError("slices differ in size or orientation")
    pos = np.array([float(np.dot(normal, _f(ds.ImagePositionPatient))) for ds in datasets])
    order = np.argsort(-pos, kind="stable")
    hu = np.empty((len(datasets), *shape), dtype=np.float32)
    for i, k in enumerate(order):
        ds = datasets[k]
        slope, intercept = float(getattr(ds, "RescaleSlope", 1)), float(getattr(ds, "RescaleIntercept", 0))
        hu[i] = ds.pixel_array.astype(np.float32) * slope + intercept
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    return Volume(hu, tuple(str(datasets[k].SOPInstanceUID) for k in order), pos[order],
                  (row_mm, col_mm), str(first.StudyInstanceUID),
                  str(first.SeriesInstanceUID), str(getattr(first, "PatientID", "")))
