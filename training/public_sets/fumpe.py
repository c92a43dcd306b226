"""FUMPE (Masoudi et al., Sci Data 2018; 35 CTPA studies with PE, every slice's emboli outlined) into
the RSNA-STR PE layout.

Layout read (the figshare collection, unpacked)::

    SRC/CT_scans/<PAT>/*.dcm            one CTPA series per patient (PAT001 ... PAT035)
    SRC/GroundTruth/<PAT>.mat           a MATLAB file holding one 3-D array (Rows x Columns x images),
                                        non-zero inside an embolus

The mask's third axis runs over the patient's images in InstanceNumber order (the order the
figshare files are numbered in); ``mask_order="reversed"`` reads it the other way for a copy whose
planes were stored feet first. A MATLAB v5 file is read with scipy, a v7.3 (HDF5) file with h5py
(which sees the axes transposed; they are put back). The array is taken by name when one is called
``mask``, ``gt`` or ``groundtruth`` (any case), otherwise it must be the only 3-D array in the file.
The DICOM files are linked (or copied) under DST/train unchanged, so the pixels are the source's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from training import TrainingError
from training.public_sets.layout import ImportedStudy, RsnaLayout

NAMES = ("mask", "gt", "groundtruth", "ground_truth")


def find_cases(src: Path) -> list[tuple[str, Path, Path | None]]:
    """(patient, DICOM folder, .mat or None) for every folder under SRC/CT_scans, sorted."""
    scans = Path(src) / "CT_scans"
    if not scans.is_dir():
        raise TrainingError(f"{src}: no CT_scans/ folder (expected the FUMPE layout: CT_scans/<PAT>/*.dcm, "
                            "GroundTruth/<PAT>.mat)")
    out = []
    for folder in sorted(p for p in scans.iterdir() if p.is_dir()):
        mat = Path(src) / "GroundTruth" / f"{folder.name}.mat"
        out.append((folder.name, folder, mat if mat.is_file() else None))
    if not out:
        raise TrainingError(f"{scans}: no patient folders")
    return out


def read_mask_volume(path: Path) -> np.ndarray:
    """The 3-D mask array of a FUMPE .mat file as (Rows, Columns, images)."""
    import h5py
    from scipy.io import loadmat

    arrays: dict[str, np.ndarray] = {}
    try:
        if h5py.is_hdf5(path):  # MATLAB v7.3
            with h5py.File(path, "r") as fh:
                for k, v in fh.items():
                    if isinstance(v, h5py.Dataset):
                        arrays[k] = np.asarray(v).transpose()  # MATLAB is column-major
        else:
            arrays = {k: np.asarray(v) for k, v in loadmat(str(path)).items() if not k.startswith("__")}
    except Exception as exc:  # noqa: BLE001 - scipy and h5py raise several types for a damaged file
        raise TrainingError(f"cannot read {path.name}: {exc}") from exc
    cubes = {k: v for k, v in arrays.items() if v.ndim == 3}
    named = [k for k in cubes if k.lower() in NAMES]
    if named:
        return cubes[named[0]]
    if len(cubes) != 1:
        raise TrainingError(f"{path.name}: {len(cubes)} 3-D arrays ({', '.join(sorted(cubes)) or 'none'}); "
                            f"expected one, or one named {', '.join(NAMES)}")
    return next(iter(cubes.values()))


def import_case(patient: str, folder: Path, mat: Path | None, layout: RsnaLayout, *, mask_order: str = "instance",
                copy: bool = False) -> ImportedStudy:
    """Link one FUMPE study into the layout with its masks; raises TrainingError with the reason."""
    if mat is None:
        raise TrainingError(f"no GroundTruth/{patient}.mat")
    if mask_order not in ("instance", "reversed"):
        raise TrainingError(f"mask order {mask_order!r} is not instance or reversed")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    headers, other = [], []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except InvalidDicomError:  # a thumbnail or a text file beside the images: not part of the series
            other.append(f.name)
            continue
        if "SOPInstanceUID" in ds:
            headers.append((int(ds.get("InstanceNumber", 0) or 0), f, ds))
    if not headers:
        raise TrainingError(f"CT_scans/{patient}: no DICOM images")
    series = {str(ds.SeriesInstanceUID) for _, _, ds in headers}
    if len(series) != 1:
        raise TrainingError(f"CT_scans/{patient}: {len(series)} series (expected one CTPA)")
    headers.sort(key=lambda t: t[0])
    cube = read_mask_volume(mat)
    first = headers[0][2]
    if cube.shape != (int(first.Rows), int(first.Columns), len(headers)):
        raise TrainingError(f"{mat.name}: mask {cube.shape} does not match {len(headers)} images of "
                            f"{first.Rows} x {first.Columns}")
    if mask_order == "reversed":
        cube = cube[:, :, ::-1]
    study_uid, series_uid = str(first.StudyInstanceUID), series.pop()
    target = layout.series_folder(study_uid, series_uid)
    sops = []
    for _, f, ds in headers:
        sop = str(ds.SOPInstanceUID)
        dest = target / f"{sop}.dcm"
        if not dest.exists():
            if copy:
                shutil.copyfile(f, dest)
            else:
                os.symlink(f.resolve(), dest)
        sops.append(sop)
    study = ImportedStudy(study_uid, series_uid, sops, [cube[:, :, k] > 0 for k in range(len(sops))], patient,
                          {"files_not_dicom": other} if other else {})
    layout.add(study)
    return study
