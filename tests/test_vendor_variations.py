"""Vendor variations the node handles on purpose, each analysed end to end by the real worker.

Each test takes a phantom CTPA, changes it the way a vendor or an archive does, spools it and lets
the worker analyse it: the study must be analysed (or the variation dealt with as said here), never
skipped for a header that is odd but valid enough, never "internal error".
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import SMALL, to_multi_frame
from node.assembly import Assembler
from node.config import StudySettings
from node.inference import Engine
from node.phantom import generate_study, write_study
from node.selection import _split_overlapping
from node.store import JobState, Received, Store
from node.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2026, 12, 4, 12, 0, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(ROOT / "models" / "demo", device="cpu")


@pytest.fixture
def study(tmp_path) -> list[Path]:
    """A phantom CTPA's files, head first."""
    paths = write_study(generate_study(601, pe=True, options=SMALL), tmp_path / "s")["ctpa"]
    return sorted(paths, key=lambda p: -float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def analyse(tmp_path: Path, paths: list[Path], engine: Engine) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        store.record_instance(Received(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                       str(ds.SOPClassUID), "1.2.840.10008.1.2.1", p, p.stat().st_size, "MODALITY"),
                              T0)
    later = lambda: T0 + dt.timedelta(minutes=5)  # noqa: E731
    Assembler(store, StudySettings(quiet_seconds=20, max_wait_seconds=300), later).sweep()
    done = Worker(store, engine, owner="test", clock=later).run_once()
    assert done is not None
    assert not done["reason"].startswith("internal error"), done["reason"]
    return done


def _edit(paths: list[Path], change) -> None:
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        change(k, ds)
        ds.save_as(p)


def _probability(done: dict) -> float:
    return float(json.loads(done["result"])["probability"])


def test_decimal_strings_with_many_digits_and_spaces_are_read_as_numbers(tmp_path, study, engine):
    reference = analyse(tmp_path / "a", study, engine)

    def change(k, ds):  # the same values, written long (beyond DS's 16 characters) and padded
        ds["ImagePositionPatient"].value = [f" {float(v):.13f}" for v in ds.ImagePositionPatient]
        ds["PixelSpacing"].value = [f"{float(v):.14f} " for v in ds.PixelSpacing]
        ds["RescaleIntercept"].value = f" {float(ds.RescaleIntercept):.6f} "

    _edit(study, change)
    done = analyse(tmp_path / "b", study, engine)
    assert done["state"] == JobState.DONE
    assert abs(_probability(done) - _probability(reference)) < 1e-3


def test_integer_strings_written_as_decimals_are_accepted(tmp_path, study, engine):
    _edit(study, lambda k, ds: (setattr(ds, "InstanceNumber", f"{k + 1}.0"), setattr(ds, "SeriesNumber", "3.0")))
    assert analyse(tmp_path, study, engine)["state"] == JobState.DONE


def test_a_series_without_slice_thickness_is_analysed_on_its_spacing(tmp_path, study, engine):
    _edit(study, lambda k, ds: delattr(ds, "SliceThickness"))
    done = analyse(tmp_path, study, engine)
    assert done["state"] == JobState.DONE and json.loads(done["result"])["slices"] == SMALL.slices


def test_a_gantry_tilted_series_is_sorted_along_its_normal_and_analysed(tmp_path, study, engine):
    tilt = np.radians(15.0)

    def change(k, ds):  # rows stay x; columns tilt about x; positions still step along z only
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(-np.sin(tilt))]
        ds.GantryDetectorTilt = 15.0

    _edit(study, change)
    done = analyse(tmp_path, study, engine)
    assert done["state"] == JobState.DONE and json.loads(done["result"])["slices"] == SMALL.slices


