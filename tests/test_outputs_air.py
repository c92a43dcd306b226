"""The IHE AI Results set: the attention map as a DICOM SEG, a Key Object Selection, and the SR that
references the SEG; judged by dciodvfy, PixelMed's TID 1500 check, DCMTK's dsrdump and highdicom."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from conftest import pixelmed_sr_check, require_tool, to_multi_frame
from node.bundle import load_bundle
from node.inference import Engine, StudyResult
from node.outputs.kos import make_kos
from node.outputs.sc import make_sc_series
from node.outputs.seg import attention_probability, make_seg
from node.outputs.sr import make_sr
from node.phantom import PhantomOptions, generate_study, write_study
from node.series import SeriesIndex, index_series, source_slice
from node.validation import dciodvfy

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
DATA = PhantomOptions(matrix=256, slices=64, slice_spacing_mm=4.5, min_embolus_mm=10.0,
                      embolus_levels=("central", "lobar"))
SHA = "f" * 64


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[StudyResult, SeriesIndex, list[pydicom.Dataset], Path]:
    folder = tmp_path_factory.mktemp("ct")
    paths = write_study(generate_study(940001, pe=True, options=DATA), folder)["ctpa"]
    index = index_series(paths)
    result = Engine(DEMO, device="cpu").analyze(index)
    return result, index, [pydicom.dcmread(p, stop_before_pixels=True) for p in index.paths], folder


def _seg(result, index, headers, **kw) -> list[hd.seg.Segmentation]:
    manifest = load_bundle(DEMO).manifest
    return make_seg(result, index, headers, model_sha256=SHA, spec=manifest.spec(), cam_stride=manifest.cam_stride,
                    **kw)


def _valid(ds: pydicom.Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)
    require_tool("dciodvfy")
    verdict = dciodvfy(path)
    assert not verdict.errors, verdict.errors


def test_the_seg_holds_the_attention_probabilities_above_the_floor_and_reads_back_within_its_quantisation(
        study, tmp_path):
    result, index, headers, _ = study
    seg = _seg(result, index, headers, floor=0.5)[0]
    _valid(seg, tmp_path / "seg.dcm")
    back = hd.seg.segread(tmp_path / "seg.dcm")
    assert back.SegmentationType == "FRACTIONAL" and back.SegmentationFractionalType == "PROBABILITY"
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    manifest = load_bundle(DEMO).manifest
    expected = np.stack([attention_probability(result, i, index.shape, index.pixel_spacing_mm, manifest.spec(),
                                               manifest.cam_stride) for i in range(len(index))])
    expected = np.where(expected >= 0.5, expected, 0.0)
    kept = [i for i in range(len(index)) if expected[i].any()]
    assert 0 < len(kept) < len(index) and int(back.NumberOfFrames) == len(kept)  # frames only above the floor
    uids = [index.sop_instance_uids[i] for i in kept]
    pixels = back.get_pixels_by_source_instance(uids, segment_numbers=[1], rescale_fractional=True)[..., 0]
    assert np.abs(pixels - expected[kept]).max() <= 0.5 / 255 + 1e-6
    for item in back.PerFrameFunctionalGroupsSequence:  # every frame names the CT image it was derived from
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID in uids and ref.ReferencedSOPClassUID == headers[0].SOPClassUID
    assert back.StudyInstanceUID == result.study_instance_uid and back.PatientID == headers[0].PatientID


def test_the_seg_has_deterministic_uids_an_optional_binary_instance_and_none_when_nothing_reaches_the_floor(study,
                                                                                                          tmp_path):
    result, index, headers, _ = study
    a, b = _seg(result, index, headers), _seg(result, index, headers)
    assert a[0].SOPInstanceUID == b[0].SOPInstanceUID and len(a) == 1
    both = _seg(result, index, headers, binary_threshold=0.9)
    assert [s.SegmentationType for s in both] == ["FRACTIONAL", "BINARY"]
    assert both[1].SeriesInstanceUID == both[0].SeriesInstanceUID != both[1].SOPInstanceUID
    _valid(both[1], tmp_path / "binary.dcm")
    quiet = StudyResult(**{**result.__dict__, "cams": np.full_like(result.cams, -8.0)})
    assert _seg(quiet, index, headers) == []


def test_the_sr_references_the_seg_segment_and_passes_pixelmed_with_no_error_and_no_warning(study, tmp_path):
    result, index, headers, _ = study
    seg = _seg(result, index, headers)[0]
    keys = [headers[k.index] for k in result.key_slices]
    sr = make_sr(result, keys, model_sha256=SHA, segmentation=seg)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    verdict = dciodvfy(path)
    assert not verdict.errors and all("99PETRIAGE" in w for w in verdict.warnings)
    report = pixelmed_sr_check(path)
    assert "Found Root Template TID_1500" in report and "Root Template Validation Complete" in report
    assert "Error" not in report and "Warning" not in report, report
    dump = subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60).stdout
    assert '"Referenced Segment")=(SG image' in dump and '"Finding Site")=(81040000,SCT,"Pulmonary artery")' in dump
    assert '(C0034375,UMLS,"Qualitative Evaluations")' in subprocess.run(
        [require_tool("dsrdump"), "+Pc", str(path)], capture_output=True, text=True, timeout=60).stdout
    read = hd.sr.srread(path)
    exam = read.PerformedProcedureCodeSequence[0]
    source = headers[0].get("ProcedureCodeSequence")
    assert (exam.CodeValue, exam.CodingSchemeDesignator) == \
        ((source[0].CodeValue, source[0].CodingSchemeDesignator) if source else ("36147-7", "LN"))
    group = read.content.get_volumetric_roi_measurement_groups()[0]
    assert group.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    evidence = {i.ReferencedSOPInstanceUID for s in read.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence


def test_the_sr_without_a_seg_keeps_the_attention_peaks_and_passes_pixelmed_with_no_warning(study, tmp_path):
    result, index, headers, _ = study
    path = tmp_path / "sr.dcm"
    keys = [pydicom.Dataset(headers[k.index]) for k in result.key_slices]
    for ds in keys:  # a CT whose header names no procedure: the SR names CT angiography of the pulmonary arteries
        ds.pop("ProcedureCodeSequence", None)
    make_sr(result, keys, model_sha256=SHA).save_as(path)
    exam = pydicom.dcmread(path).PerformedProcedureCodeSequence[0]
    assert (exam.CodeValue, exam.CodeMeaning) == ("36147-7", "CTA Pulmonary arteries W contrast IV")
    report = pixelmed_sr_check(path)
    assert "Root Template Validation Complete" in report and "Error" not in report and "Warning" not in report, report


def test_the_kos_flags_the_key_images_and_references_sr_sc_and_seg(study, tmp_path):
    result, index, headers, _ = study
    seg = _seg(result, index, headers)[0]
    keys = [headers[k.index] for k in result.key_slices]
    sr = make_sr(result, keys, model_sha256=SHA, segmentation=seg)
    manifest = load_bundle(DEMO).manifest
    sc = make_sc_series(result, [source_slice(index, k.index) for k in result.key_slices], model_sha256=SHA,
                        spec=manifest.spec(), cam_stride=manifest.cam_stride)
    kos = make_kos(result, keys, [sr, *sc, seg], model_sha256=SHA)
    path = tmp_path / "kos.dcm"
    _valid(kos, path)
    dump = subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60).stdout
    assert '"Of Interest"' in dump and "not for diagnostic use" in dump
    referenced = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for item in pydicom.dcmread(path).ContentSequence if item.ValueType in ("IMAGE", "COMPOSITE")]
    expected = [k.sop_instance_uid for k in result.key_slices] + [sr.SOPInstanceUID, *(s.SOPInstanceUID for s in sc),
                                                                 seg.SOPInstanceUID]
    assert referenced == expected


def test_an_enhanced_ct_source_gets_a_seg_on_its_frames_and_a_kos_naming_its_key_frames(study, tmp_path):
    result, index, headers, _ = study
    multi = to_multi_frame(index.paths[0].parent, tmp_path / "mf")
    mindex = index_series([multi])
    enhanced = Engine(DEMO, device="cpu").analyze(mindex)
    header = pydicom.dcmread(multi, stop_before_pixels=True)
    seg = _seg(enhanced, mindex, [header] * len(mindex))[0]
    _valid(seg, tmp_path / "seg.dcm")
    frames = {int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
              for item in seg.PerFrameFunctionalGroupsSequence}
    single = _seg(result, index, headers)[0]
    assert len(frames) == int(single.NumberOfFrames)  # the same slices above the floor, as frames
    keys = [header] * len(enhanced.key_slices)
    kos = make_kos(enhanced, keys, [make_sr(enhanced, keys, model_sha256=SHA, segmentation=seg), seg],
                   model_sha256=SHA)
    _valid(kos, tmp_path / "kos.dcm")
    image = next(item for item in kos.ContentSequence if item.ValueType == "IMAGE")
    named = image.ReferencedSOPSequence[0].ReferencedFrameNumber
    assert sorted(int(f) for f in (named if isinstance(named, pydicom.multival.MultiValue) else [named])) == \
        sorted(k.frame_number for k in enhanced.key_slices)


def test_the_sr_names_the_exam_by_the_procedure_code_the_ct_header_carries(study, tmp_path):
    result, _, headers, _ = study
    keys = [pydicom.Dataset(headers[k.index]) for k in result.key_slices]
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "CTPE1", "99RIS", "CT pulmonary angiogram"
    for ds in keys:
        ds.ProcedureCodeSequence = [item]
    path = tmp_path / "sr.dcm"
    make_sr(result, keys, model_sha256=SHA).save_as(path)
    exam = pydicom.dcmread(path).PerformedProcedureCodeSequence
    assert [(e.CodeValue, e.CodingSchemeDesignator, e.CodeMeaning) for e in exam] == \
        [("CTPE1", "99RIS", "CT pulmonary angiogram")]
    assert not dciodvfy(path).errors
