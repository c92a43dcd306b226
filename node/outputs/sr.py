"""The Structured Report: Comprehensive 3D SR, TID 1500 Measurement Report (highdicom), after IHE AIR.

Always:

- the exam: Performed Procedure Code Sequence (SR Document General module) holds the source study's
  own Procedure Code Sequence when its header has one (the RIS's code), else LOINC 36147-7 "CTA
  Pulmonary arteries W contrast IV" (or the site's ``outputs.procedure_code``); TID 1500's Procedure
  Reported (CID 100, one code) is LOINC 25045-6 "CT unspecified body region", the group's CT entry
  (PixelMed's TID 1500 check refuses codes outside its CID 100); the observer is the device;
- the finding: pulmonary embolism (SCT 59282003) in the pulmonary artery (finding site), with its
  tracking identifier and UID, the study probability as a measurement (private code in the declared
  coding scheme 99PETRIAGE, unit UCUM "1") made by the algorithm (TID 4019: name, version, parameters:
  threshold, operating point);
- the decision at the operating point, "pulmonary embolism: present | absent", as the report's own
  Qualitative Evaluations (TID 1500 row 12).

With a SEG of the attention map (``node.outputs.seg``), the finding is one volumetric group (TID 1411)
whose Referenced Segment is the SEG's segment 1 on the analysed series: the region the finding rests
on, as IHE AIR links a finding to its segmentation (the key images are in the KOS). Without one, the
finding is a study-level group (TID 1501) plus one planar group (TID 1410) per key slice: a POINT at
its attention peak on the source image (and frame, for an Enhanced CT) with that slice's probability.
PixelMed's TID 1500 check reads every group of a report as one template, so the two shapes are not
mixed in one report.

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


#: TID 1500 row 12: the report's own qualitative evaluations.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
#: TID 1500 Procedure Reported (CID 100 has no CT angiography of the chest; one code).
PROCEDURE = codes.LN.CTUnspecifiedBodyRegion
#: The exam, when the source header names none: CT angiography of the pulmonary arteries (LOINC).
CTPA = Code("36147-7", "LN", "CTA Pulmonary arteries W contrast IV")
#: highdicom writes "Source Series for Segmentation"; PS3.16 and PixelMed spell it so.
SOURCE_SERIES_MEANING = "Source series for segmentation"


def make_sr(result: StudyResult, key_datasets: Sequence[pydicom.Dataset], *, model_sha256: str,
            manufacturer: str = "petriage", predecessors: Sequence[pydicom.Dataset] = (),
            segmentation: pydicom.Dataset | None = None, performed: Code = CTPA) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report for ``result``; ``key_datasets``: the header of each key slice's instance (same order).

    ``predecessors``: the earlier reports of this study this one replaces (StudyInstanceUID,
    SeriesInstanceUID, SOPInstanceUID and SOPClassUID of each), named in Predecessor Documents Sequence.
    ``segmentation``: this result's SEG, which the finding then references. ``performed``: the exam's
    code when the key slices' header has no Procedure Code Sequence of its own.
    The series and instance UIDs follow what was analysed (``node.outputs.uids``); the device and the
    findings' tracking UIDs follow the study and the model only, so a later version tracks the same finding.
    """
    key_datasets = [for_outputs(ds) for ds in key_datasets]
    if len(key_datasets) != len(result.key_slices):
        raise OutputError("one source dataset per key slice is needed")
    if not key_datasets:
        raise OutputError("a report needs at least one source image")
    for k, (key, ds) in enumerate(zip(result.key_slices, key_datasets, strict=True), 1):
        if str(ds.SOPInstanceUID) != key.sop_instance_uid:
            raise OutputError(f"key slice {k}: dataset {ds.SOPInstanceUID} is not {key.sop_instance_uid}")
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
    finding = hd.sr.TrackingIdentifier(uid=output_uid(result.study_instance_uid, model_sha256, "tracking", 0),
                                       identifier="PE study finding")
    probability = hd.sr.Measurement(name=PE_PROBABILITY, value=round(float(result.probability), 6), unit=UNITLESS,
                                    algorithm_id=algorithm)
    site = [hd.sr.FindingSite(codes.SCT.PulmonaryArtery)]
    if segmentation is not None:
        groups: list = [_segment_group(result, segmentation, finding, site, probability)]
    else:
        groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=finding, finding_type=PULMONARY_EMBOLISM, algorithm_id=algorithm,
            finding_sites=site, measurements=[probability])]
        groups += _peak_groups(result, key_datasets, model_sha256, algorithm)
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=PROCEDURE, imaging_measurements=groups)
    report[0].ContentSequence.append(_decision(result.positive))
    evidence = [*key_datasets, *([for_outputs(segmentation)] if segmentation is not None else [])]
    with names_unquoted():
        sr = _report(evidence, report, result, digest, manufacturer, predecessors, _exam(key_datasets[0], performed))
    sr.SeriesDescription = f"PE triage SR - {NOTICE}"
    sr.CodingSchemeIdentificationSequence = [_scheme()]
    return sr


def _segment_group(result: StudyResult, segmentation: pydicom.Dataset, finding, site,
                   probability) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411: the finding on the SEG's segment 1; the algorithm rides on the measurement (TID 300),
    where PixelMed's TID 1411 has it."""
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=finding, finding_type=PULMONARY_EMBOLISM, finding_sites=site, measurements=[probability],
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(segmentation.SOPClassUID), sop_instance_uid=str(segmentation.SOPInstanceUID),
            segment_number=1, source_series=hd.sr.SourceSeriesForSegmentation(result.series_instance_uid)))
    for item in group[0].ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "121232":
            item.ConceptNameCodeSequence[0].CodeMeaning = SOURCE_SERIES_MEANING
    return group


def _peak_groups(result: StudyResult, key_datasets: list[pydicom.Dataset], model_sha256: str,
                 algorithm) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """TID 1410, one per key slice: a POINT at the attention peak, with the slice's probability."""
    groups = []
    for k, (key, ds) in enumerate(zip(result.key_slices, key_datasets, strict=True), 1):
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
    return groups


def _decision(positive: bool) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: Qualitative Evaluations, "pulmonary embolism: present | absent"."""
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = pydicom.Sequence([hd.sr.CodeContentItem(
        name=PULMONARY_EMBOLISM, value=PRESENT if positive else ABSENT,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)])
    return container


def _exam(source: pydicom.Dataset, default: Code) -> list:
    """The exam's procedure codes: the source's Procedure Code Sequence if it is well formed, else ``default``."""
    found = []
    for item in source.get("ProcedureCodeSequence", []):
        try:
            found.append(hd.sr.CodedConcept(str(item.CodeValue), str(item.CodingSchemeDesignator),
                                            str(item.CodeMeaning)))
        except (AttributeError, TypeError, ValueError):  # a vendor's incomplete item: not ours to repair
            continue
    return found or [default]


def _report(evidence, report, result, digest, manufacturer, predecessors, performed) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR(
        performed_procedure_codes=performed,
        evidence=list({str(ds.SOPInstanceUID): ds for ds in evidence}.values()),  # an instance once
        content=report, series_instance_uid=output_uid(result.study_instance_uid, digest, "sr-series"),
        series_number=SERIES_NUMBER, sop_instance_uid=output_uid(result.study_instance_uid, digest, "sr"),
        instance_number=1, manufacturer=manufacturer, is_complete=False, is_final=False, is_verified=False,
        institution_name=None, previous_versions=list(predecessors) or None)
