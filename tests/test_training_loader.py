"""Stage-1 batches built by DataLoader workers are the batches one process builds, step for step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from node.phantom import PhantomOptions, write_rsna_dataset
from node.preprocess import PreprocessSpec
from training.cli import main as train_main
from training.config import load_train_config
from training.crops import CropPlan
from training.data import build_cache, read_rsna
from training.engine import _rows, matched_weights
from training.loader import EpochPlan, epoch_loader

TINY = PhantomOptions(matrix=96, slices=24, slice_spacing_mm=12.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader-set")
    write_rsna_dataset(root, studies=6, positive_fraction=0.5, seed=9, options=TINY, annotated_fraction=1.0)
    return root


def plan_for(cache, steps: int = 5) -> EpochPlan:
    cfg = load_train_config(None, ["stage1.augmentation=full", "stage1.crop=32", "preprocess.size=64"])
    pos, neg, masks = _rows(cache, {s["study_instance_uid"] for s in cache.studies})
    annotated = np.intersect1d(np.fromiter(masks, dtype=np.int64, count=len(masks)), pos)
    return EpochPlan(cache.folder, 0, cfg.stage1, cfg.preprocess.channel_windows(), pos, neg,
                     matched_weights(cache, pos, neg), np.zeros(0, np.int64), np.zeros((0, 3), np.int64), annotated,
                     masks, None, CropPlan(32), 2, 2, 0, 6, 8, 0, 3, 0, steps)


def test_two_workers_hand_back_the_same_steps_in_the_same_order_as_none(dataset, tmp_path):
    cache = build_cache(read_rsna(dataset), PreprocessSpec(size=64), tmp_path)
    plan = plan_for(cache)
    alone = list(epoch_loader(plan, cache, workers=0, pin=False))
    workers = list(epoch_loader(plan, cache, workers=2, pin=False))
    assert len(alone) == len(workers) == 5
    for a, b in zip(alone, workers, strict=True):
        assert set(a) == set(b) == {"x", "m", "labels", "has_mask", "cx", "cm", "clabels"}
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(alone[0]["x"], alone[1]["x"])  # each step its own draw
    assert alone[0]["x"].shape == (6, 3, 64, 64) and alone[0]["cx"].shape == (8, 3, 32, 32)


def test_petriage_train_with_loader_workers_logs_how_long_it_waited_for_batches(dataset, tmp_path):
    run = tmp_path / "run"
    overrides = [f"data.root={dataset}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.34",
                 "data.test_fraction=0.0", "preprocess.size=64", "stage1.width=8", "stage1.epochs=2",
                 "stage1.steps_per_epoch=4", "stage1.batch_size=8", "stage1.crop=32", "stage1.workers=2"]
    assert train_main(["stage1", "--run", str(run), *sum((["--set", o] for o in overrides), [])]) == 0
    log = [json.loads(line) for line in (run / "stage1_log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2]
    assert all(0.0 <= row["loader_wait_seconds"] <= row["seconds"] for row in log)


def test_a_positive_whose_clot_the_augmentation_moved_out_of_the_frame_is_trained_as_negative():
    from training.loader import follow_masks

    m = torch.zeros(4, 16, 16)
    m[0, 8, 8] = 1.0  # the clot is still there
    m[2, 0, 0] = 0.05  # a trace of the clot's edge at the border: gone for training
    labels = np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32)
    has_mask = np.array([True, True, True, False])  # the last one's mask is unknown: its label stands
    assert follow_masks(labels, m, has_mask).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert follow_masks(np.zeros(4, np.float32), m, has_mask).tolist() == [0.0] * 4


def test_crop_labels_of_a_step_agree_with_the_clots_left_in_the_augmented_crops(dataset, tmp_path):
    from training.loader import CLOT_KEPT

    cache = build_cache(read_rsna(dataset), PreprocessSpec(size=64), tmp_path)
    steps = list(epoch_loader(plan_for(cache, steps=12), cache, workers=0, pin=False))
    seen = 0
    for b in steps:
        kept = b["cm"].flatten(1).amax(dim=1) >= CLOT_KEPT
        assert not bool(((b["clabels"] > 0) & ~kept).any())  # no positive crop without its clot
        seen += int((b["clabels"] > 0).sum())
    assert seen > 0
