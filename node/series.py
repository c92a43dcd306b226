"""A CT series as a volume: slices sorted along the slice normal (never by InstanceNumber), in HU.

``index_series`` reads headers only and sorts them; ``iter_hu`` then decodes the pixels in batches
in that order, so a 600-slice study never has to sit in memory as float32 at once.
``read_volume`` does both in one go for callers that want the whole volume.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from node.errors import NodeError


class SeriesError(NodeError):
    """A series that cannot be made into one consistent volume; the message says why."""


@dataclass(frozen=True)
class SeriesIndex:
    """The files of one series sorted head first, from their headers alone."""

    paths: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    positions_mm: np.ndarray  # position of each slice along the normal (descending: head first)
    pixel_spacing_mm: tuple[float, float]
    shape: tuple[int, int]
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str

    def __len__(self) -> int:
        return len(self.paths)


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


def _header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise SeriesError(f"{Path(path).name}: not a readable DICOM file ({exc})") from exc


def index_series(paths: Sequence[Path], headers: Sequence[pydicom.Dataset] | None = None) -> SeriesIndex:
    """Sort a single-frame CT series along the slice normal, reading headers only.

    The order is head first: the slice whose position projects furthest towards the patient's head
    (+z) comes first, whatever the files' order, names or InstanceNumbers. ``headers`` (the files'
    datasets, read without pixels, in the same order) spare a second read when a caller has them.
    """
    if not paths:
        raise SeriesError("no files")
    if headers is None or len(headers) != len(paths):
        headers = [_header(Path(p)) for p in paths]
    first = headers[0]
    try:
        iop = _f(first.ImageOrientationPatient)
        shape = (int(first.Rows), int(first.Columns))
        row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    except AttributeError as exc:
        raise SeriesError(f"a required attribute is missing: {exc}") from exc
    normal = np.cross(iop[:3], iop[3:])
    if np.linalg.norm(normal) < 0.5:
        raise SeriesError(f"ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors")
    if normal[2] < 0:  # point the normal at the head, so head-first is descending position
        normal = -normal
    for ds in headers:
        if ds.StudyInstanceUID != first.StudyInstanceUID or ds.SeriesInstanceUID != first.SeriesInstanceUID:
            raise SeriesError("files from more than one series")
        if (ds.Rows, ds.Columns) != shape or not np.allclose(_f(ds.ImageOrientationPatient), iop, atol=1e-3):
            raise SeriesError("slices differ in size or orientation")
        if "ImagePositionPatient" not in ds:
            raise SeriesError("ImagePositionPatient is missing")
    pos = np.array([float(np.dot(normal, _f(ds.ImagePositionPatient))) for ds in headers])
    order = np.argsort(-pos, kind="stable")
    return SeriesIndex(tuple(Path(paths[k]) for k in order), tuple(str(headers[k].SOPInstanceUID) for k in order),
                       pos[order], (row_mm, col_mm), shape, str(first.StudyInstanceUID),
                       str(first.SeriesInstanceUID), str(getattr(first, "PatientID", "")))


def check_spacing(index: SeriesIndex, max_gap_factor: float = 1.5) -> float:
    """The median slice spacing; SeriesError if two slices share a position or slices are missing."""
    if len(index) < 2:
        return 0.0
    gaps = np.abs(np.diff(index.positions_mm))
    spacing = float(np.median(gaps))
    if gaps.min() < 1e-3:
        raise SeriesError("two slices share one position (duplicate or overlapping acquisitions in one series)")
    if gaps.max() > max_gap_factor * spacing:
        k = int(np.argmax(gaps))
        raise SeriesError(f"slices missing: a {gaps[k]:.1f} mm gap after slice {k + 1} of {len(index)} "
                          f"(median spacing {spacing:.2f} mm)")
    return spacing


def _hu(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one bad slice, named
        raise SeriesError(f"{path.name}: pixel data cannot be decoded ({exc})") from exc
    if pixels.shape != shape:
        raise SeriesError(f"{path.name}: pixel data is {pixels.shape}, header says {shape}")
    slope, intercept = float(getattr(ds, "RescaleSlope", 1)), float(getattr(ds, "RescaleIntercept", 0))
    return pixels.astype(np.float32) * slope + intercept


def iter_hu(index: SeriesIndex, batch: int = 32) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first slice number, HU array (n, rows, columns)) in head-first order, ``batch`` at a time."""
    for lo in range(0, len(index), batch):
        chunk = index.paths[lo:lo + batch]
        yield lo, np.stack([_hu(p, index.shape) for p in chunk])


def read_volume(paths: Sequence[Path]) -> Volume:
    """Read a single-frame CT series, sorted head first along the slice normal, into one HU volume."""
    index = index_series(paths)
    hu = np.empty((len(index), *index.shape), dtype=np.float32)
    for lo, chunk in iter_hu(index):
        hu[lo:lo + len(chunk)] = chunk
    return Volume(hu, index.sop_instance_uids, index.positions_mm, index.pixel_spacing_mm,
                  index.study_instance_uid, index.series_instance_uid, index.patient_id)
