"""A CT series as a volume: slices sorted along the slice normal (never by InstanceNumber), in HU.

A slice is one single-frame CT image or one frame of an Enhanced CT (or Legacy Converted Enhanced CT)
instance: ``node.frames`` reads each frame's geometry and rescale from wherever the object keeps it.

``index_series`` reads headers only and sorts them; ``iter_hu`` then decodes the pixels in batches
in that order, so a 600-slice study never has to sit in memory as float32 at once.
``read_volume`` does both in one go for callers that want the whole volume.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import iter_pixels, pixel_array

from node.errors import NodeError
from node.frames import frames, slice_normal
from node.screening import Excluded, header_problem, text

#: Plausible CT slice spacing; outside it the header is wrong, not the scanner unusual.
SLICE_SPACING_MM = (0.1, 20.0)


class SeriesError(NodeError):
    """A series that cannot be made into one consistent volume; the message says why."""


class SliceError(SeriesError):
    """One slice's pixel data cannot be used; ``position`` is its place in the sorted index."""

    def __init__(self, message: str, position: int):
        super().__init__(message)
        self.position = position


@dataclass(frozen=True)
class SeriesIndex:
    """The slices of one series sorted head first, from their headers alone."""

    paths: tuple[Path, ...]  # the file of each slice (a multi-frame file appears once per frame)
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int | None, ...]  # 1-based frame in a multi-frame instance, None for single-frame
    slopes: np.ndarray  # RescaleSlope of each slice
    intercepts: np.ndarray  # RescaleIntercept of each slice
    positions_mm: np.ndarray  # position of each slice along the normal (descending: head first)
    pixel_spacing_mm: tuple[float, float]
    shape: tuple[int, int]
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    excluded: tuple[Excluded, ...] = ()  # instances (or frames) of the series left out, and why

    def __len__(self) -> int:
        return len(self.paths)

    def without(self, dropped: dict[int, Excluded]) -> SeriesIndex:
        """The same index less the slices at these positions, which join ``excluded``."""
        keep = [i for i in range(len(self)) if i not in dropped]
        return replace(self, paths=tuple(self.paths[i] for i in keep),
                       sop_instance_uids=tuple(self.sop_instance_uids[i] for i in keep),
                       frame_numbers=tuple(self.frame_numbers[i] for i in keep), slopes=self.slopes[keep],
                       intercepts=self.intercepts[keep], positions_mm=self.positions_mm[keep],
                       excluded=self.excluded + tuple(dropped[i] for i in sorted(dropped)))


@dataclass(frozen=True)
class Volume:
    """Sorted slices of one series, head first."""

    hu: np.ndarray  # (slices, rows, columns) float32
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int | None, ...]
    positions_mm: np.ndarray  # position of each slice along the normal
    pixel_spacing_mm: tuple[float, float]
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str


