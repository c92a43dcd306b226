"""A job's results as the node sent them: the outbox's Secondary Capture images (as PNG) and its SR.

The console shows exactly what went to the PACS: it renders the SC instances of the job's outbox folder
(RGB overlays and the summary image) and reads the finding and probability back out of the SR.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import UID

from node.web.errors import WebError

SKIP = {"Language of Content Item and Descendants", "Observer Type"}
#: The pictures a person looks at are the Secondary Capture images; the SEG is for viewers that overlay it.
SECONDARY_CAPTURE = pydicom.uid.SecondaryCaptureImageStorage


@dataclass(frozen=True)
class ResultObject:
    sop_instance_uid: str
    sop_class_uid: str
    series_description: str
    instance_number: int
    is_image: bool


def list_outbox(outbox: str | None) -> list[ResultObject]:
    """The job's result objects, images first in instance order; none if the outbox is gone."""
    if not outbox or not Path(outbox).is_dir():
        return []
    found = []
    for path in sorted(Path(outbox).glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, ValueError, pydicom.errors.InvalidDicomError):
            continue
        found.append(ResultObject(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.get("SeriesDescription", "")),
                                  int(ds.get("InstanceNumber", 0) or 0), str(ds.SOPClassUID) == SECONDARY_CAPTURE))
    return sorted(found, key=lambda o: (not o.is_image, o.series_description, o.instance_number))


def render_png(outbox: str | None, sop_instance_uid: str, max_size: int = 1024) -> bytes:
    """One SC instance of the outbox as PNG bytes (WebError if it is not there or not an image)."""
    if not outbox or not UID(sop_instance_uid).is_valid:
        raise WebError("no such result image")
    path = Path(outbox) / f"{sop_instance_uid}.dcm"
    if not path.is_file():
        raise WebError("no such result image")
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds or str(ds.SOPClassUID) != SECONDARY_CAPTURE:
        raise WebError("that result object is not an image")
    pixels = ds.pixel_array
    if pixels.ndim == 4:  # multi-frame colour: the first frame
        pixels = pixels[0]
    if pixels.dtype != np.uint8:
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    image.thumbnail((max_size, max_size))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def sr_finding(outbox: str | None, sop_instance_uid: str | None) -> dict | None:
    """Finding, probability and the SR's own notice text, read from the SR the node sent."""
    if not outbox or not sop_instance_uid:
        return None
    path = Path(outbox) / f"{sop_instance_uid}.dcm"
    if not path.is_file():
        return None
    ds = pydicom.dcmread(path)
    found: dict = {"sop_instance_uid": sop_instance_uid, "items": []}

    def walk(seq) -> None:
        for item in seq:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            kind = item.get("ValueType", "")
            if kind == "CODE" and "ConceptCodeSequence" in item:
                found["items"].append((name, item.ConceptCodeSequence[0].CodeMeaning))
            elif kind == "NUM" and "MeasuredValueSequence" in item:
                mv = item.MeasuredValueSequence[0]
                unit = mv.MeasurementUnitsCodeSequence[0].CodeMeaning if "MeasurementUnitsCodeSequence" in mv else ""
                found["items"].append((name, f"{mv.NumericValue} {unit}".strip()))
            elif kind == "TEXT":
                found["items"].append((name, str(item.get("TextValue", ""))))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.get("ContentSequence", []))
    seen: set[tuple[str, str]] = set()
    items = []
    for name, value in found["items"]:  # each measurement group repeats the algorithm: once is enough
        if (name, value) not in seen and name not in SKIP:
            seen.add((name, value))
            items.append((name, value))
    found["items"] = items
    return found
