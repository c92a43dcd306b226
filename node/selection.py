"""Which series of a study is the CT pulmonary angiogram (the first rule; the node extends it).

A study forwarded by a scanner usually holds a localizer, the CTPA, and often lung-kernel or thick
reformats and a non-contrast series. A candidate must be CT, not a localizer, axial and at least
``MIN_SLICES`` slices long; a slice is a single-frame CT image or a frame of an Enhanced CT or Legacy
Converted Enhanced CT instance (other multi-frame objects are not analysed). Candidates are ranked by:

1. contrast: ``ContrastBolusAgent`` present, or a description that says angio/CTPA/PE;
2. a soft-tissue kernel (not ``LUNG``/``BONE``-like): the model was trained on soft-tissue images;
3. thinner slices;
4. more slices.

The choice and the reason every other series lost are returned, so a log line can say why.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from node.config import SeriesSettings
from node.frames import frame_count, frames, is_multi_frame_ct, slice_normal
from node.screening import Excluded, header_problem, read_header, text
from node.series import SeriesError

MIN_SLICES = 16
ANGIO = re.compile(r"angio|ctpa|cta\b|\bpe\b|pulmonary|embol", re.IGNORECASE)
SHARP_KERNEL = re.compile(r"lung|bone|sharp|b[67]\d|[bi][67]\df|yc|ya|l$", re.IGNORECASE)


@dataclass(frozen=True)
class SeriesChoice:
    series_instance_uid: str
    description: str
    paths: tuple[Path, ...]
    reason: str
    rejected: dict[str, str] = field(default_factory=dict)  # SeriesInstanceUID -> why not
    headers: tuple[pydicom.Dataset, ...] = field(default=(), compare=False, repr=False)  # of ``paths``, no pixels
    unreadable: tuple[Excluded, ...] = ()  # files of the study that are not readable DICOM: left out


def _series_of(paths: Iterable[Path]) -> tuple[dict[str, list[tuple[Path, pydicom.Dataset]]],
                                               dict[str, pydicom.Dataset], list[Excluded]]:
    """Files by series, each series' first undamaged header (what its eligibility is read from), and
    the files that are not readable DICOM with a SeriesInstanceUID (left out, with why)."""
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    first: dict[str, pydicom.Dataset] = {}
    unreadable = []
    for p in paths:
        ds, problem = read_header(Path(p))
        uid = text(ds, "SeriesInstanceUID").strip() if ds is not None else ""
        if ds is None or not uid:
            unreadable.append(Excluded(Path(p).name, "", problem or "no SeriesInstanceUID"))
            continue
        groups[uid].append((Path(p), ds))
        if uid not in first and header_problem(ds) is None:
            first[uid] = ds
    for uid, files in groups.items():  # a series with no undamaged header is judged on its first one
        first.setdefault(uid, files[0][1])
    return groups, first, unreadable


@dataclass(frozen=True)
class SeriesRules:
    """Eligibility rules (config section ``series``)."""

    min_slices: int = MIN_SLICES
    max_slice_thickness_mm: float = 10.0
    require_original_primary: bool = True

    @classmethod
    def from_settings(cls, settings: SeriesSettings) -> SeriesRules:
        return cls(settings.min_slices, settings.max_slice_thickness_mm, settings.require_original_primary)


def _why_not(ds: pydicom.Dataset, n: int, rules: SeriesRules) -> str | None:
    if str(getattr(ds, "Modality", "")) != "CT":
        return f"modality {getattr(ds, 'Modality', 'missing')}"
    image_type = [str(v).upper() for v in getattr(ds, "ImageType", [])]
    if "LOCALIZER" in image_type:
        return "localizer"
    if rules.require_original_primary and image_type[:2] != ["ORIGINAL", "PRIMARY"]:
        joined = "\\".join(image_type[:2]) or "missing"
        return f"ImageType {joined} (not ORIGINAL\\PRIMARY)"
    if frame_count(ds) > 1 and not is_multi_frame_ct(ds):
        return f"multi-frame {getattr(ds.get('SOPClassUID'), 'name', 'object')} (not Enhanced CT)"
    damage = header_problem(ds)
    if damage:
        return f"every instance damaged, e.g. {damage}"
    frame = frames(ds)[0]
    iop = frame.orientation
    if iop is None or len(iop) != 6:
        return "no ImageOrientationPatient"
    if abs(slice_normal(iop)[2]) < 0.9:
        return "not axial"
    if n < rules.min_slices:
        return f"{n} slices (fewer than {rules.min_slices})"
    thickness = frame.slice_thickness_mm or 0.0
    if thickness > rules.max_slice_thickness_mm:
        return f"{thickness:g} mm slices (thicker than {rules.max_slice_thickness_mm:g} mm)"
    return None


def _rank(ds: pydicom.Dataset, n: int) -> tuple:
    description = str(getattr(ds, "SeriesDescription", ""))
    contrast = bool(str(getattr(ds, "ContrastBolusAgent", "")).strip()) or bool(ANGIO.search(description))
    soft = not SHARP_KERNEL.search(str(getattr(ds, "ConvolutionKernel", "")))
    thickness = frames(ds)[0].slice_thickness_mm or 99.0
    return (contrast, soft, -thickness, n)


def choose_ctpa(paths: Iterable[Path], rules: SeriesRules | None = None) -> SeriesChoice:
    """Pick the CTPA series among the files of one study."""
    rules = rules or SeriesRules()
    groups, first, unreadable = _series_of(paths)
    if not groups:
        raise SeriesError(f"no readable DICOM files ({len(unreadable)} unreadable)")
    studies = {text(ds, "StudyInstanceUID") for ds in first.values() if header_problem(ds) is None}
    if len(studies) > 1:
        raise SeriesError(f"files from {len(studies)} studies; give one study")
    rejected: dict[str, str] = {}
    ranked = []
    parts: dict[tuple[str, str], list[tuple[Path, pydicom.Dataset]]] = {}
    for uid, files in groups.items():
        for label, members in _split_overlapping(files).items():
            parts[(uid, label)] = members
    for (uid, label), files in parts.items():
        head = next((ds for _, ds in files if header_problem(ds) is None), first[uid]) if label else first[uid]
        n = sum(frame_count(ds) if is_multi_frame_ct(ds) else 1 for _, ds in files)
        try:
            why = _why_not(head, n, rules)
            rank = _rank(head, n) if not why else ()
        except Exception as exc:  # noqa: BLE001 - an unreadable Modality, ImageType ...: the series' damage, named
            why = f"a header value cannot be read ({type(exc).__name__}: {str(exc)[:80]})"
        if why:
            rejected[uid + label] = why
        else:
            ranked.append((rank, (uid, label), head))
    if not ranked:
        raise SeriesError("no series qualifies as a CTPA: " + "; ".join(
            f"{text(first[u.split(' ')[0]], 'SeriesDescription') or u}: {w}" for u, w in rejected.items()))
    ranked.sort(key=lambda item: (item[0], item[1]), reverse=True)
    (contrast, soft, neg_thickness, n), (best, label), ds = ranked[0]
    for _, (uid, other), _ds in ranked[1:]:
        rejected[uid + other] = ("another acquisition or kernel at the same positions in this series" if uid == best
                                 else "ranked lower (contrast, soft-tissue kernel, thinner slices, more slices)")
    kind = f"frames of {ds.SOPClassUID.name}" if is_multi_frame_ct(ds) else "CT slices"
    reason = (f"{n} axial {kind}, {-neg_thickness:g} mm, "
              f"{'contrast-enhanced' if contrast else 'no contrast information'}, "
              f"{'soft-tissue' if soft else 'sharp'} kernel {getattr(ds, 'ConvolutionKernel', '?')}{label}")
    members = sorted(parts[(best, label)], key=lambda item: item[0])
    return SeriesChoice(best, str(getattr(ds, "SeriesDescription", "")), tuple(p for p, _ in members), reason,
                        rejected, tuple(h for _, h in members), tuple(unreadable))


def _along_normal(frame) -> float:
    """A frame's position along its slice normal, in mm to 0.01 (0.0 without a position).

    Not the z coordinate: with gantry tilt or an oblique reconstruction two slices at the same place
    share their projection on the normal, not necessarily their z."""
    if frame.position is None:
        return 0.0
    if frame.orientation is None:
        return round(float(frame.position[2]), 2)
    return round(float(np.dot(slice_normal(frame.orientation), frame.position)), 2)


def _split_overlapping(files: list[tuple[Path, pydicom.Dataset]]) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    """A series that holds several acquisitions or reconstructions (AcquisitionNumber, ConvolutionKernel)
    at the same positions is several candidates, each labelled; otherwise one, labelled ''.

    Vendors put a repeated acquisition (a bolus that came late) or a second kernel into one series.
    Slices of two of them at one position cannot make one volume; each is judged on its own, and
    the ranking prefers the soft-tissue kernel, then more slices, then the later acquisition.
    """
    def key(ds: pydicom.Dataset) -> tuple[str, str]:
        return (str(ds.get("AcquisitionNumber", "") or "").strip(), str(ds.get("ConvolutionKernel", "") or "").strip())

    by_key: dict[tuple[str, str], list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for item in files:
        try:
            by_key[key(item[1])].append(item)
        except Exception:  # noqa: BLE001 - an unreadable AcquisitionNumber: judged with the rest, left out later
            by_key[("", "")].append(item)
    if len(by_key) < 2:
        return {"": files}
    where: dict[float, set] = defaultdict(set)
    for k, members in by_key.items():
        for _, ds in members:
            if header_problem(ds) is None:
                for f in frames(ds):
                    where[_along_normal(f)].add(k)
    if not any(len(keys) > 1 for keys in where.values()):
        return {"": files}
    return {f" (acquisition {a or '?'}, kernel {kernel or '?'})": members for (a, kernel), members in by_key.items()}
