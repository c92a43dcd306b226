"""The RSNA-STR PE layout: train.csv labels per image that match the masks, sparse masks in the
documented format, and the same dataset for the same seed."""

from __future__ import annotations

import csv
import json
from collections import defaultdict

import numpy as np
import pydicom
import pytest

from conftest import SMALL
from node.phantom import write_rsna_dataset
from node.phantom.dataset import RSNA_COLUMNS


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    write_rsna_dataset(root, studies=6, positive_fraction=0.5, seed=3, options=SMALL, annotated_fraction=1.0,
                       annotated_slice_fraction=0.5)
    return root


def rows_by_study(root):
    with (root / "train.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == RSNA_COLUMNS
        out = defaultdict(list)
        for row in reader:
            out[row["StudyInstanceUID"]].append(row)
    return out


def test_train_csv_has_one_row_per_image_file_and_the_rsna_columns(dataset):
    rows = rows_by_study(dataset)
    truth = json.loads((dataset / "phantom.json").read_text())["studies"]
    assert len(rows) == 6 and sum(t["pe_present"] for t in truth) == 3
    for study_uid, study_rows in rows.items():
        assert len(study_rows) == SMALL.slices
        for row in study_rows:
            path = dataset / "train" / study_uid / row["SeriesInstanceUID"] / f"{row['SOPInstanceUID']}.dcm"
            assert path.is_file()


def test_image_labels_and_study_labels_agree_with_the_ground_truth(dataset):
    rows = rows_by_study(dataset)
    for t in json.loads((dataset / "phantom.json").read_text())["studies"]:
        study_rows = rows[t["study_instance_uid"]]
        positives = sum(int(r["pe_present_on_image"]) for r in study_rows)
        assert positives == t["positive_slices"]
        assert all(int(r["negative_exam_for_pe"]) == (0 if t["pe_present"] else 1) for r in study_rows)
        assert (positives > 0) == t["pe_present"]
        central = any(e["level"] == "central" for e in t["emboli"])
        assert all(int(r["central_pe"]) == int(central) for r in study_rows)


def test_sparse_masks_cover_some_positive_images_of_annotated_studies_only(dataset):
    rows = rows_by_study(dataset)
    masks = sorted((dataset / "masks").glob("*.npz"))
    assert len(masks) == 3  # every positive study is annotated here, no negative one
    for path in masks:
        study_uid = path.stem
        label = {r["SOPInstanceUID"]: int(r["pe_present_on_image"]) for r in rows[study_uid]}
        with np.load(path) as npz:
            uids, mask = list(npz["sop_instance_uid"]), npz["mask"]
        assert mask.dtype == np.uint8 and mask.shape == (len(uids), SMALL.matrix, SMALL.matrix)
        assert 1 <= len(uids) <= sum(label.values())
        for uid, m in zip(uids, mask, strict=True):
            assert label[uid] == 1 and m.sum() > 0
            series_uid = rows[study_uid][0]["SeriesInstanceUID"]
            ds = pydicom.dcmread(dataset / "train" / study_uid / series_uid / f"{uid}.dcm")
            hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            # in the image's own pixel order: the masked pixels are the dark filling defect
            assert hu[m > 0].mean() < 200


def test_the_same_seed_writes_the_same_dataset_with_one_or_two_workers(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_rsna_dataset(a, studies=2, seed=11, options=SMALL, workers=1)
    write_rsna_dataset(b, studies=2, seed=11, options=SMALL, workers=2)
    assert (a / "train.csv").read_text() == (b / "train.csv").read_text()
    assert json.loads((a / "phantom.json").read_text()) == json.loads((b / "phantom.json").read_text())
