"""Per-frame geometry and rescale of a CT instance, single-frame or multi-frame (Enhanced CT).

A single-frame CT image keeps ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
SliceThickness and RescaleSlope/Intercept at the top level. Enhanced CT Image Storage and Legacy
Converted Enhanced CT Image Storage keep them in functional groups: a value in the frame's item of
PerFrameFunctionalGroupsSequence wins over the one in SharedFunctionalGroupsSequence. ``frames`` gives
one ``Frame`` per image either way, so the rest of the node never looks at functional groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.uid import UID

ENHANCED_CT = UID("1.2.840.10008.5.1.4.1.1.2.1")
LEGACY_CONVERTED_ENHANCED_CT = UID("1.2.840.10008.5.1.4.1.1.2.2")
MULTI_FRAME_CT = frozenset({ENHANCED_CT, LEGACY_CONVERTED_ENHANCED_CT})


def slice_normal(orientation) -> np.ndarray:
    """The normal of the image plane: row direction x column direction of ImageOrientationPatient."""
    iop = np.asarray(orientation, dtype=float)
    return np.cross(iop[:3], iop[3:])


@dataclass(frozen=True)
class Frame:
    """What the node needs of one image; ``number`` is the 1-based frame number (None for single-frame)."""

    number: int | None
    position: np.ndarray | None  # ImagePositionPatient (3,), None when missing
    orientation: np.ndarray | None  # ImageOrientationPatient (6,), None when missing
    pixel_spacing_mm: tuple[float, float] | None
    slice_thickness_mm: float | None
    slope: float
    intercept: float


def is_multi_frame_ct(ds: pydicom.Dataset) -> bool:
    """Whether ``ds`` is an Enhanced or Legacy Converted Enhanced CT image (False when its SOPClassUID
    cannot be read: node.screening then names the damage)."""
    try:
        return str(getattr(ds, "SOPClassUID", "")) in MULTI_FRAME_CT
    except Exception:  # noqa: BLE001 - pydicom raises several kinds for a damaged value
        return False


def frame_count(ds: pydicom.Dataset) -> int:
    try:
        return max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))
    except Exception:  # noqa: BLE001 - a damaged NumberOfFrames counts as one frame; screening names it
        return 1


def _floats(value) -> np.ndarray | None:
    try:
        return np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None


def _group_value(groups: list[pydicom.Dataset], sequence: str, keyword: str):
    """The first value of ``keyword`` inside ``sequence`` of the given functional group items, in order."""
    for group in groups:
        seq = group.get(sequence)
        if seq and keyword in seq[0] and seq[0][keyword].value not in (None, ""):
            return seq[0][keyword].value
    return None


def _frame(number: int | None, value) -> Frame:
    """A Frame from ``value(sequence, keyword)``, which looks an attribute up where this kind of object keeps it."""
    spacing = _floats(value("PixelMeasuresSequence", "PixelSpacing") or ())
    thickness = value("PixelMeasuresSequence", "SliceThickness")
    slope = value("PixelValueTransformationSequence", "RescaleSlope")
    intercept = value("PixelValueTransformationSequence", "RescaleIntercept")
    position = value("PlanePositionSequence", "ImagePositionPatient")
    orientation = value("PlaneOrientationSequence", "ImageOrientationPatient")
    return Frame(number, _floats(position) if position is not None else None,
                 _floats(orientation) if orientation is not None else None,
                 (float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) == 2 else None,
                 float(thickness) if thickness not in (None, "") else None,
                 float(slope) if slope not in (None, "") else 1.0,
                 float(intercept) if intercept not in (None, "") else 0.0)


def frames(ds: pydicom.Dataset) -> list[Frame]:
    """One Frame per image of ``ds`` (a header read with or without pixels)."""
    if not is_multi_frame_ct(ds):
        return [_frame(None, lambda sequence, keyword: ds.get(keyword))]
    shared = list(ds.get("SharedFunctionalGroupsSequence") or [])[:1]
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    return [_frame(i + 1, lambda sequence, keyword, i=i: _group_value(
        ([per_frame[i]] if i < len(per_frame) else []) + shared, sequence, keyword))
        for i in range(frame_count(ds))]