def test_two_acquisitions_at_the_same_positions_in_one_series_are_two_candidates_and_the_later_is_analysed(
        tmp_path, study, engine):
    again = tmp_path / "again"
    again.mkdir()
    copies = []
    for k, p in enumerate(study):  # a repeated acquisition, same series, same positions, new instances
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(
            entropy_srcs=[str(ds.SOPInstanceUID), "again"])
        ds.AcquisitionNumber = 2
        ds.InstanceNumber = len(study) + k + 1
        copies.append(again / p.name)
        ds.save_as(copies[-1])
    _edit(study, lambda k, ds: setattr(ds, "AcquisitionNumber", 1))
    done = analyse(tmp_path, study + copies, engine)
    assert done["state"] == JobState.DONE
    result = json.loads(done["result"])
    assert result["slices"] == SMALL.slices and "(acquisition 2, kernel" in result["series"]["reason"]
    chosen = {k["sop_instance_uid"] for k in result["key_slices"]}
    assert chosen <= {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in copies}


def test_a_series_mixing_a_lung_kernel_at_the_same_positions_is_analysed_on_its_soft_tissue_kernel(
        tmp_path, study, engine):
    lung = tmp_path / "lung"
    lung.mkdir()
    copies = []
    for p in study:
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(
            entropy_srcs=[str(ds.SOPInstanceUID), "lung"])
        ds.ConvolutionKernel = "LUNG"
        copies.append(lung / p.name)
        ds.save_as(copies[-1])
    done = analyse(tmp_path, copies + study, engine)
    assert done["state"] == JobState.DONE
    assert "kernel LUNG" not in json.loads(done["result"])["series"]["reason"].split(" (")[0]


def test_a_slice_of_another_size_at_the_end_is_left_out_and_the_rest_analysed(tmp_path, study, engine):
    ds = pydicom.dcmread(study[-1])
    ds.Rows = ds.Columns = 64
    ds.PixelData = np.zeros((64, 64), dtype=np.uint16).tobytes()
    ds.save_as(study[-1])
    done = analyse(tmp_path, study, engine)
    assert done["state"] == JobState.DONE and json.loads(done["result"])["slices"] == SMALL.slices - 1
    assert "64x64 pixels where the series has 128x128" in json.loads(done["result"])["excluded"][0]


def test_a_series_of_single_frame_and_multi_frame_instances_is_analysed_as_one_volume(tmp_path, study, engine):
    half = tmp_path / "half"
    half.mkdir()
    for p in study[: len(study) // 2]:
        shutil.move(p, half / p.name)
    multi = to_multi_frame(half, tmp_path / "multi")
    series = str(pydicom.dcmread(study[-1], stop_before_pixels=True).SeriesInstanceUID)
    ds = pydicom.dcmread(multi)
    ds.SeriesInstanceUID = series  # one series, as a vendor that converts part of it would send it
    ds.save_as(multi)
    done = analyse(tmp_path, [multi, *study[len(study) // 2:]], engine)
    assert done["state"] == JobState.DONE, done["reason"]
    assert json.loads(done["result"])["slices"] == SMALL.slices


def test_a_tilted_second_reconstruction_with_another_field_at_the_same_slices_is_a_separate_candidate(
        tmp_path, study):
    tilt = np.radians(20.0)
    column = np.array([0.0, np.cos(tilt), -np.sin(tilt)])
    normal = np.cross([1.0, 0.0, 0.0], column)
    # The first reconstruction: tilted planes one spacing apart along the normal. The second: the same
    # planes, its field moved 30 mm down the column direction, so every corner has another z.
    items = []
    for acquisition, shift in ((1, 0.0), (2, 30.0)):
        for k, p in enumerate(study):
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, *column.tolist()]
            ds.ImagePositionPatient = (-100.0 * np.array([1.0, 1.0, 0.0]) + 5.0 * k * normal + shift * column).tolist()
            ds.AcquisitionNumber = acquisition
            ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), str(acquisition)])
            items.append((p, ds))
    parts = _split_overlapping(items)
    assert sorted(len(members) for members in parts.values()) == [len(study), len(study)]
    assert any("acquisition 2" in label for label in parts)
