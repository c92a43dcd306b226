"""Write rendered phantom volumes as DICOM CT Image Storage series."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from node.errors import PhantomError
from node.phantom.render import Grid

#: Transfer syntaxes the phantom writes, by the name the CLI uses.
TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
    "rle": RLELossless,
}
#: How InstanceNumber (and the order files are written) relates to position along the body.
ORDERS = ("ascending", "reversed", "shuffled")

RESCALE_INTERCEPT = -1024.0
BITS_STORED = 12
DISCLAIMER = "Synthetic CTPA phantom made by petriage - not patient data"


@dataclass(frozen=True)
class StudyIdentity:
    """Patient and study attributes shared by every series of one phantom study (all synthetic)."""

    seed: int
    study_instance_uid: str
    frame_of_reference_uid: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    accession_number: str
    study_date: str
    study_time: str

    @classmethod
    def from_seed(cls, seed: int) -> StudyIdentity:
        rng = np.random.default_rng([seed, 2718])
        day = dt.date(2026, 1, 1) + dt.timedelta(days=int(rng.integers(0, 330)))
        born = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 60 * 365)))
        return cls(
            seed=seed,
            study_instance_uid=uid_for(seed, "study"),
            frame_of_reference_uid=uid_for(seed, "frame-of-reference"),
            patient_name=f"PHANTOM^CTPA{seed:06d}",
            patient_id=f"PH{seed:08d}",
            patient_birth_date=born.strftime("%Y%m%d"),
            patient_sex=str(rng.choice(["F", "M"])),
            accession_number=f"ACC{seed:09d}"[:16],
            study_date=day.strftime("%Y%m%d"),
            study_time=f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}00",
        )


def uid_for(seed: int, *parts: object) -> str:
    """A UID that depends only on the phantom seed and what it names (same seed, same UIDs)."""
    return generate_uid(entropy_srcs=["petriage-phantom", str(seed), *map(str, parts)])


@dataclass(frozen=True)
class SeriesSpec:
    """What distinguishes one series of a study."""

    kind: str  # "ctpa", "lung", "noncontrast" or "localizer"
    number: int
    description: str
    kernel: str
    contrast: bool
    thickness_mm: float
    window: tuple[float, float]  # centre, width
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    time_offset_s: int = 0


def to_stored(hu: np.ndarray) -> np.ndarray:
    """HU to stored values (unsigned 12 bit, intercept -1024)."""
    return np.clip(np.rint(hu - RESCALE_INTERCEPT), 0, 2**BITS_STORED - 1).astype(np.uint16)


def _series_time(identity: StudyIdentity, offset_s: int) -> str:
    t = dt.datetime.strptime(identity.study_time, "%H%M%S") + dt.timedelta(seconds=60 + offset_s)
    return t.strftime("%H%M%S")


def _base_dataset(identity: StudyIdentity, spec: SeriesSpec, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(spec.image_type)
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = identity.study_date
    ds.StudyTime = identity.study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = _series_time(identity, spec.time_offset_s)
    ds.AccessionNumber = identity.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "petriage"
    ds.InstitutionName = "Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM"
    ds.StudyDescription = "CT ANGIOGRAPHY CHEST (PE PROTOCOL)"
    ds.SeriesDescription = spec.description
    ds.ManufacturerModelName = "petriage phantom"
    ds.SoftwareVersions = "petriage-phantom-1"
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.patient_birth_date
    ds.PatientSex = identity.patient_sex
    if spec.contrast:
        ds.ContrastBolusAgent = "Iohexol 350 mgI/mL"
        ds.ContrastBolusRoute = "IV"
        ds.ContrastBolusVolume = 60
    ds.BodyPartExamined = "CHEST"
    ds.KVP = 100
    ds.DataCollectionDiameter = 500
    ds.ReconstructionDiameter = 360
    ds.GantryDetectorTilt = 0
    ds.TableHeight = 150
    ds.RotationDirection = "CW"
    ds.XRayTubeCurrent = 180
    ds.ConvolutionKernel = spec.kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = identity.study_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{identity.seed % 10**8}"
    ds.SeriesNumber = spec.number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = spec.window
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = DISCLAIMER
    return ds


def _instance_numbers(n: int, order: str, rng: np.random.Generator) -> np.ndarray:
    if order == "ascending":
        return np.arange(1, n + 1)
    if order == "reversed":
        return np.arange(n, 0, -1)
    if order == "shuffled":
        return rng.permutation(n) + 1
    raise PhantomError(f"instance order {order!r} is not one of {', '.join(ORDERS)}")


def axial_series(hu: np.ndarray, grid: Grid, identity: StudyIdentity, spec: SeriesSpec,
                 order: str = "ascending") -> list[Dataset]:
    """One CT Image Storage dataset per axial slice, listed in InstanceNumber order."""
    series_uid = uid_for(identity.seed, "series", spec.kind)
    numbers = _instance_numbers(len(grid.zs), order, np.random.default_rng([identity.seed, spec.number]))
    pixel = grid.pixel_mm
    out = []
    for k, z in enumerate(grid.zs):
        ds = _base_dataset(identity, spec, series_uid)
        ds.SOPInstanceUID = uid_for(identity.seed, "instance", spec.kind, k)
        ds.InstanceNumber = int(numbers[k])
        # Decimal strings hold at most 16 characters: 4 decimals of a millimetre are plenty.
        ds.ImagePositionPatient = [round(float(grid.xs[0]), 4), round(float(grid.ys[0]), 4), round(float(z), 4)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = spec.thickness_mm
        ds.SliceLocation = round(float(z), 4)
        ds.PixelSpacing = [round(pixel, 6), round(pixel, 6)]
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.PixelData = to_stored(hu[k]).tobytes()
        out.append(ds)
    return sorted(out, key=lambda d: d.InstanceNumber)


def localizer(hu: np.ndarray, grid: Grid, identity: StudyIdentity) -> Dataset:
    """An anteroposterior scout: attenuation summed along y, resampled to square pixels."""
    spec = SeriesSpec("localizer", 1, "Topogram 0.6 T20f", "T20f", False, 0.6, (1200.0, 2400.0),
                      ("ORIGINAL", "PRIMARY", "LOCALIZER"), time_offset_s=-240)
    mu = np.clip(hu + 1000.0, 0.0, None).sum(axis=1) * grid.pixel_mm  # (z, x) HU*mm
    pixel = grid.pixel_mm
    z_new = np.arange(grid.zs[0], grid.zs[-1] - 1e-6, -pixel)
    rows = np.stack([np.interp(-z_new, -grid.zs, mu[:, j]) for j in range(mu.shape[1])], axis=1)
    scaled = np.clip(rows / max(float(rows.max()), 1.0) * 4000.0, 0, 4095)
    ds = _base_dataset(identity, spec, uid_for(identity.seed, "series", "localizer"))
    ds.SOPInstanceUID = uid_for(identity.seed, "instance", "localizer", 0)
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [round(float(grid.xs[0]), 4), 0.0, round(float(grid.zs[0]), 4)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.SliceThickness = ""
    ds.PixelSpacing = [round(pixel, 6), round(pixel, 6)]
    ds.Rows, ds.Columns = scaled.shape
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    del ds.RescaleType  # projection values are not HU
    ds.PixelData = np.rint(scaled).astype(np.uint16).tobytes()
    return ds


def save(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    """Write one dataset as a DICOM file in the named transfer syntax (lossless only)."""
    try:
        uid = TRANSFER_SYNTAXES[transfer_syntax]
    except KeyError:
        raise PhantomError(
            f"transfer syntax {transfer_syntax!r} is not one of {', '.join(TRANSFER_SYNTAXES)}") from None
    ds = ds.copy()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if uid.is_compressed:
        arr = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
        ds.compress(uid, arr, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = uid
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
