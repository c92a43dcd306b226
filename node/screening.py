"""Which instances of a study can be analysed: every header value the node reads, checked where it is read.

Hospitals send damaged and odd objects: a slice cut short in transit, a byte flipped in a header, a
vendor's decimal string with trailing garbage. One such instance must not cost the study its
triage. ``header_problem`` checks what ``node.frames`` and ``node.series`` will read (sizes, pixel
format, rescale, spacing, position, orientation, the frames of a multi-frame object) and names the
first thing wrong; ``node.series.screen_pixels`` decodes every slice of a sorted series and names
those whose pixel data is missing, short, or does not decode. An instance that fails is left out of its series
as an ``Excluded`` (its SOPInstanceUID and why, never patient data); whether the series can still
be analysed is then the series rules' decision (``node.series.check_spacing``: the missing-slice
rule), not this module's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pydicom

from node.frames import Frame, frame_count, frames, is_multi_frame_ct

#: Plausible CT pixel and slice sizes; outside them the header is wrong, not the scanner unusual.
PIXEL_SPACING_MM = (0.05, 10.0)
MAX_MATRIX = 8192
PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class Excluded:
    """An instance (or one frame of it) left out of the analysis, and why."""

    file: str  # the spool file's name
    sop_instance_uid: str
    reason: str
    frame_number: int | None = None

    def describe(self) -> str:
        frame = f" frame {self.frame_number}" if self.frame_number else ""
        return f"{self.sop_instance_uid or self.file}{frame}: {self.reason}"


def _int(ds: pydicom.Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except Exception:  # noqa: BLE001 - pydicom raises its own kinds for damaged values (BytesLengthException ...)
        return None


#: Text attributes the node reads besides geometry and pixels; each must at least be readable.
READ_TEXT = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "PatientID", "Modality",
             "ImageType", "ConvolutionKernel", "SeriesDescription", "ContrastBolusAgent", "AcquisitionNumber")


def text(ds: pydicom.Dataset, keyword: str) -> str:
    """An attribute as text, "" when missing or unreadable (a damaged value raises in pydicom)."""
    try:
        value = ds.get(keyword)
        return "" if value is None else str(value)
    except Exception:  # noqa: BLE001 - pydicom raises several kinds for a damaged value
        return ""


def _finite(values, n: int) -> bool:
    return values is not None and len(values) == n and all(math.isfinite(float(v)) for v in values)


def frame_problem(f: Frame) -> str | None:
    """What is wrong with one frame's geometry or rescale, or None."""
    where = f"frame {f.number}: " if f.number else ""
    if not _finite(f.position, 3):
        return where + "ImagePositionPatient is missing or not three numbers"
    if not _finite(f.orientation, 6):
        return where + "ImageOrientationPatient is missing or not six numbers"
    assert f.orientation is not None
    row, col = f.orientation[:3], f.orientation[3:]
    norms = (math.sqrt(sum(v * v for v in row)), math.sqrt(sum(v * v for v in col)))
    if any(abs(n - 1.0) > 0.01 for n in norms) or abs(sum(a * b for a, b in zip(row, col, strict=True))) > 0.01:
        return where + f"ImageOrientationPatient {[round(float(v), 4) for v in f.orientation]} is not two " \
                       "orthogonal unit vectors"
    if f.pixel_spacing_mm is None:
        return where + "PixelSpacing is missing or not two numbers"
    if not all(math.isfinite(v) and PIXEL_SPACING_MM[0] <= v <= PIXEL_SPACING_MM[1] for v in f.pixel_spacing_mm):
        return where + (f"PixelSpacing {list(f.pixel_spacing_mm)} mm is not a CT pixel size "
                        f"({PIXEL_SPACING_MM[0]}-{PIXEL_SPACING_MM[1]} mm)")
    if not (math.isfinite(f.slope) and f.slope != 0.0 and math.isfinite(f.intercept)):
        return where + f"RescaleSlope {f.slope} / RescaleIntercept {f.intercept} cannot map pixels to HU"
    return None


def header_problem(ds: pydicom.Dataset) -> str | None:
    """The first thing wrong with what the node reads from this CT header (read without pixels), or None."""
    try:
        return _header_problem(ds)
    except Exception as exc:  # noqa: BLE001 - any value that cannot even be read is this instance's damage, named
        return f"a header value cannot be read ({type(exc).__name__}: {str(exc)[:80]})"


def _header_problem(ds: pydicom.Dataset) -> str | None:
    for keyword in READ_TEXT:  # named without their value: PatientID is among them
        try:
            str(ds.get(keyword, ""))
        except Exception as exc:  # noqa: BLE001 - pydicom raises several kinds for a damaged value
            return f"{keyword} cannot be read ({type(exc).__name__})"
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(keyword, "")).strip():
            return f"{keyword} is missing"
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    if rows is None or columns is None or not (1 <= rows <= MAX_MATRIX and 1 <= columns <= MAX_MATRIX):
        return f"Rows/Columns {ds.get('Rows')!s:.20}/{ds.get('Columns')!s:.20} is not an image size"
    bits = _int(ds, "BitsAllocated")
    if bits not in (8, 16, 32):
        return f"BitsAllocated {ds.get('BitsAllocated')!s:.20} (CT images have 8, 16 or 32)"
    stored = _int(ds, "BitsStored")
    if stored is not None and not 1 <= stored <= bits:
        return f"BitsStored {stored} with BitsAllocated {bits}"
    if _int(ds, "SamplesPerPixel") not in (None, 1):
        return f"SamplesPerPixel {ds.get('SamplesPerPixel')!s:.20} (a CT image has one)"
    if _int(ds, "PixelRepresentation") not in (None, 0, 1):
        return f"PixelRepresentation {ds.get('PixelRepresentation')!s:.20}"
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in PHOTOMETRIC:
        return f"PhotometricInterpretation {photometric:.20} (a CT image is MONOCHROME1 or MONOCHROME2)"
    if is_multi_frame_ct(ds) and _int(ds, "NumberOfFrames") is None:
        return "NumberOfFrames is missing or not a number"
    try:
        found = frames(ds)
    except Exception as exc:  # noqa: BLE001 - any value that cannot be read is this instance's damage, named
        return f"a header value cannot be read ({type(exc).__name__}: {str(exc)[:80]})"
    if is_multi_frame_ct(ds) and len(found) != frame_count(ds):
        return f"{len(found)} frames described, NumberOfFrames says {frame_count(ds)}"
    for f in found:
        problem = frame_problem(f)
        if problem:
            return problem
    return None


def read_header(path: Path) -> tuple[pydicom.Dataset | None, str | None]:
    """(header without pixels, None), or (None, why it cannot be read)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True), None
    except Exception as exc:  # noqa: BLE001 - a file pydicom cannot parse is one damaged instance, named
        return None, f"not a readable DICOM file ({type(exc).__name__}: {str(exc)[:80]})"
