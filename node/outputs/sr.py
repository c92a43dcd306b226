"""The Structured Report: Comprehensive 3D SR, TID 1500 Measurement Report (highdicom).

Content:

- procedure reported: CT of unspecified body region (LOINC 25045-6, CID 100), as highdicom's own
  examples use; the observer is the device (petriage, model name and version);
- one measurement group (TID 1501) for the study: finding type pulmonary embolism (SCT 59282003), the
  algorithm (name, version, parameters: threshold, operating point), a qualitative evaluation
  "pulmonary embolism: present | absent" at the operating point, and the study probability as a
  measurement (private code in the declared coding scheme 99PETRIAGE, unit UCUM "1");
- one planar group (TID 1410) per key slice: a POINT image region at the attention peak on the source
  CT image (and its frame, for an Enhanced CT source), with that slice's probability.

The report is never marked verified or complete: it is an AI triage aid, not a diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.inference import NOTICE, StudyResult
from node.outputs import OutputError, for_outputs, names_unquoted
from node.outputs.uids import output_uid, result_key

PRIVATE_SCHEME = "99PETRIAGE"
PULMONARY_EMBOLISM = Code("59282003", "SCT", "Pulmonary embolism")
# SNOMED CT qualifier values, as in the HL7 OBX (node/notify/hl7.py): pydicom's codes.SCT.Absent is
# 272519000 "Absence findings", a finding, not the qualifier 2667000 that pairs with Present 52101004.
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
PE_PROBABILITY = Code("PE-PROB", PRIVATE_SCHEME, "Probability of pulmonary embolism")
SLICE_PROBABILITY = Code("PE-SLICE-PROB", PRIVATE_SCHEME, "Slice probability of pulmonary embolism")
UNITLESS = Code("1", "UCUM", "no units")
SERIES_NUMBER = 9902


def _scheme() -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "petriage private codes"
    item.CodingSchemeResponsibleOrganization = "petriage project"
    return item


def make_sr(result: StudyResult, key_datasets: Sequence[pydicom.Dataset], *, model_sha256: str,
            manufacturer: str = "petriage", predecessors: Sequence[pydicom.Dataset] = ()) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report for ``result``; ``key_datasets``: the header of each key slice's instance (same order).

    ``predecessors``: the earlier reports of this study this one replaces (StudyInstanceUID,
    SeriesInstanceUID, SOPInstanceUID and SOPClassUID of each), named in Predecessor Documents Sequence.
    The series and instance UIDs follow what was analysed (``node.outputs.uids``); the device and the
    findings' tracking UIDs follow the study and the model only, so a later version tracks the same finding.
    """
    key_datasets = [for_outputs(ds) for ds in key_datasets]
    if len(key_datasets) != len(result.key_slices):
        raise OutputError("one source dataset per key slice is needed")
    if not key_datasets:
        raise OutputError("a report needs at least one source image")
    model = result.model
    digest = result_key(result.study_instance_uid, model_sha256, result.sop_instance_uids)
    algorithm = hd.sr.AlgorithmIdentification(
        name=str(model.get("name", "petriage")), version=str(model.get("version", "0")),
        parameters=[f"threshold={result.threshold:.6f}", f"operating_point={result.operating_point}"])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=output_uid(result.study_instance_uid, model_sha256, "device"), name="petriage",
            manufacturer_name=manufacturer, model_name=f"{model.get('name')} {model.get('version')}"))
    context = hd.sr.ObservationContext(observer_device_context=observer)
    study_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=output_uid(result.study_instance_uid, model_sha256, "tracking", 0), identifier="PE study finding"),
        finding_type=PULMONARY_EMBOLISM, algorithm_id=algorithm,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            PULMONARY_EMBOLISM, PRESENT if result.positive else ABSENT)],
        measurements=[hd.sr.Measurement(name=PE_PROBABILITY, value=round(float(result.probability), 6),
                                        unit=UNITLESS, algorithm_id=algorithm)])
    groups: list = [study_group]
    for k, (key, ds) in enumerate(zip(result.key_slices, key_datasets, strict=True), 1):
        if str(ds.SOPInstanceUID) != key.sop_instance_uid:
            raise OutputError(f"key slice {k}: dataset {ds.SOPInstanceUID} is not {key.sop_instance_uid}")
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POINT,
            graphic_data=np.array([[key.peak_column, key.peak_row]], dtype=float),  # (column, row), continuous
            source_image=hd.sr.SourceImageForRegion.from_source_image(
                ds, referenced_frame_numbers=[key.frame_number] if key.frame_number else None))
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=output_uid(result.study_instance_uid, model_sha256, "tracking", k),
                identifier=f"attention peak, key slice {k}"),
            referenced_region=region, finding_type=PULMONARY_EMBOLISM, algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=SLICE_PROBABILITY, value=round(float(key.probability), 6),
                                            unit=UNITLESS, algorithm_id=algorithm)]))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                     imaging_measurements=groups)
    with names_unquoted():
        sr = _report(key_datasets, report, result, digest, manufacturer, predecessors)
    sr.SeriesDescription = f"PE triage SR - {NOTICE}"
    sr.CodingSchemeIdentificationSequence = [_scheme()]
    return sr


def _report(key_datasets, report, result, digest, manufacturer, predecessors) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR(
        evidence=list({str(ds.SOPInstanceUID): ds for ds in key_datasets}.values()),  # an instance once
        content=report, series_instance_uid=output_uid(result.study_instance_uid, digest, "sr-series"),
        series_number=SERIES_NUMBER, sop_instance_uid=output_uid(result.study_instance_uid, digest, "sr"),
        instance_number=1, manufacturer=manufacturer, is_complete=False, is_final=False, is_verified=False,
        institution_name=None, previous_versions=list(predecessors) or None)
