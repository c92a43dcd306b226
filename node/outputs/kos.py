"""The Key Object Selection document: which images a viewer should open on, and the results beside them.

Document title "Of Interest" (DCM 113000, CID 7010); the observer is the device (as in the SR). It
references the key source CT images (each frame of an Enhanced CT source), the SR, every image of
the SC series and the SEG instance(s), so a PACS viewer that honours key objects opens the study on
the slices the model found most suspicious with its results at hand. The text says what it is: an AI
triage aid, not for diagnostic use.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from node.inference import NOTICE, StudyResult
from node.outputs import OutputError, for_outputs, names_unquoted
from node.outputs.uids import output_uid, result_key

SERIES_NUMBER = 9904
OF_INTEREST = codes.DCM.OfInterest  # CID 7010 "Key Object Selection Document Title"


def _name_frames(kos: pydicom.Dataset, frames: dict[str, list[int]]) -> None:
    """Add ReferencedFrameNumber to the IMAGE items of multi-frame sources (highdicom references whole
    instances); a viewer then opens an Enhanced CT on its key frames."""
    for item in kos.ContentSequence:
        if item.ValueType != "IMAGE":
            continue
        ref = item.ReferencedSOPSequence[0]
        numbers = frames.get(str(ref.ReferencedSOPInstanceUID))
        if numbers:
            ref.ReferencedFrameNumber = numbers if len(numbers) > 1 else numbers[0]


def make_kos(result: StudyResult, key_datasets: Sequence[pydicom.Dataset], results: Sequence[pydicom.Dataset], *,
             model_sha256: str, manufacturer: str = "petriage") -> hd.ko.KeyObjectSelectionDocument:
    """The KOS of ``result``: ``key_datasets`` the headers of the key slices' instances (same order as
    ``result.key_slices``), ``results`` the node's own objects of this result (SR, SC images, SEG)."""
    if len(key_datasets) != len(result.key_slices) or not key_datasets:
        raise OutputError("one source dataset per key slice is needed")
    uid = result.study_instance_uid
    digest = result_key(uid, model_sha256, result.sop_instance_uids)
    images: dict[str, pydicom.Dataset] = {}
    frames: dict[str, list[int]] = {}
    for key, ds in zip(result.key_slices, key_datasets, strict=True):
        if str(ds.SOPInstanceUID) != key.sop_instance_uid:
            raise OutputError(f"key slice dataset {ds.SOPInstanceUID} is not {key.sop_instance_uid}")
        images.setdefault(key.sop_instance_uid, for_outputs(ds))
        if key.frame_number:
            frames.setdefault(key.sop_instance_uid, []).append(int(key.frame_number))
    referenced = list(images.values()) + [for_outputs(ds) for ds in results]
    model = result.model
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=output_uid(uid, model_sha256, "device"), name="petriage", manufacturer_name=manufacturer,
            model_name=f"{model.get('name')} {model.get('version')}"))
    decision = "PE suspected" if result.positive else "PE not suspected"
    content = hd.ko.KeyObjectSelection(
        document_title=OF_INTEREST, referenced_objects=referenced, observer_device_context=observer,
        description=f"{decision} (p = {result.probability:.3f}): key images and AI results - {NOTICE}"[:1024])
    evidence = list({str(ds.SOPInstanceUID): ds for ds in referenced}.values())
    with names_unquoted():
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=evidence, content=content, series_instance_uid=output_uid(uid, digest, "kos-series"),
            series_number=SERIES_NUMBER, sop_instance_uid=output_uid(uid, digest, "kos"), instance_number=1,
            manufacturer=manufacturer)
    _name_frames(kos, {k: sorted(set(v)) for k, v in frames.items()})
    kos.SeriesDescription = f"PE triage key objects - {NOTICE}"
    return kos
