"""The node's result objects, judged by validators no one here wrote: dciodvfy, PixelMed, DCMTK dsrdump."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import pixelmed_sr_check, require_tool, to_multi_frame
from node.bundle import load_bundle
from node.inference import Engine, StudyResult
from node.outputs.sc import make_sc_series
from node.outputs.sr import PE_PROBABILITY, make_sr
from node.phantom import PhantomOptions, generate_study, write_study
from node.selection import choose_ctpa
from node.series import index_series, source_slice
from node.validation import dciodvfy

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo"
DATA = PhantomOptions(matrix=256, slices=64, slice_spacing_mm=4.5, min_embolus_mm=10.0,
                      embolus_levels=("central", "lobar"))


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> dict[bool, tuple[StudyResult, dict[str, Path]]]:
    engine = Engine(DEMO, device="cpu")
    out = {}
    for seed, pe in ((920001, True), (920002, False)):
        paths = write_study(generate_study(seed, pe=pe, options=DATA), tmp_path_factory.mktemp(str(seed)))["ctpa"]
        by_sop = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
        out[pe] = (engine.analyze(index_series(paths)), by_sop)
    return out


def _sha() -> str:
    return load_bundle(DEMO).manifest.files[0].sha256


def _sr(result: StudyResult, by_sop: dict[str, Path]) -> hd.sr.Comprehensive3DSR:
    keys = [pydicom.dcmread(by_sop[k.sop_instance_uid], stop_before_pixels=True) for k in result.key_slices]
    return make_sr(result, keys, model_sha256=_sha())


@pytest.mark.parametrize("pe", [True, False])
def test_the_sr_is_a_valid_tid_1500_report_with_the_finding_and_probability(analysed, tmp_path, pe):
    result, by_sop = analysed[pe]
    path = tmp_path / "sr.dcm"
    _sr(result, by_sop).save_as(path)
    require_tool("dciodvfy")
    verdict = dciodvfy(path)
    assert not verdict.errors
    assert all("99PETRIAGE" in w for w in verdict.warnings)  # only our declared private coding scheme
    report = pixelmed_sr_check(path)
    assert "Found Root Template TID_1500" in report and "Root Template Validation Complete" in report
    assert "Error" not in report, report
    dump = subprocess.run([require_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60).stdout
    assert '"Procedure reported")=(25045-6,LN' in dump
    value = '(52101004,SCT,"Present")' if result.positive else '(2667000,SCT,"Absent")'
    assert f'"Pulmonary embolism")={value}' in dump
    assert dump.count("Probability of pulmonary embolism") == 1 and dump.count("SCOORD3D") == 0


def test_the_sr_reads_back_with_highdicom_with_probability_regions_and_evidence(analysed):
    result, by_sop = analysed[True]
    sr = hd.sr.srread(pydicom.filebase.DicomBytesIO(_write(_sr(result, by_sop))))
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(result.key_slices)
    referenced = {g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID for g in groups}
    assert referenced == {k.sop_instance_uid for k in result.key_slices}
    values = [m.value for g in sr.content.get_image_measurement_groups() for m in g.get_measurements(PE_PROBABILITY)]
    assert values == [pytest.approx(result.probability, abs=1e-6)]
    evidence = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                for s in sr.CurrentRequestedProcedureEvidenceSequence for item in s.ReferencedSeriesSequence}
    assert evidence  # every referenced image is listed as evidence


def test_outputs_have_deterministic_uids_so_a_resend_is_a_duplicate(analysed):
    result, by_sop = analysed[True]
    a, b = _sr(result, by_sop), _sr(result, by_sop)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    other = make_sr(result, [pydicom.dcmread(by_sop[k.sop_instance_uid], stop_before_pixels=True)
                             for k in result.key_slices], model_sha256="0" * 64)
    assert other.SOPInstanceUID != a.SOPInstanceUID  # another model is another report


def test_the_secondary_capture_series_shows_key_slices_and_a_summary_and_validates(analysed, tmp_path):
    result, by_sop = analysed[True]
    index = index_series(list(by_sop.values()))
    sources = [source_slice(index, k.index) for k in result.key_slices]
    manifest = load_bundle(DEMO).manifest
    images = make_sc_series(result, sources, model_sha256=_sha(), spec=manifest.spec(), cam_stride=manifest.cam_stride)
    for i, ds in enumerate(images):
        Image.fromarray(ds.pixel_array).save(tmp_path / f"sc{i}.png")
    assert len(images) == len(result.key_slices) + 1
    for i, ds in enumerate(images):
        path = tmp_path / f"sc{i}.dcm"
        ds.save_as(path)
        assert not dciodvfy(path).errors, dciodvfy(path).errors
        back = pydicom.dcmread(path)
        assert back.StudyInstanceUID == result.study_instance_uid and back.PatientID == sources[0].dataset.PatientID
        assert back.SamplesPerPixel == 3 and back.pixel_array.shape[-1] == 3
        assert "not for diagnostic use" in back.DerivationDescription
    overlay = images[0].pixel_array.astype(int)
    assert np.abs(overlay[..., 0] - overlay[..., 2]).max() > 50  # coloured, not a grey copy
    assert images[0].SourceImageSequence[0].ReferencedSOPInstanceUID == result.key_slices[0].sop_instance_uid
    assert len({ds.SeriesInstanceUID for ds in images}) == 1


def _write(ds: pydicom.Dataset) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def test_an_enhanced_ct_study_is_analysed_frame_by_frame_and_its_outputs_reference_frames(analysed, tmp_path):
    result, by_sop = analysed[True]
    multi = to_multi_frame(next(iter(by_sop.values())).parent, tmp_path / "mf")
    header = pydicom.dcmread(multi, stop_before_pixels=True)
    assert header.SOPClassUID.name == "Legacy Converted Enhanced CT Image Storage"
    assert int(header.NumberOfFrames) == len(by_sop)
    choice = choose_ctpa([multi])
    assert "frames of Legacy Converted Enhanced CT" in choice.reason
    index = index_series(choice.paths, choice.headers)
    assert len(index) == len(by_sop) and set(index.frame_numbers) == set(range(1, len(by_sop) + 1))
    single = index_series(list(by_sop.values()))
    assert np.allclose(index.positions_mm, single.positions_mm)  # the same head-first order, whatever the frame order
    enhanced = Engine(DEMO, device="cpu").analyze(index)
    assert enhanced.probability == pytest.approx(result.probability, abs=1e-5)
    assert [k.index for k in enhanced.key_slices] == [k.index for k in result.key_slices]
    assert all(k.sop_instance_uid == str(header.SOPInstanceUID) and k.frame_number for k in enhanced.key_slices)

    sr_path = tmp_path / "sr.dcm"
    make_sr(enhanced, [header] * len(enhanced.key_slices), model_sha256=_sha()).save_as(sr_path)
    assert not dciodvfy(sr_path).errors, dciodvfy(sr_path).errors
    report = pixelmed_sr_check(sr_path)
    assert "Root Template Validation Complete" in report and "Error" not in report, report
    sr = hd.sr.srread(sr_path)
    frames = [g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber
              for g in sr.content.get_planar_roi_measurement_groups()]
    assert [int(f) for f in frames] == [k.frame_number for k in enhanced.key_slices]
    assert len(sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence) == 1

    manifest = load_bundle(DEMO).manifest
    sources = [source_slice(index, k.index, header) for k in enhanced.key_slices]
    images = make_sc_series(enhanced, sources, model_sha256=_sha(), spec=manifest.spec(),
                            cam_stride=manifest.cam_stride)
    for i, ds in enumerate(images):
        path = tmp_path / f"sc{i}.dcm"
        ds.save_as(path)
        assert not dciodvfy(path).errors, dciodvfy(path).errors
    assert images[0].SourceImageSequence[0].ReferencedFrameNumber == enhanced.key_slices[0].frame_number
    single_sc = make_sc_series(result, [source_slice(single, k.index) for k in result.key_slices], model_sha256=_sha(),
                               spec=manifest.spec(), cam_stride=manifest.cam_stride)
    assert np.array_equal(images[0].pixel_array, single_sc[0].pixel_array)  # the same picture from either form