def load_header(path: Path) -> pydicom.Dataset:
    """One file's header (no pixels), or SeriesError naming a file that is not readable DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise SeriesError(f"{Path(path).name}: not a readable DICOM file ({exc})") from exc


def index_series(paths: Sequence[Path], headers: Sequence[pydicom.Dataset] | None = None) -> SeriesIndex:
    """Sort the slices of one CT series along the slice normal, reading headers only.

    The order is head first: the slice whose position projects furthest towards the patient's head
    (+z) comes first, whatever the files' order, names, InstanceNumbers or frame order. ``headers``
    (the files' datasets, read without pixels, in the same order) spare a second read when a caller has them.

    A damaged instance (``node.screening.header_problem``) is left out, and so is one whose size or
    orientation differs from the series' majority; each lands in ``excluded`` with its reason, and
    SeriesError is raised only when nothing usable is left.
    """
    if not paths:
        raise SeriesError("no files")
    if headers is None or len(headers) != len(paths):
        headers = [load_header(Path(p)) for p in paths]
    excluded: list[Excluded] = []
    usable = []
    for p, ds in zip(paths, headers, strict=True):
        problem = header_problem(ds)
        if problem:
            excluded.append(Excluded(Path(p).name, text(ds, "SOPInstanceUID"), problem))
        else:
            usable.append((Path(p), ds))
    if not usable:
        raise SeriesError(f"no usable slices: {len(excluded)} instance(s) excluded, e.g. {excluded[0].describe()}")
    ref = usable[0][1]
    for _, ds in usable:
        if ds.StudyInstanceUID != ref.StudyInstanceUID or ds.SeriesInstanceUID != ref.SeriesInstanceUID:
            raise SeriesError("files from more than one series")
    slices = [(p, ds, f) for p, ds in usable for f in frames(ds)]

    def geometry(ds: pydicom.Dataset, f) -> tuple:
        return (int(ds.Rows), int(ds.Columns), *np.round(np.asarray(f.orientation, dtype=float), 3))

    common = Counter(geometry(ds, f) for _, ds, f in slices).most_common(1)[0][0]
    kept = []
    for p, ds, f in slices:
        g = geometry(ds, f)
        if g == common:
            kept.append((p, ds, f))
            continue
        what = (f"{g[0]}x{g[1]} pixels where the series has {common[0]}x{common[1]}" if g[:2] != common[:2]
                else f"orientation {list(g[2:])} where the series has {list(common[2:])}")
        excluded.append(Excluded(p.name, str(ds.SOPInstanceUID), what, f.number))
    _, first, frame0 = kept[0]
    shape = (int(first.Rows), int(first.Columns))
    normal = slice_normal(frame0.orientation)
    if normal[2] < 0:  # point the normal at the head, so head-first is descending position
        normal = -normal
    pos = np.array([float(np.dot(normal, np.asarray(f.position))) for _, _, f in kept])
    order = np.argsort(-pos, kind="stable")
    pick = [kept[k] for k in order]
    assert frame0.pixel_spacing_mm is not None  # header_problem checked it
    return SeriesIndex(tuple(p for p, _, _ in pick), tuple(str(ds.SOPInstanceUID) for _, ds, _ in pick),
                       tuple(f.number for _, _, f in pick), np.array([f.slope for _, _, f in pick]),
                       np.array([f.intercept for _, _, f in pick]), pos[order], frame0.pixel_spacing_mm, shape,
                       str(first.StudyInstanceUID), str(first.SeriesInstanceUID), str(getattr(first, "PatientID", "")),
                       tuple(excluded))


def check_spacing(index: SeriesIndex, max_gap_factor: float = 1.5) -> float:
    """The median slice spacing; SeriesError if two slices share a position or slices are missing."""
    if len(index) < 2:
        return 0.0
    gaps = np.abs(np.diff(index.positions_mm))
    spacing = float(np.median(gaps))
    if gaps.min() < 1e-3:
        raise SeriesError("two slices share one position (duplicate or overlapping acquisitions in one series)")
    if not SLICE_SPACING_MM[0] <= spacing <= SLICE_SPACING_MM[1]:
        raise SeriesError(f"slice spacing {spacing:.3g} mm is not a CT slice spacing "
                          f"({SLICE_SPACING_MM[0]}-{SLICE_SPACING_MM[1]} mm)")
    if gaps.max() > max_gap_factor * spacing:
        k = int(np.argmax(gaps))
        raise SeriesError(f"slices missing: a {gaps[k]:.1f} mm gap after slice {k + 1} of {len(index)} "
                          f"(median spacing {spacing:.2f} mm)")
    return spacing


def _pixels(path: Path, frame_number: int | None, shape: tuple[int, int]) -> np.ndarray:
    """The stored values of one slice: a whole single-frame image, or one frame decoded on its own."""
    where = f"{path.name}" + (f" frame {frame_number}" if frame_number else "")
    try:
        if frame_number is None:
            pixels = pydicom.dcmread(path).pixel_array
        else:
            pixels = pixel_array(path, index=frame_number - 1)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one bad slice, named
        raise SeriesError(f"{where}: pixel data cannot be decoded ({exc})") from exc
    if pixels.shape != shape:
        raise SeriesError(f"{where}: pixel data is {pixels.shape}, header says {shape}")
    return pixels


def _slice_pixels(index: SeriesIndex, i: int) -> np.ndarray:
    try:
        return _pixels(index.paths[i], index.frame_numbers[i], index.shape)
    except SeriesError as exc:
        raise SliceError(str(exc), i) from exc


def slice_hu(index: SeriesIndex, i: int) -> np.ndarray:
    """Slice ``i`` (head-first order) in HU, float32 (rows, columns)."""
    pixels = _slice_pixels(index, i)
    return pixels.astype(np.float32) * np.float32(index.slopes[i]) + np.float32(index.intercepts[i])


def screen_pixels(index: SeriesIndex) -> SeriesIndex:
    """Decode every slice on its own; the index less those that do not decode (they join ``excluded``).

    The analysis reads pixels in batches and stops at the first damaged one; this finds them all in
    one pass, so a study with several damaged slices is analysed once more, not once per slice.
    """
    dropped: dict[int, Excluded] = {}
    for i in range(len(index)):
        try:
            _slice_pixels(index, i)
        except SliceError as exc:
            frame = index.frame_numbers[i]
            reason = str(exc).split(": ", 1)[-1]
            dropped[i] = Excluded(index.paths[i].name, index.sop_instance_uids[i], reason, frame)
    return index.without(dropped)


@dataclass(frozen=True)
class SourceSlice:
    """One analysed slice as the outputs need it: its instance's header, its frame and its HU pixels."""

    dataset: pydicom.Dataset  # the instance's header (no pixel data needed)
    frame_number: int | None  # 1-based frame of a multi-frame instance, None for single-frame
    hu: np.ndarray  # (rows, columns) float32
    pixel_spacing_mm: tuple[float, float]


def source_slice(index: SeriesIndex, i: int, header: pydicom.Dataset | None = None) -> SourceSlice:
    """Slice ``i`` of ``index`` with its header (read from its file unless given) and HU pixels."""
    return SourceSlice(header if header is not None else load_header(index.paths[i]), index.frame_numbers[i],
                       slice_hu(index, i), index.pixel_spacing_mm)


def _batch_pixels(index: SeriesIndex, lo: int, hi: int) -> list[np.ndarray]:
    """Stored values of slices ``lo``..``hi``. The frames a batch needs from one multi-frame file are
    decoded in one pass over it (``iter_pixels``), not one header parse per frame."""
    out: list[np.ndarray | None] = [None] * (hi - lo)
    frames_of: dict[Path, list[int]] = {}
    for i in range(lo, hi):
        if index.frame_numbers[i] is None:
            out[i - lo] = _slice_pixels(index, i)
        else:
            frames_of.setdefault(index.paths[i], []).append(i)
    for path, slices in frames_of.items():
        try:
            decoded = list(iter_pixels(path, indices=[int(index.frame_numbers[i] or 0) - 1 for i in slices]))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file, named
            raise SliceError(f"{path.name}: pixel data cannot be decoded ({exc})", slices[0]) from exc
        if len(decoded) != len(slices):
            raise SliceError(f"{path.name}: {len(decoded)} of {len(slices)} frames decoded", slices[len(decoded)])
        for i, pixels in zip(slices, decoded, strict=True):
            if pixels.shape != index.shape:
                raise SliceError(f"{path.name} frame {index.frame_numbers[i]}: pixel data is {pixels.shape}, "
                                 f"header says {index.shape}", i)
            out[i - lo] = pixels
    return [p for p in out if p is not None]


def iter_hu(index: SeriesIndex, batch: int = 32) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first slice number, HU array (n, rows, columns)) in head-first order, ``batch`` at a time."""
    for lo in range(0, len(index), batch):
        hi = min(len(index), lo + batch)
        pixels = np.stack(_batch_pixels(index, lo, hi)).astype(np.float32)
        yield lo, (pixels * index.slopes[lo:hi, None, None].astype(np.float32)
                   + index.intercepts[lo:hi, None, None].astype(np.float32))


def read_volume(paths: Sequence[Path]) -> Volume:
    """Read a CT series, sorted head first along the slice normal, into one HU volume."""
    index = index_series(paths)
    hu = np.empty((len(index), *index.shape), dtype=np.float32)
    for lo, chunk in iter_hu(index):
        hu[lo:lo + len(chunk)] = chunk
    return Volume(hu, index.sop_instance_uids, index.frame_numbers, index.positions_mm, index.pixel_spacing_mm,
                  index.study_instance_uid, index.series_instance_uid, index.patient_id)
