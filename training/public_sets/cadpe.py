"""CAD-PE (González et al., 2020; 91 CTPA scans, every embolus outlined) into the RSNA-STR PE layout.

Layout read (the challenge's download, unpacked)::

    SRC/images/<case>.nrrd              the CT volume, HU
    SRC/rs/<case>RefStd.nrrd            the reference standard: a label map, > 0 inside an embolus
                                        (``<case>_RefStd.nrrd`` and ``<case>.nrrd`` are read too)

Each volume becomes a CT Image Storage series (one signed 16-bit file per slice, rescale 1 / 0 so the
stored value is the HU, geometry from the NRRD header's ``space``, ``space directions`` and ``space
origin``; RAS headers are turned into DICOM's LPS), with UIDs derived from the case name so a rerun
writes the same ones. Reading NRRD needs ``pynrrd`` (the ``train`` extra).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from training import TrainingError
from training.public_sets.layout import ImportedStudy, RsnaLayout

NOTE = "Imported from CAD-PE by petriage-train for model training"


def find_cases(src: Path) -> list[tuple[str, Path, Path | None]]:
    """(case, image, reference or None) for every ``images/*.nrrd`` under SRC, sorted by case."""
    images = Path(src) / "images"
    if not images.is_dir():
        raise TrainingError(f"{src}: no images/ folder (expected the CAD-PE layout: images/<case>.nrrd, "
                            "rs/<case>RefStd.nrrd)")
    out = []
    for image in sorted(images.glob("*.nrrd")):
        case = image.name[:-len(".nrrd")]
        refs = [Path(src) / "rs" / f"{case}{tail}.nrrd" for tail in ("RefStd", "_RefStd", "")]
        out.append((case, image, next((r for r in refs if r.is_file()), None)))
    if not out:
        raise TrainingError(f"{images}: no .nrrd volumes")
    return out


def _geometry(header: dict, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(origin (3,), directions (3, 3): rows are the column, row and slice steps in LPS mm)."""
    if "space directions" in header:
        dirs = np.array(header["space directions"], dtype=float)
        if dirs.shape != (3, 3) or not np.isfinite(dirs).all():
            raise TrainingError(f"space directions {header['space directions']!r} is not a 3 x 3 matrix")
    elif "spacings" in header:
        dirs = np.diag(np.array(header["spacings"], dtype=float))
    else:
        raise TrainingError("the header has neither 'space directions' nor 'spacings'")
    origin = np.array(header.get("space origin", [0.0, 0.0, 0.0]), dtype=float)
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("right-anterior-superior", "ras"):
        flip = np.array([-1.0, -1.0, 1.0])
        dirs, origin = dirs * flip, origin * flip
    elif space not in ("left-posterior-superior", "lps"):
        raise TrainingError(f"space {space!r} is not LPS or RAS")
    return origin, dirs


def _slice(hu: np.ndarray, k: int, origin: np.ndarray, dirs: np.ndarray, study_uid: str, series_uid: str,
           frame_uid: str, case: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["cad-pe", case, "instance", str(k)])
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ""
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ""
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CAD-PE " + case
    ds.SeriesDescription = "CTPA (imported from CAD-PE)"
    ds.PatientName = ""
    ds.PatientID = "CADPE-" + case
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.KVP = ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = ""
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = ""  # not recorded in the NRRD header
    ds.InstanceNumber = k + 1
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [round(float(v), 4) for v in origin + k * dirs[2]]
    col, row = dirs[0] / np.linalg.norm(dirs[0]), dirs[1] / np.linalg.norm(dirs[1])
    ds.ImageOrientationPatient = [round(float(v), 6) for v in (*col, *row)]
    ds.PixelSpacing = [round(float(np.linalg.norm(dirs[1])), 6), round(float(np.linalg.norm(dirs[0])), 6)]
    ds.SliceThickness = round(float(abs(dirs[2][2]) or np.linalg.norm(dirs[2])), 4)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape[1:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 100, 700
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = NOTE
    ds.PixelData = np.clip(np.rint(hu[k]), -32768, 32767).astype("<i2").tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def import_case(case: str, image: Path, reference: Path | None, layout: RsnaLayout, hu_offset: float = 0.0
                ) -> ImportedStudy:
    """Write one CAD-PE case as a CT series with its masks; raises TrainingError with the reason."""
    import nrrd  # the train extra; imported here so the module loads without it

    if reference is None:
        raise TrainingError(f"no reference standard rs/{case}RefStd.nrrd")
    try:
        hu, header = nrrd.read(str(image), index_order="C")  # (slices, rows, columns)
        ref, _ = nrrd.read(str(reference), index_order="C")
    except Exception as exc:  # noqa: BLE001 - pynrrd raises several types for a damaged file
        raise TrainingError(f"cannot read NRRD: {exc}") from exc
    if hu.ndim != 3:
        raise TrainingError(f"{image.name}: {hu.ndim} dimensions, expected a 3-D volume")
    if ref.shape != hu.shape:
        raise TrainingError(f"reference {ref.shape} and image {hu.shape} differ in shape")
    origin, dirs = _geometry(header, hu.shape)
    hu = hu.astype(np.float32) + hu_offset
    study_uid = generate_uid(entropy_srcs=["cad-pe", case, "study"])
    series_uid = generate_uid(entropy_srcs=["cad-pe", case, "series"])
    frame_uid = generate_uid(entropy_srcs=["cad-pe", case, "frame"])
    folder = layout.series_folder(study_uid, series_uid)
    sops = []
    for k in range(hu.shape[0]):
        ds = _slice(hu, k, origin, dirs, study_uid, series_uid, frame_uid, case)
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        sops.append(str(ds.SOPInstanceUID))
    study = ImportedStudy(study_uid, series_uid, sops, [np.asarray(ref[k]) > 0 for k in range(len(sops))], case,
                          {"emboli_labels": int(len(np.unique(ref[ref > 0])))})
    layout.add(study)
    return study
