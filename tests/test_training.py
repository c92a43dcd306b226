"""Training pipeline: the RSNA-layout reader and cache, patient splits, the two networks and their
losses, and a tiny end-to-end run through petriage-train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from node.errors import ConfigError
from node.phantom import PhantomOptions, generate_study, write_rsna_dataset, write_study
from node.preprocess import PreprocessSpec, add_context, preprocess, study_bolus_hu, to_grid, window
from node.series import read_volume
from training import TrainingError
from training.cli import _prepare
from training.cli import main as train_main
from training.config import Stage1Settings, load_train_config
from training.crops import MASK_ON, CropPlan, crop_batch, small_clot_spots
from training.data import SliceCache, StudyRecord, build_cache, read_rsna, split_by_patient
from training.engine import batch_loss, keeps_epoch, load_initial_weights, training_precision
from training.evaluate import max_slice_auc
from training.losses import attention_loss, cell_loss
from training.metrics import bootstrap_auc, roc_auc, sensitivity_specificity, threshold_for_sensitivity
from training.models import ENHANCEMENT_FLOOR_HU, SliceNet, StudyNet, slab_enhancement

TINY = PhantomOptions(matrix=96, slices=24, slice_spacing_mm=12.0)
SPEC = PreprocessSpec(size=64)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    write_rsna_dataset(root, studies=10, positive_fraction=0.5, seed=5, options=TINY, annotated_fraction=1.0,
                       annotated_slice_fraction=0.3)
    return root


def test_reader_finds_labels_files_and_sparse_masks(tiny_dataset):
    studies = read_rsna(tiny_dataset)
    assert len(studies) == 10 and sum(s.label for s in studies) == 5
    for s in studies:
        assert len(s.files) == TINY.slices and all(f.is_file() for f in s.files)
        assert (s.mask_file is not None) == bool(s.label)  # every positive is annotated here
        assert s.patient_id.startswith("PH")
        assert sum(s.image_labels.values()) > 0 if s.label else sum(s.image_labels.values()) == 0


def test_cache_holds_sorted_preprocessed_slices_and_masks_on_only_a_few_slices(tiny_dataset, tmp_path):
    studies = read_rsna(tiny_dataset)
    cache = build_cache(studies, SPEC, tmp_path)
    assert cache.images.shape == (10 * TINY.slices, 3, 64, 64) and cache.images.dtype == np.uint8
    positive = next(s for s in studies if s.label)
    entry = cache.study(positive.study_instance_uid)
    labelled = [k for k, lab in enumerate(entry["image_labels"]) if lab == 1]
    annotated = sorted(int(k) for k in entry["mask_rows"])
    assert 1 <= len(annotated) < len(labelled) or len(labelled) == 1  # sparse: some positive slices only
    assert set(annotated) <= set(labelled)
    for k in annotated:
        assert cache.masks[entry["mask_rows"][str(k)]].max() > 0
    volume = read_volume(positive.files)
    expected = preprocess(volume.hu, SPEC, volume.pixel_spacing_mm)
    np.testing.assert_array_equal(cache.images[entry["start"]:entry["start"] + entry["count"]], expected)
    assert build_cache(studies, SPEC, tmp_path).folder == cache.folder  # reused, not rebuilt


def test_a_cache_that_normalises_the_bolus_windows_every_chunk_with_the_whole_study_measurement(tmp_path):
    long = PhantomOptions(matrix=64, slices=150, slice_spacing_mm=2.0)  # 150 slabs: three chunks of the cache
    write_rsna_dataset(tmp_path / "data", studies=1, positive_fraction=0.0, seed=8, options=long)
    spec = PreprocessSpec(size=32, bolus_reference_hu=350.0)
    [study] = read_rsna(tmp_path / "data")
    cache = build_cache([study], spec, tmp_path / "cache")
    volume = read_volume(study.files)
    grid = to_grid(volume.hu, spec, volume.pixel_spacing_mm)
    bolus_hu = study_bolus_hu(grid)
    assert bolus_hu is not None
    np.testing.assert_array_equal(cache.images[:150], window(grid, spec, bolus_hu))
    assert not np.array_equal(cache.images[:150], window(grid, PreprocessSpec(size=32)))  # it did change the input
    assert load_train_config(None, ["preprocess.bolus_reference_hu=350"]).preprocess.spec().bolus_reference_hu == 350
    with pytest.raises(ConfigError, match="bolus_reference_hu"):
        load_train_config(None, ["preprocess.bolus_reference_hu=100"])  # soft tissue is no bolus to aim at


def test_the_reader_refuses_a_dataset_with_missing_files(tiny_dataset, tmp_path):
    import shutil

    from training import TrainingError

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy, ignore=shutil.ignore_patterns(".cache"))
    victim = next((copy / "train").rglob("*.dcm"))
    victim.unlink()
    with pytest.raises(TrainingError, match="1 of 24 files missing"):
        read_rsna(copy)


def test_splits_keep_every_study_of_a_patient_together():
    studies = [StudyRecord(f"1.{i}", f"2.{i}", (), i % 2, {}, None, f"P{i // 3}") for i in range(60)]
    parts = split_by_patient(studies, val_fraction=0.2, test_fraction=0.2, seed=1)
    where = {s.study_instance_uid: name for name, ss in parts.items() for s in ss}
    assert len(where) == 60
    for p in {s.patient_id for s in studies}:
        assert len({where[s.study_instance_uid] for s in studies if s.patient_id == p}) == 1
    assert all(parts[name] for name in ("train", "val", "test"))


def test_slice_net_gives_logit_feature_and_a_cam_that_pools_to_the_logit():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 64)
    avg = SliceNet(width=8, pooling="avg").eval()
    logit, feature, cam = avg(x)
    assert logit.shape == (3,) and feature.shape == (3, 128) and cam.shape == (3, 4, 4)
    assert torch.allclose(cam.mean(dim=(1, 2)), logit, atol=1e-5)
    fmap = avg.body(avg.stem(x))  # the mean of the CAM is the linear layer on the average-pooled map
    assert torch.allclose(avg.fc(fmap.mean(dim=(2, 3)))[:, 0], logit, atol=1e-5)
    lse = SliceNet(width=8, pooling="lse").eval()
    logit, _, cam = lse(x)
    assert torch.allclose(logit, torch.log(torch.exp(cam).mean(dim=(1, 2))), atol=1e-5)
    assert torch.all(logit <= cam.flatten(1).max(dim=1).values + 1e-6)
    assert SliceNet(width=8, output_stride=32).eval()(torch.rand(1, 3, 64, 64))[2].shape == (1, 2, 2)


def test_study_net_on_a_padded_batch_equals_each_study_alone():
    torch.manual_seed(0)
    model = StudyNet(16, hidden=8).eval()
    a, b = torch.randn(1, 9, 16), torch.randn(1, 5, 16)
    batch = torch.zeros(2, 9, 16)
    batch[0], batch[1, :5] = a[0], b[0]
    study, slices = model(batch, torch.tensor([9, 5]))
    sa, la = model(a)
    sb, lb = model(b)
    assert torch.allclose(study, torch.cat([sa, sb]), atol=1e-5)
    assert torch.allclose(slices[1, :5], lb[0], atol=1e-5) and torch.allclose(slices[0], la[0], atol=1e-5)


def test_attention_loss_is_lower_when_the_cam_points_inside_the_mask():
    mask = torch.zeros(1, 32, 32)
    mask[0, 4:8, 4:8] = 1.0
    on, off = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    on[0, 1, 1], off[0, 6, 6] = 5.0, 5.0
    for form in ("mass", "mse", "cells"):
        assert attention_loss(on, mask, form) < attention_loss(off, mask, form)


def test_cell_loss_targets_exactly_the_cells_that_hold_embolus_pixels():
    mask = torch.zeros(1, 32, 32)
    mask[0, 9, 27] = 0.5  # one pixel, in cell (2, 6) of an 8 x 8 map
    right = torch.full((1, 8, 8), -8.0)
    right[0, 2, 6] = 8.0
    shifted = torch.full((1, 8, 8), -8.0)
    shifted[0, 2, 5] = 8.0
    assert cell_loss(right, mask) < 0.01 < cell_loss(shifted, mask)
    faint = mask * 0.5  # 25 % of a pixel is under the 40 % the slab labels use: no target
    assert cell_loss(torch.full((1, 8, 8), -8.0), faint) < 0.01


def test_slice_net_can_append_its_own_verdict_and_the_study_net_can_read_only_that():
    torch.manual_seed(0)
    net = SliceNet(width=8, feature_scores=True).eval()
    x = torch.rand(5, 3, 64, 64)
    logit, feature, cam = net(x)
    assert feature.shape == (5, 130) == (5, net.feature_dim)
    assert torch.allclose(feature[:, -2], logit) and torch.allclose(feature[:, -1], cam.flatten(1).amax(1))
    study = StudyNet(130, hidden=8, inputs="scores").eval()
    changed = feature.clone()
    changed[:, :-2] = torch.randn(5, 128)  # everything but the two scores
    assert torch.equal(study(feature[None])[0], study(changed[None])[0])


def _hu(byte: int) -> float:
    return -250.0 + byte / 255.0 * 700.0  # the PE window (100, 700) the tests' enhancement reads


def test_slab_enhancement_is_the_90th_percentile_of_the_bright_blood_in_the_central_field():
    rng = np.random.default_rng(3)
    image = np.full((64, 64), 60, dtype=np.uint8)  # soft tissue, under the 120 HU floor
    blood = rng.integers(180, 250, size=(20, 20)).astype(np.uint8)  # 244-436 HU: enhanced arteries
    image[20:40, 20:40] = blood
    expected = np.sort(blood.ravel())[::-1][int(0.1 * blood.size)]  # the pixel ranked at 10 % from the top
    got = slab_enhancement(torch.from_numpy(image[None] / 255.0), -250.0, 450.0)
    assert got.item() == pytest.approx(_hu(int(expected)), abs=1e-3)
    distractors = image.copy()
    distractors[2:8, 2:8] = 240  # bright, but outside the central 60 % of the field
    distractors[42:44, 20:30] = 255  # saturated, in the field: says only "at least the window's top"
    distractors[45:47, 20:30] = 125  # just under the 120 HU floor, in the field
    assert slab_enhancement(torch.from_numpy(distractors[None] / 255.0), -250.0, 450.0).item() == got.item()
    weaker = image.copy()
    weaker[20:40, 20:40] = blood - 36  # 99 HU less contrast, all of it still above the floor
    assert slab_enhancement(torch.from_numpy(weaker[None] / 255.0), -250.0, 450.0).item() == \
        pytest.approx(got.item() - _hu(36) + _hu(0), abs=1e-3)
    nothing = slab_enhancement(torch.full((1, 64, 64), 60 / 255.0), -250.0, 450.0)
    assert nothing.item() == ENHANCEMENT_FLOOR_HU


def test_a_slice_net_with_enhancement_appends_it_last_and_the_study_net_reads_the_middle_half_of_the_study():
    torch.manual_seed(0)
    net = SliceNet(width=8, feature_scores=True, enhancement_window=(-250.0, 450.0)).eval()
    x = torch.rand(5, 3, 64, 64)
    logit, feature, _ = net(x)
    assert feature.shape == (5, 131) == (5, net.feature_dim)
    assert torch.allclose(feature[:, -3], logit)
    assert torch.allclose(feature[:, -1], slab_enhancement(x[:, 0], -250.0, 450.0))
    study = StudyNet(131, hidden=8, inputs="scores", enhancement=True).eval()
    seq = torch.randn(1, 12, 131)
    seq[..., -1] = 300.0
    base = study(seq)[0]
    ends = seq.clone()
    ends[0, [0, 1, 2, 9, 10, 11], -1] = 600.0  # outside the middle half (slabs 3 to 8): no pulmonary arteries
    ends[0, :, :-3] = torch.randn(12, 128)  # nor do the pooled features count
    assert torch.equal(study(ends)[0], base)
    grey = seq.clone()
    grey[0, 3:9, -1] = 200.0
    assert not torch.allclose(study(grey)[0], base)
    padded = torch.zeros(2, 12, 131)
    padded[0], padded[1, :7] = seq[0], grey[0, :7]
    both = study(padded, torch.tensor([12, 7]))[0]
    assert torch.allclose(both, torch.cat([base, study(grey[:, :7])[0]]), atol=1e-5)
    with pytest.raises(ConfigError, match="stage1.enhancement"):
        load_train_config(None, ["stage1.enhancement=true", "stage1.feature_scores=true"])
    with pytest.raises(ConfigError, match="ends at 100 HU"):
        load_train_config(None, ["stage1.enhancement=true", "stage1.feature_scores=true", "stage2.inputs=scores",
                                 "preprocess.windows=[[-300, 800], [40, 400], [-600, 1500]]"])


def test_stage1_loss_falls_on_a_fixed_batch_and_stays_finite():
    torch.manual_seed(0)
    model = SliceNet(width=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.rand(8, 3, 64, 64), torch.tensor([1.0, 0.0] * 4)
    mask = torch.zeros(8, 64, 64)
    mask[::2, 20:30, 20:30] = 1.0
    losses = []
    for _ in range(40):
        logit, _, cam = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y) + attention_loss(cam[::2], mask[::2])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_bf16_training_learns_on_the_cpu_and_leaves_weights_a_float32_net_computes_alike():
    torch.manual_seed(0)
    model = SliceNet(width=8)
    s = Stage1Settings(precision="bf16", attention_loss="cells")
    autocast = training_precision(model, s, torch.device("cpu"))
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.ndim == 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.rand(8, 3, 64, 64), torch.tensor([1.0, 0.0] * 4)
    mask = torch.zeros(8, 64, 64)
    mask[::2, 20:30, 20:30] = 1.0
    with autocast:  # the forward pass really runs in bfloat16
        assert model(x)[0].dtype == torch.bfloat16
    losses = []
    for _ in range(40):
        bce, att = batch_loss(model, s, x, mask, y, torch.ones(8, dtype=torch.bool), torch.device("cpu"), autocast)
        assert bce.dtype == att.dtype == torch.float32
        opt.zero_grad()
        (bce + att).backward()
        opt.step()
        losses.append((bce + att).item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    plain = SliceNet(width=8)  # what features, evaluation and export build: float32, default memory format
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    with torch.no_grad():
        reference = plain(x)[0]
        assert torch.allclose(reference, model(x)[0], atol=1e-5)
        with autocast:
            fast = model(x)[0].float()
    assert float((fast - reference).abs().max()) < 0.1  # bfloat16 ranks slices as float32 does


def test_metrics_agree_with_brute_force_and_pick_a_threshold_that_meets_the_target():
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.4
    scores = labels * 0.8 + rng.random(200)
    pairs = [(p > n) + 0.5 * (p == n) for p in scores[labels] for n in scores[~labels]]
    assert roc_auc(labels, scores) == pytest.approx(np.mean(pairs))
    lo, hi = bootstrap_auc(labels, scores, n=300)
    assert lo < roc_auc(labels, scores) < hi
    t = threshold_for_sensitivity(labels, scores, 0.9)
    assert sensitivity_specificity(labels, scores, t)[0] >= 0.9


def test_a_study_gives_the_same_probability_whatever_its_file_order(tmp_path):
    torch.manual_seed(0)
    slice_net, study_net = SliceNet(width=8).eval(), StudyNet(128, hidden=8).eval()
    probs = []
    for order in ("ascending", "shuffled", "reversed"):
        study = generate_study(8, pe=True, options=PhantomOptions(**{**TINY.__dict__, "order": order}))
        paths = write_study(study, tmp_path / order)["ctpa"]
        volume = read_volume(sorted(paths)[::-1] if order == "reversed" else paths)
        x = torch.from_numpy(preprocess(volume.hu, SPEC, volume.pixel_spacing_mm)).float() / 255.0
        with torch.no_grad():
            feats = slice_net(x)[1]
            probs.append(torch.sigmoid(study_net(feats[None])[0]).item())
    assert probs[0] == probs[1] == probs[2]


def test_petriage_train_runs_both_stages_end_to_end_on_a_tiny_dataset(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [f"data.root={tiny_dataset}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.2",
                 "data.test_fraction=0.4", "preprocess.size=64", "stage1.width=8", "stage1.epochs=2",
                 "stage1.steps_per_epoch=6", "stage1.batch_size=8", "stage2.epochs=3", "eval.bootstrap=200",
                 "eval.overlay_examples=4"]
    code = train_main(["all", "--run", str(run), *sum((["--set", o] for o in overrides), [])])
    assert code == 0, capsys.readouterr().err
    report = json.loads((run / "report.json").read_text())
    assert 0.0 <= report["study_auc"] <= 1.0 and report["pointing_game"]["slices"] > 0
    assert report["synthetic_data"] is True and report["split_sizes"]["test"] >= 2
    train_auc = report["stage1_max_slice_study_auc"]["train"]
    levels = train_auc["by_most_central_level"]  # the phantom's ground truth names each positive's level
    assert sum(v["positive"] for v in levels.values()) == train_auc["positive"] > 0
    for name in ("stage1.pt", "stage1_last.pt", "stage2.pt", "features.npy", "roc.png", "cam_grid.png",
                 "stage1_log.csv", "stage2_log.jsonl", "config.yaml", "splits.json"):
        assert (run / name).is_file(), name
    features = np.load(run / "features.npy")
    assert features.shape == (10 * TINY.slices, 128) and np.isfinite(features).all()
    log = [json.loads(line) for line in (run / "stage1_log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2] and all(np.isfinite(row["loss"]) for row in log)
    # stage 2 keeps the epoch of the lowest validation loss; asked for the AUC, the highest validation AUC
    for keep, pick in (("val_loss", lambda rows: min(rows, key=lambda r: r["val_loss"])),
                       ("val_auc", lambda rows: max(rows, key=lambda r: (r["val_study_auc"], -r["val_loss"])))):
        (run / "stage2_log.jsonl").unlink()
        assert train_main(["stage2", "--run", str(run), *sum((["--set", o] for o in overrides), []),
                           "--set", "stage2.epochs=8", "--set", f"stage2.keep={keep}"]) == 0
        rows = [json.loads(line) for line in (run / "stage2_log.jsonl").read_text().splitlines()]
        kept = torch.load(run / "stage2.pt", weights_only=False)
        assert kept["epoch"] + 1 == pick(rows)["epoch"], (keep, rows)


def test_petriage_train_refuses_a_bad_config_with_exit_code_2(tmp_path, capsys):
    assert train_main(["stage1", "--run", str(tmp_path), "--set", "stage1.attention_loss=l7"]) == 2
    assert "stage1.attention_loss: got 'l7'" in capsys.readouterr().err
    assert train_main(["stage1", "--run", str(tmp_path), "--set", f"data.root={tmp_path / 'none'}"]) == 1


def test_matched_negatives_follow_where_positives_lie_along_the_body(tiny_dataset, tmp_path):
    from training.engine import _rows, matched_weights

    cache = build_cache(read_rsna(tiny_dataset), SPEC, tmp_path)
    pos, neg, _ = _rows(cache, {s["study_instance_uid"] for s in cache.studies})
    p = matched_weights(cache, pos, neg)
    assert p.shape == neg.shape and p.sum() == pytest.approx(1.0)
    rel = {}
    for st in cache.studies:
        for k in range(st["count"]):
            rel[st["start"] + k] = (k + 0.5) / st["count"]
    pos_levels = np.array([rel[int(r)] for r in pos])
    neg_levels = np.array([rel[int(r)] for r in neg])
    matched_mean = float((p * neg_levels).sum())
    assert abs(matched_mean - pos_levels.mean()) < abs(neg_levels.mean() - pos_levels.mean()) + 1e-9
    assert p[(neg_levels < pos_levels.min() - 0.05) | (neg_levels > pos_levels.max() + 0.05)].sum() == 0


def test_thin_slices_are_cached_as_the_slabs_the_node_will_analyse(tmp_path):
    from node.preprocess import average_slabs

    thin = PhantomOptions(matrix=96, slices=24, slice_spacing_mm=6.0)
    write_rsna_dataset(tmp_path / "thin", studies=2, positive_fraction=1.0, seed=8, options=thin,
                       annotated_fraction=1.0, annotated_slice_fraction=1.0)
    studies = read_rsna(tmp_path / "thin")
    spec = PreprocessSpec(size=64, slab_mm=12.0)  # two 6 mm slices make one slab
    cache = build_cache(studies, spec, tmp_path / "cache")
    for study in studies:
        entry = cache.study(study.study_instance_uid)
        assert entry["count"] == 12 and entry["slab"] == 2
        volume = read_volume(study.files)
        expected = preprocess(average_slabs(volume.hu, 2), spec, volume.pixel_spacing_mm)
        np.testing.assert_array_equal(cache.images[entry["start"]:entry["start"] + 12], expected)
        labels = [study.image_labels[u] for u in volume.sop_instance_uids]
        assert entry["image_labels"] == [max(labels[i], labels[i + 1]) for i in range(0, 24, 2)]
        assert {int(k) for k in entry["mask_rows"]} == {i for i, lab in enumerate(entry["image_labels"]) if lab}


def test_a_context_cache_gives_each_slab_its_own_studys_neighbours_as_the_node_stacks_them(tiny_dataset, tmp_path):
    studies = read_rsna(tiny_dataset)
    plain = build_cache(studies, PreprocessSpec(size=48), tmp_path / "cache")
    cache = build_cache(studies, PreprocessSpec(size=48, context=1), tmp_path / "cache")
    assert cache.folder == plain.folder  # one cache of slabs serves both
    assert cache.images.shape == (len(plain.images), 5, 48, 48)
    for entry in cache.studies[:3]:
        block = slice(entry["start"], entry["start"] + entry["count"])
        expected = add_context(np.asarray(plain.images[block]), 1)  # what the node feeds the model
        np.testing.assert_array_equal(cache.images[block], expected)
        rows = np.arange(entry["start"], entry["start"] + entry["count"])[::-1]
        np.testing.assert_array_equal(cache.images[rows], expected[::-1])
        np.testing.assert_array_equal(cache.images[entry["start"]], expected[0])
        np.testing.assert_array_equal(cache.images[entry["start"] + 1, 4], expected[1, 4])


def test_a_context_model_started_from_weights_without_context_computes_what_they_computed():
    torch.manual_seed(0)
    old = SliceNet(depth=18, width=8, in_channels=3).eval()
    new = SliceNet(depth=18, width=8, in_channels=5).eval()
    load_initial_weights(new, old.state_dict())
    x = torch.rand(2, 5, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(new(x)[0], old(x[:, :3])[0])
    with pytest.raises(TrainingError, match="stage1.init: stem"):
        load_initial_weights(old, new.state_dict())  # fewer channels than the weights: refused


def test_crops_take_their_label_from_the_mask_they_hold():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 120, (6, 3, 64, 64), dtype=np.uint8)
    images[:, 0, 40:44, 10:14] = 200  # a bright vessel for the negatives to centre on
    masks = np.zeros((2, 64, 64), np.uint8)
    masks[0, 8:12, 50:54] = 255
    masks[1, 30:33, 30:33] = 180
    annotated, mask_of, negatives = np.array([0, 1]), {0: 0, 1: 1}, np.array([2, 3, 4, 5])
    x, m, labels = crop_batch(images, masks, annotated, mask_of, negatives, 40, CropPlan(24), rng)
    assert x.shape == (40, 3, 24, 24) and m.shape == (40, 24, 24) and x.dtype == np.uint8
    held = (m >= MASK_ON).reshape(40, -1).any(axis=1)
    np.testing.assert_array_equal(labels, held.astype(np.float32))
    assert labels[:20].all()  # embolus crops: the clot always inside
    assert not labels[20:].any()  # beside and vessel crops: none of it
    for i in range(40):  # every crop is a window of one cached slice
        assert any((x[i] == images[r][:, y:y + 24, c:c + 24]).all()
                   for r in range(6) for y in range(41) for c in range(41))
    spots = np.array([[3, 41, 11]])  # where the network fired on negative row 3: the bright vessel
    x, m, labels = crop_batch(images, masks, annotated, mask_of, negatives, 40, CropPlan(24, hard=1.0), rng, spots)
    assert not labels[28:].any()
    for i in range(28, 40):  # every negative crop is a window of row 3 around that spot
        assert any((x[i] == images[3][:, y:y + 24, c:c + 24]).all() for y in range(23, 41) for c in range(0, 24))
    with pytest.raises(ValueError, match="larger than the cached slices"):
        crop_batch(images, masks, annotated, mask_of, negatives, 4, CropPlan(96), rng)


def test_small_clot_crops_centre_on_the_small_clot_of_a_slab_that_also_holds_a_large_one():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 120, (3, 3, 64, 64), dtype=np.uint8)
    masks = np.zeros((1, 64, 64), np.uint8)
    masks[0, 4:20, 4:20] = 255  # a lobar clot: 256 pixels
    masks[0, 50:52, 50:53] = 255  # a segmental one: 6 pixels
    annotated, mask_of, negatives = np.array([0]), {0: 0}, np.array([1, 2])
    spots = small_clot_spots(masks, annotated, mask_of)
    assert {(y, x) for _, y, x in spots} == {(y, x) for y in (50, 51) for x in (50, 51, 52)}
    small_ones = masks.copy()
    small_ones[0, 4:20, 4:20] = 0

    def crops_holding_the_small_clot(plan: CropPlan) -> int:
        _, m, labels = crop_batch(images, masks, annotated, mask_of, negatives, 40, plan,
                                  np.random.default_rng(2), small_spots=spots)
        assert labels[:20].all()
        return sum(int((m[i] >= MASK_ON).sum()) == 6 for i in range(20))  # the small clot alone

    assert crops_holding_the_small_clot(CropPlan(24, small=1.0)) == 20
    assert crops_holding_the_small_clot(CropPlan(24)) <= 2  # uniform pixels: the large clot's 256 win


def test_petriage_train_with_crops_cells_and_scores_runs_end_to_end(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [f"data.root={tiny_dataset}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.2",
                 "data.test_fraction=0.4", "preprocess.size=64", "stage1.width=8", "stage1.epochs=2",
                 "stage1.steps_per_epoch=4", "stage1.batch_size=4", "stage1.crop=32", "stage1.crop_batch=8",
                 "stage1.attention_loss=cells", "stage1.augmentation=full", "stage1.feature_scores=true",
                 "stage2.inputs=scores", "stage2.epochs=2", "eval.bootstrap=200", "eval.overlay_examples=4",
                 "stage1.hard_negatives=0.5", "stage1.hard_crops=0.5", "stage1.small_clot_crops=0.5"]
    assert train_main(["all", "--run", str(run), *sum((["--set", o] for o in overrides), [])]) == 0, \
        capsys.readouterr().err
    assert np.load(run / "features.npy").shape == (10 * TINY.slices, 130)
    log = [json.loads(line) for line in (run / "stage1_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["attention"]) and row["attention"] > 0 for row in log)
    # A second schedule starts from the first run's weights, not from scratch.
    again = tmp_path / "again"
    more = [*overrides, f"stage1.init={run / 'stage1_last.pt'}", "stage1.epochs=1", "stage1.lr=1e-9"]
    assert train_main(["stage1", "--run", str(again), *sum((["--set", o] for o in more), [])]) == 0, \
        capsys.readouterr().err
    first, second = torch.load(run / "stage1_last.pt")["model"], torch.load(again / "stage1_last.pt")["model"]
    assert all(torch.allclose(first[k].float(), second[k].float(), atol=1e-4)
               for k in first if k.endswith("conv1.weight"))


def test_largest_slice_auc_by_level_shows_a_level_that_stage_1_does_not_detect():
    # Six studies of two slices: central positives stand out, segmental ones score like the negatives.
    tops = {"n1": 0.0, "n2": 1.0, "c1": 3.0, "c2": 4.0, "s1": 0.5, "s2": 0.5}
    studies = [{"study_instance_uid": uid, "label": int(uid[0] != "n"), "start": 2 * i, "count": 2}
               for i, uid in enumerate(tops)]
    logits = np.array([v for top in tops.values() for v in (top - 5.0, top)], dtype=np.float32)
    cache = SliceCache(folder=Path("."), images=np.zeros((12, 3, 4, 4), np.uint8),
                       masks=np.zeros((0, 4, 4), np.uint8), studies=studies)
    levels = {"c1": "central", "c2": "central", "s1": "segmental", "s2": "segmental", "n1": None, "n2": None}
    report = max_slice_auc(cache, logits, list(tops), levels)
    assert report["by_most_central_level"] == {"central": {"positive": 2, "auc": 1.0},
                                               "segmental": {"positive": 2, "auc": 0.5}}
    assert report["all"] == 0.75 and (report["positive"], report["negative"]) == (4, 2)
    assert "by_most_central_level" not in max_slice_auc(cache, logits, list(tops), {})


def test_extra_training_datasets_join_the_training_split_only(tiny_dataset, tmp_path):
    extra = tmp_path / "extra"
    write_rsna_dataset(extra, studies=2, positive_fraction=0.5, seed=6, options=TINY, annotated_fraction=1.0,
                       annotated_slice_fraction=0.3)
    common = [f"data.root={tiny_dataset}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.2",
              "data.test_fraction=0.4", "preprocess.size=64"]
    _, _, alone = _prepare(None, tmp_path / "alone", common)
    _, cache, joined = _prepare(None, tmp_path / "joined", [*common, f"data.train_extra=[{extra}]"])
    extra_uids = {s.study_instance_uid for s in read_rsna(extra)}
    assert joined["val"] == alone["val"] and joined["test"] == alone["test"]
    assert set(joined["train"]) == set(alone["train"]) | extra_uids
    assert all(cache.study(uid)["count"] == TINY.slices for uid in extra_uids)
    with pytest.raises(TrainingError, match="already read"):
        _prepare(None, tmp_path / "twice", [*common, f"data.train_extra=[{tiny_dataset}]"])


def test_compare_bundles_calls_a_change_better_only_when_the_paired_interval_is_above_zero(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    rng = np.random.default_rng(0)
    labels = np.arange(80) < 40
    noisy = labels + rng.normal(0, 1.2, 80)  # AUC about 0.7
    clean = labels + rng.normal(0, 0.3, 80)  # AUC about 0.99

    def results(name: str, scores: np.ndarray) -> Path:
        rows = [{"study_instance_uid": f"1.2.{k}", "pe": bool(labels[k]), "probability": float(scores[k])}
                for k in range(80)]
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"tests": [{"test": "seg", "rows": rows}]}))
        return path

    def compare(old: Path, new: Path, *extra: str) -> str:
        proc = subprocess.run([sys.executable, str(root / "scripts" / "compare_bundles.py"), str(old), str(new),
                               "--test", "seg", *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    old, new, same = results("old", noisy), results("new", clean), results("same", noisy)
    assert "better" in compare(old, new, "--out", str(tmp_path / "roc.png")) and (tmp_path / "roc.png").is_file()
    assert "worse" in compare(new, old)
    assert "difference +0.000" in compare(old, same) and "not shown different" in compare(old, same)


def test_a_run_keeps_the_commit_it_started_at_when_a_stage_is_resumed_later(tmp_path):
    from training import provenance

    provenance.record(tmp_path)
    first = provenance.recorded(tmp_path)
    assert first is not None and first.split("+")[0] == provenance.current_commit().split("+")[0]
    (tmp_path / provenance.FILE).write_text("0" * 40 + "\n")  # as if the checkout had moved on since
    provenance.record(tmp_path)  # a resumed stage
    assert provenance.recorded(tmp_path) == "0" * 40
    assert provenance.recorded(tmp_path / "elsewhere") is None  # a run from before the record: unknown


def test_stage2_keeps_the_epoch_of_the_lowest_validation_loss_not_a_thousandth_of_auc_from_an_untrained_one():
    # the twentieth run's stage 2, validation figures per epoch: its second epoch barely trained (loss 0.453)
    # but led the AUC by 0.002, and being kept it squeezed every probability into 0.22-0.75
    epochs = [(0.926, 0.541), (0.9282, 0.453), (0.925, 0.322), (0.926, 0.328), (0.926, 0.315), (0.926, 0.325)]

    def kept(keep: str) -> int:
        best_auc, best_loss, index = -1.0, float("inf"), -1
        for i, (auc, loss) in enumerate(epochs):
            if keeps_epoch(keep, auc, loss, best_auc, best_loss):
                best_auc, best_loss, index = auc, loss, i
        return index

    assert kept("val_loss") == 4 and kept("val_auc") == 1
    assert keeps_epoch("val_loss", float("nan"), float("nan"), 0.9, 0.3)  # no validation studies: the last stays
    assert load_train_config(None).stage2.keep == "val_loss"
