"""CAD-PE and FUMPE become the RSNA-STR PE layout that training reads, masks on the right images.

The sets cannot be downloaded here, so each test writes a small volume in the set's layout (NRRD
volumes and label maps; DICOM files and a MATLAB v5 or v7.3 mask), imports it through the CLI and
reads it back with the training package's own reader, series reader and cache.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import nrrd
import numpy as np
import pydicom
import pytest
from scipy.io import savemat

from conftest import require_tool
from node.preprocess import PreprocessSpec
from node.series import read_volume
from node.validation import dciodvfy
from training.cli import main
from training.data import build_cache, read_rsna
from training.public_sets.fumpe import read_mask_volume

SLICES, SIZE = 10, 48
CLOT_SLICES = (4, 5, 6)


def chest(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(HU, label map) as (slices, rows, columns): lung, one bright artery, a clot in it on three slices."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    hu = np.full((SLICES, SIZE, SIZE), -820.0) + rng.normal(0, 5, (SLICES, SIZE, SIZE))
    artery = (yy - 20) ** 2 + (xx - 28) ** 2 <= 36
    clot = (yy - 20) ** 2 + (xx - 28) ** 2 <= 6
    hu[:, artery] = 320.0
    labels = np.zeros(hu.shape, np.uint8)
    for k in CLOT_SLICES:
        hu[k][clot] = 40.0
        labels[k][clot] = 2  # CAD-PE numbers its emboli
    return hu.astype(np.int16), labels


def write_nrrd(path: Path, data: np.ndarray, space: str = "left-posterior-superior", sign: float = 1.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"space": space, "space directions": np.diag([0.7 * sign, 0.7 * sign, 1.25]),
              "space origin": np.array([-16.8 * sign, -16.8 * sign, -100.0])}
    nrrd.write(str(path), data, header, index_order="C")


def cadpe_source(root: Path) -> Path:
    hu, labels = chest()
    write_nrrd(root / "images" / "001.nrrd", hu)
    write_nrrd(root / "rs" / "001RefStd.nrrd", labels)
    write_nrrd(root / "images" / "002.nrrd", hu[::-1].copy(), "right-anterior-superior")
    write_nrrd(root / "rs" / "002_RefStd.nrrd", labels[::-1].copy(), "right-anterior-superior")
    write_nrrd(root / "images" / "003.nrrd", hu)  # no reference standard: reported and skipped
    return root


def rows(dst: Path) -> list[dict]:
    with (dst / "train.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_cad_pe_volumes_become_ct_series_whose_masked_images_hold_the_clot(tmp_path: Path) -> None:
    src, dst = cadpe_source(tmp_path / "cad-pe"), tmp_path / "imported"
    assert main(["import", "cad-pe", str(src), "--out", str(dst)]) == 0
    studies = read_rsna(dst)
    assert len(studies) == 2 and all(s.label == 1 for s in studies)
    for study in studies:
        volume = read_volume(study.files)  # sorted head first along the slice normal
        assert volume.hu.shape == (SLICES, SIZE, SIZE)
        with np.load(study.mask_file) as npz:
            masked = [str(u) for u in npz["sop_instance_uid"]]
            masks = npz["mask"]
        assert len(masked) == len(CLOT_SLICES)
        for uid, mask in zip(masked, masks, strict=True):
            k = volume.sop_instance_uids.index(uid)
            assert np.allclose(volume.hu[k][mask > 0], 40.0)  # the mask sits on the clot's pixels
            assert study.image_labels[uid] == 1
        assert sum(study.image_labels.values()) == len(CLOT_SLICES)
        # head first: the highest z first, whatever order the NRRD stored its slices in
        assert volume.positions_mm[0] > volume.positions_mm[-1]
    skipped = json.loads((dst / "import.json").read_text())["skipped"]
    assert [s["source"] for s in skipped] == ["003"] and "reference standard" in skipped[0]["reason"]


def test_a_ras_header_is_turned_into_dicom_patient_coordinates(tmp_path: Path) -> None:
    src, dst = cadpe_source(tmp_path / "cad-pe"), tmp_path / "imported"
    assert main(["import", "cad-pe", str(src), "--out", str(dst)]) == 0
    by_source = {}
    for p in (dst / "train").rglob("*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        by_source.setdefault(ds.StudyDescription, []).append(ds)
    lps, ras = by_source["CAD-PE 001"][0], by_source["CAD-PE 002"][0]
    assert [float(v) for v in lps.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ras.ImageOrientationPatient] == [-1, 0, 0, 0, -1, 0]
    assert [float(v) for v in ras.ImagePositionPatient][:2] == [16.8, 16.8]


def test_every_imported_ct_image_passes_dciodvfy(tmp_path: Path) -> None:
    require_tool("dciodvfy")
    src, dst = cadpe_source(tmp_path / "cad-pe"), tmp_path / "imported"
    assert main(["import", "cad-pe", str(src), "--out", str(dst)]) == 0
    files = sorted((dst / "train").rglob("*.dcm"))
    assert len(files) == 2 * SLICES
    for p in files[::4]:
        verdict = dciodvfy(p)
        assert not verdict.errors, (p, verdict.errors)


def test_a_second_import_continues_and_writes_the_same_train_csv(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = cadpe_source(tmp_path / "cad-pe"), tmp_path / "imported"
    assert main(["import", "cad-pe", str(src), "--out", str(dst)]) == 0
    first = rows(dst)
    capsys.readouterr()
    assert main(["import", "cad-pe", str(src), "--out", str(dst)]) == 0
    assert "0 studies imported, 2 from an earlier run, 1 skipped" in " ".join(capsys.readouterr().out.split())
    assert rows(dst) == first


def test_an_imported_set_goes_through_the_training_cache(tmp_path: Path) -> None:
    src, dst = cadpe_source(tmp_path / "cad-pe"), tmp_path / "imported"
    assert main(["import", "cad-pe", str(src), "--out", str(dst)]) == 0
    cache = build_cache(read_rsna(dst), PreprocessSpec(size=32), tmp_path / "cache")
    assert len(cache.images) == 2 * SLICES
    for st in cache.studies:
        assert sorted(int(k) for k in st["mask_rows"]) == [k for k, lab in enumerate(st["image_labels"]) if lab == 1]
        assert sum(st["image_labels"]) == len(CLOT_SLICES)


def fumpe_source(root: Path, *, v73: bool = False, planes: int = SLICES) -> Path:
    """PAT001: DICOM files named in InstanceNumber order, feet first in z; GroundTruth/PAT001.mat."""
    hu, labels = chest(1)
    src = root / "CT_scans" / "PAT001"
    src.mkdir(parents=True)
    study, series, frame = (pydicom.uid.generate_uid() for _ in range(3))
    for k in range(SLICES):
        ds = pydicom.Dataset()
        ds.SOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "FUMPE-PAT001", k + 1
        ds.ImagePositionPatient = [-16.8, -16.8, -100.0 + 1.25 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.25
        ds.Rows = ds.Columns = SIZE
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = hu[k].astype("<i2").tobytes()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(src / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
    (src / "readme.txt").write_text("not DICOM")
    cube = np.moveaxis(labels > 0, 0, -1).astype(np.uint8)[:, :, :planes]  # (Rows, Columns, images)
    (root / "GroundTruth").mkdir()
    mat = root / "GroundTruth" / "PAT001.mat"
    if v73:
        with h5py.File(mat, "w") as fh:  # what MATLAB's -v7.3 writes: HDF5, axes reversed
            fh["Mask"] = cube.transpose()
    else:
        savemat(mat, {"Mask": cube, "note": np.array([1.0])})
    return root


@pytest.mark.parametrize("v73", [False, True], ids=["matlab-v5", "matlab-v7.3"])
def test_fumpe_masks_land_on_their_images_in_instance_order(tmp_path: Path, v73: bool) -> None:
    src, dst = fumpe_source(tmp_path / "fumpe", v73=v73), tmp_path / "imported"
    assert read_mask_volume(src / "GroundTruth" / "PAT001.mat").shape == (SIZE, SIZE, SLICES)
    assert main(["import", "fumpe", str(src), "--out", str(dst)]) == 0
    (study,) = read_rsna(dst)
    assert study.label == 1 and len(study.files) == SLICES and all(f.is_symlink() for f in study.files)
    volume = read_volume(study.files)
    with np.load(study.mask_file) as npz:
        for uid, mask in zip(npz["sop_instance_uid"], npz["mask"], strict=True):
            assert np.allclose(volume.hu[volume.sop_instance_uids.index(str(uid))][mask > 0], 40.0)
        assert len(npz["mask"]) == len(CLOT_SLICES)


def test_a_fumpe_mask_with_the_wrong_number_of_planes_is_refused_with_its_shape(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = fumpe_source(tmp_path / "fumpe", planes=SLICES - 1), tmp_path / "imported"
    assert main(["import", "fumpe", str(src), "--out", str(dst)]) == 1  # nothing imported
    out = " ".join(capsys.readouterr().out.split())
    assert "skipped PAT001" in out and f"does not match {SLICES} images" in out
    assert "Traceback" not in out


def test_an_unknown_layout_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import", "cad-pe", str(tmp_path), "--out", str(tmp_path / "x")]) != 0
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert "no images/ folder" in out
