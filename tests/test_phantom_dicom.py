"""Phantom studies written as DICOM: valid (dciodvfy), geometrically exact whatever the file order, and
identical in HU whatever the transfer syntax."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import SMALL, require_tool
from node.phantom import COMPANIONS, ORDERS, TRANSFER_SYNTAXES, PhantomOptions, generate_study, write_study
from node.phantom.writer import RESCALE_INTERCEPT
from node.validation import dciodvfy


def hu_of(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def volume_by_slice_normal(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Sort slices by position along the slice normal (never by InstanceNumber or file name)."""
    datasets = [pydicom.dcmread(p) for p in paths]
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float)) for ds in datasets])
    order = np.argsort(-pos)  # head first, as rendered (+z is superior)
    return np.stack([hu_of(datasets[i]) for i in order]), pos[order]


def expected_hu(study) -> np.ndarray:
    return np.clip(np.rint(study.image.hu - RESCALE_INTERCEPT), 0, 4095) + RESCALE_INTERCEPT


@pytest.mark.parametrize("order", ORDERS)
def test_sorting_along_the_slice_normal_recovers_the_volume_whatever_the_file_order(tmp_path, order):
    study = generate_study(33, pe=True, options=PhantomOptions(**{**SMALL.__dict__, "order": order}))
    write_study(study, tmp_path)
    paths = [Path(root) / f for root, _, files in os.walk(tmp_path) for f in files]
    rng = np.random.default_rng(0)
    rng.shuffle(paths)  # whatever order the filesystem or network delivers
    volume, pos = volume_by_slice_normal(paths)
    np.testing.assert_array_equal(volume, expected_hu(study))
    np.testing.assert_allclose(np.diff(pos), -SMALL.slice_spacing_mm, atol=1e-3)
    numbers = [pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber for p in paths]
    assert sorted(numbers) == list(range(1, len(paths) + 1))


def test_geometry_attributes_describe_the_grid(positive_study, tmp_path):
    paths = write_study(positive_study, tmp_path)["ctpa"]
    ds = pydicom.dcmread(paths[0])
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds.PixelSpacing[0]) == pytest.approx(SMALL.fov_mm / SMALL.matrix)
    assert float(ds.SliceThickness) == SMALL.slice_spacing_mm
    assert (ds.Rows, ds.Columns) == (SMALL.matrix, SMALL.matrix)
    assert ds.PatientPosition == "HFS" and ds.FrameOfReferenceUID
    assert ds.ContrastBolusAgent and ds.BodyPartExamined == "CHEST" and ds.Modality == "CT"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert "not patient data" in ds.ImageComments


@pytest.mark.peers
@pytest.mark.parametrize("syntax", list(TRANSFER_SYNTAXES))
def test_every_series_in_every_transfer_syntax_passes_dciodvfy_without_errors(tmp_path, syntax):
    require_tool("dciodvfy")
    opts = PhantomOptions(matrix=96, slices=14, slice_spacing_mm=20.0, transfer_syntax=syntax,
                          companions=COMPANIONS)
    written = write_study(generate_study(7, pe=True, options=opts), tmp_path)
    assert set(written) == {"ctpa", *COMPANIONS}
    checked = 0
    for kind, paths in written.items():
        for path in paths[:: max(1, len(paths) // 3)]:
            verdict = dciodvfy(path)
            assert verdict.errors == (), (kind, syntax, verdict.errors)
            assert verdict.warnings == (), (kind, syntax, verdict.warnings)
            checked += 1
        ds = pydicom.dcmread(paths[0])
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
    assert checked >= 10


@pytest.mark.parametrize("syntax", ["implicit", "jpeg2000", "jpegls", "rle"])
def test_compressed_and_implicit_series_decode_to_the_same_hu_as_explicit_little_endian(tmp_path, syntax):
    study = generate_study(44, pe=True, options=PhantomOptions(**{**SMALL.__dict__, "slices": 16,
                                                                   "slice_spacing_mm": 18.0}))
    plain = write_study(study, tmp_path / "plain")["ctpa"]
    other_study = generate_study(44, pe=True, options=PhantomOptions(
        **{**SMALL.__dict__, "slices": 16, "slice_spacing_mm": 18.0, "transfer_syntax": syntax}))
    other = write_study(other_study, tmp_path / syntax)["ctpa"]
    for a, b in zip(plain, other, strict=True):
        da, db = pydicom.dcmread(a), pydicom.dcmread(b)
        assert da.SOPInstanceUID == db.SOPInstanceUID  # lossless: same instance
        assert db.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
        np.testing.assert_array_equal(hu_of(da), hu_of(db))


def test_companion_series_look_like_what_a_scanner_sends(tmp_path):
    opts = PhantomOptions(matrix=96, slices=120, slice_spacing_mm=2.5, companions=COMPANIONS)
    study = generate_study(9, pe=True, options=opts)
    written = write_study(study, tmp_path)
    scout = pydicom.dcmread(written["localizer"][0])
    assert "LOCALIZER" in scout.ImageType and len(written["localizer"]) == 1
    plain = pydicom.dcmread(written["noncontrast"][0])
    assert "ContrastBolusAgent" not in plain and float(plain.SliceThickness) == 5.0
    lung = pydicom.dcmread(written["lung"][0])
    assert float(lung.SliceThickness) == 5.0 and lung.ConvolutionKernel == "LUNG"
    assert len(written["lung"]) == 60 and len(written["ctpa"]) == 120
    series = {pydicom.dcmread(p[0]).SeriesInstanceUID for p in written.values()}
    studies = {pydicom.dcmread(p[0]).StudyInstanceUID for p in written.values()}
    assert len(series) == 4 and studies == {study.identity.study_instance_uid}
