"""Training loops: stage 1 (slices), feature extraction, stage 2 (studies).

Checkpoints are written atomically (temporary file, then rename) and carry the effective config and
the preprocessing spec, so a run folder explains itself and a crash never leaves half a checkpoint.
A stage started again resumes from its last checkpoint. Each epoch appends one JSON line and one CSV
row to ``<stage>_log.{jsonl,csv}``.
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from node.preprocess import PreprocessSpec, to_float
from training import TrainingError, distributed
from training.config import Stage1Settings, TrainConfig
from training.crops import CropPlan, small_clot_spots
from training.data import SliceCache
from training.from_bundle import bundle_preprocess, is_bundle, recalibrate_batchnorm, state_from_onnx
from training.loader import EpochPlan, augment, epoch_loader, slab_rows
from training.losses import attention_loss, slice_loss
from training.metrics import roc_auc
from training.models import SliceNet, build_study_net

console = Console()


def pick_device(setting: str) -> torch.device:
    """The training device: under torchrun, this process's GPU (distributed.device_for)."""
    return distributed.device_for(setting)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise TrainingError(f"{path}: no checkpoint (run the stage that writes it first)")
    return torch.load(path, map_location="cpu", weights_only=False)


def _progress() -> Progress:
    """A progress bar on rank 0 (other torchrun processes stay quiet)."""
    return Progress(TextColumn("[bold]{task.fields[stage]}[/bold]"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.description}"), console=console,
                    disable=not distributed.ranks().main)


class EpochLog:
    """One JSON line and one CSV row per epoch."""

    def __init__(self, run_dir: Path, stage: str):
        self.jsonl, self.csv = run_dir / f"{stage}_log.jsonl", run_dir / f"{stage}_log.csv"

    def write(self, row: dict) -> None:
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        new = not self.csv.exists()
        with self.csv.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)


def build_slice_net(cfg: TrainConfig) -> SliceNet:
    s = cfg.stage1
    return SliceNet(depth=s.depth, width=s.width, in_channels=cfg.preprocess.spec().channels,
                    output_stride=s.output_stride, pooling=s.pooling, lse_r=s.lse_r,
                    feature_scores=s.feature_scores, spatial_channels=s.spatial_channels,
                    spatial_grid=s.spatial_grid, enhancement_window=enhancement_window(cfg))


def enhancement_window(cfg: TrainConfig) -> tuple[float, float] | None:
    """(low, top) HU of the PE window (input channel 0) when stage 1 measures the enhancement, else None."""
    return cfg.preprocess.pe_window_hu() if cfg.stage1.enhancement else None


def build_stage2(cfg: TrainConfig, feature_dim: int) -> torch.nn.Module:
    s = cfg.stage2
    return build_study_net(feature_dim, s.rnn, s.hidden, s.layers, s.dropout, s.inputs,
                           cfg.stage1.spatial_channels, cfg.stage1.spatial_grid, cfg.stage1.enhancement)


def initial_state(cfg: TrainConfig, path: Path, model: SliceNet) -> dict[str, torch.Tensor]:
    """stage1.init's weights: a run's checkpoint, or an exported bundle's stage 1 (folded, see from_bundle)."""
    if not is_bundle(path):
        return load_checkpoint(path)["model"]
    theirs = PreprocessSpec.from_dict(bundle_preprocess(path))
    ours = cfg.preprocess.spec()
    if theirs.slab_spec() != ours.slab_spec() or theirs.context not in (0, ours.context):
        raise TrainingError(f"stage1.init: bundle {path} was trained on {theirs.to_dict()}, this run's "
                            f"preprocessing is {ours.to_dict()}")
    return state_from_onnx(path / "stage1.onnx", model)


def load_initial_weights(model: SliceNet, state: dict[str, torch.Tensor]) -> None:
    """Start from another run's weights; input channels that run did not have start at zero.

    So a model given neighbouring slabs as context (preprocess.context) starts as exactly the function
    its initial run learnt, and learns from there what the neighbours add.
    """
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            grown = own[key].shape[1] > value.shape[1] and own[key].shape[:1] + own[key].shape[2:] == \
                value.shape[:1] + value.shape[2:]
            if value.ndim != 4 or not grown or not key.startswith("stem."):
                raise TrainingError(f"stage1.init: {key} has shape {tuple(value.shape)}, this model needs "
                                    f"{tuple(own[key].shape)}")
            padded = torch.zeros_like(own[key])
            padded[:, :value.shape[1]] = value
            state = {**state, key: padded}
    model.load_state_dict(state)


def _rows(cache: SliceCache, uids: set[str]) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """Positive rows, negative rows and {row: mask row} of the given studies."""
    pos: list[int] = []
    neg: list[int] = []
    masks: dict[int, int] = {}
    for st in cache.studies:
        if st["study_instance_uid"] not in uids:
            continue
        for k, lab in enumerate(st["image_labels"]):
            row = st["start"] + k
            (pos if lab == 1 else neg).append(row)
        for k, m in st["mask_rows"].items():
            masks[st["start"] + int(k)] = m
    return np.array(pos, dtype=np.int64), np.array(neg, dtype=np.int64), masks


def matched_weights(cache: SliceCache, pos: np.ndarray, neg: np.ndarray, bins: int = 20) -> np.ndarray:
    """Sampling probabilities for negatives that follow the positives' relative position in the study."""
    where = np.zeros(len(cache.images))
    for st in cache.studies:
        where[st["start"]:st["start"] + st["count"]] = (np.arange(st["count"]) + 0.5) / st["count"]
    hist, _ = np.histogram(where[pos], bins=bins, range=(0.0, 1.0))
    w = hist[np.minimum((where[neg] * bins).astype(int), bins - 1)].astype(float)
    return w / w.sum() if w.sum() > 0 else np.full(len(neg), 1.0 / len(neg))


def _step_loss(model: torch.nn.Module, s: Stage1Settings, images: np.ndarray, mask: np.ndarray, labels: np.ndarray,
               has_mask: np.ndarray, rng: np.random.Generator, windows: list[tuple[float, float]],
               device: torch.device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice BCE and attention loss of one uint8 batch, augmented here (the probes' entry point)."""
    x, m, labels = augment(s, images, mask, labels, has_mask, rng, windows)
    return batch_loss(model, s, x, m, torch.from_numpy(labels), torch.from_numpy(has_mask), device, autocast)


def batch_loss(model: torch.nn.Module, s: Stage1Settings, x: torch.Tensor, m: torch.Tensor, labels: torch.Tensor,
               has_mask: torch.Tensor, device: torch.device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice BCE and attention loss of one augmented batch.

    ``has_mask``: the slice's pixel mask is complete (an annotated slab or a crop of one). The
    ``cells`` form also supervises every PE-negative slice (its mask is empty by definition); the
    other forms only the annotated PE slices, as in the paper.
    """
    x, m = x.to(device, non_blocking=True), m.to(device, non_blocking=True)
    with autocast:
        logit, _, cam = model(x)
    logit, cam = logit.float(), cam.float()  # the losses in float32 whatever the forward pass ran in
    y = labels.to(device)
    bce = slice_loss(logit, y)
    att = torch.zeros((), device=device)
    known = (has_mask | (labels == 0)) if s.attention_loss == "cells" else (has_mask & (labels == 1))
    known = known.to(device)
    if s.attention_weight > 0 and bool(known.any()):
        att = attention_loss(cam[known], m[known], s.attention_loss, s.hard_cells)
    return bce, att


def slice_scores(model: SliceNet, cache: SliceCache, rows: np.ndarray, device: torch.device,
                 batch: int = 64, autocast=None) -> np.ndarray:
    return slice_scores_and_peaks(model, cache, rows, device, batch, autocast)[0]


def training_precision(model: SliceNet, s: Stage1Settings, device: torch.device):
    """The autocast context stage 1 trains under, after putting the model in the matching memory format.

    CUDA: bfloat16 autocast, as always. CPU: float32, or with ``precision: bf16`` bfloat16 autocast
    and channels-last weights (oneDNN's fast path for both). Call before the optimiser is built."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if s.precision == "bf16":
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stubs lack it
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def slice_scores_and_peaks(model: SliceNet, cache: SliceCache, rows: np.ndarray, device: torch.device,
                           batch: int = 64, autocast=None) -> tuple[np.ndarray, np.ndarray]:
    """Slice logits (N,) and where each CAM peaks, as (N, 2) input-pixel y, x (the peak cell's centre).

    ``autocast``: the training steps' precision context for the per-epoch passes; None: float32."""
    model.eval()
    out, peaks = [], []
    size = cache.images.shape[-1]
    with torch.no_grad(), autocast if autocast is not None else nullcontext():
        for lo in range(0, len(rows), batch):
            x = torch.from_numpy(to_float(cache.images[rows[lo:lo + batch]])).to(device)
            logit, _, cam = model(x)
            out.append(logit.float().cpu().numpy())
            h, w = cam.shape[-2:]
            flat = cam.flatten(1).argmax(dim=1).cpu().numpy()
            peaks.append(np.stack([(flat // w + 0.5) * size / h, (flat % w + 0.5) * size / w], axis=1))
    if not out:
        return np.zeros(0), np.zeros((0, 2))
    return np.concatenate(out), np.concatenate(peaks).astype(np.int64)


def train_stage1(cfg: TrainConfig, cache: SliceCache, splits: dict[str, list[str]], run_dir: Path,
                 on_epoch: Callable[[dict], None] | None = None) -> Path:
    """Train the slice network; returns the path of the best checkpoint (by validation slice AUC)."""
    s = cfg.stage1
    device = pick_device(cfg.device)
    r = distributed.ranks()
    seed_everything(cfg.seed)
    model = build_slice_net(cfg).to(device)
    autocast = training_precision(model, s, device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    total = s.epochs * s.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=total, pct_start=0.15)
    last, best_path = run_dir / "stage1_last.pt", run_dir / "stage1.pt"
    start_epoch, best = 0, -1.0
    from_bundle = False
    if s.init is not None and not last.is_file():  # a second schedule on a first run's (or a bundle's) weights
        from_bundle = is_bundle(Path(s.init))
        load_initial_weights(model, initial_state(cfg, Path(s.init), model))
        if r.main:
            console.print(f"stage 1: starting from the weights of {s.init}")
    if last.is_file():  # resume
        ckpt = load_checkpoint(last)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch, best = ckpt["epoch"] + 1, ckpt["best"]
        if r.main:
            console.print(f"stage 1: resuming after epoch {start_epoch}")
    pos, neg, masks = _rows(cache, set(splits["train"]))
    if not len(pos) or not len(neg):
        raise TrainingError("stage 1 needs PE-positive and PE-negative slices in the training split")
    if from_bundle:  # folded BNs: give them this training data's statistics before the first step
        brng = np.random.default_rng(cfg.seed + 29)
        n = recalibrate_batchnorm(model, (torch.from_numpy(to_float(slab_rows(cache, np.concatenate(
            [brng.choice(pos, s.batch_size // 4), brng.choice(neg, s.batch_size - s.batch_size // 4)]), masks)[0]))
            .to(device) for _ in range(16)))
        if r.main:
            console.print(f"stage 1: {n} batch norms recalibrated on {16 * s.batch_size} training slabs")
    vpos, vneg, _ = _rows(cache, set(splits["val"]))
    vrng = np.random.default_rng(cfg.seed + 17)
    if len(vpos) > 400:  # a fixed sample keeps the per-epoch check cheap on a large validation split
        vpos = np.sort(vrng.permutation(vpos)[:400])
    val_rows = np.concatenate([vpos, vrng.permutation(vneg)[: max(3 * len(vpos), 200)]])
    val_labels = np.concatenate([np.ones(len(vpos)), np.zeros(len(val_rows) - len(vpos))])
    batch_size = distributed.share(s.batch_size, r)  # this process's part of each step (all of it alone)
    crop_size = distributed.share(s.crop_batch, r)
    n_pos = max(1, round(batch_size * s.positive_fraction))
    n_hard = round((batch_size - n_pos) * s.hard_negatives)
    n_matched = round((batch_size - n_pos - n_hard) * s.matched_negatives)
    windows = cfg.preprocess.channel_windows()  # the context channels are PE-window channels
    hard = np.zeros(0, dtype=np.int64)
    hard_spots = np.zeros((0, 3), dtype=np.int64)
    neg_p = matched_weights(cache, pos, neg)
    annotated = np.intersect1d(np.fromiter(masks, dtype=np.int64, count=len(masks)), pos)  # sorted
    crop_plan = CropPlan(s.crop, hard=s.hard_crops, small=s.small_clot_crops) if s.crop else None
    if crop_plan is not None and not len(annotated):
        raise TrainingError("stage1.crop needs annotated PE slices (pixel masks) in the training split")
    small_spots = small_clot_spots(cache.masks, annotated, masks) if crop_plan and s.small_clot_crops else None
    if small_spots is not None and r.main:
        console.print(f"stage 1: {len(np.unique(small_spots[:, 0]))} of {len(annotated)} annotated training "
                      f"slabs hold a small clot ({len(small_spots)} pixels)")
    log = EpochLog(run_dir, "stage1")
    # The per-epoch validation and hard-negative passes: in bfloat16 only when the setting asks for it
    # (on CUDA the steps always are; its passes stay float32 unless precision is bf16).
    passes = autocast if s.precision == "bf16" else None
    net = distributed.wrap(model, device)  # DDP under torchrun: gradients averaged over the processes
    with _progress() as progress:
        task = progress.add_task("", total=total, completed=start_epoch * s.steps_per_epoch, stage="stage 1")
        for epoch in range(start_epoch, s.epochs):
            rng = np.random.default_rng([cfg.seed, epoch])  # the same on every process: the hard-negative pool
            if n_hard and epoch > 0:
                pool = np.sort(rng.choice(neg, min(s.hard_pool, len(neg)), replace=False))
                scores, peaks = slice_scores_and_peaks(model, cache, pool, device, autocast=passes)
                top = np.argsort(-scores)[: max(1, len(pool) // 4)]
                hard = pool[top]
                hard_spots = np.column_stack([hard, peaks[top]])
            plan = EpochPlan(cache.folder, cfg.preprocess.context, s, windows, pos, neg, neg_p, hard, hard_spots,
                             annotated, masks, small_spots, crop_plan, n_pos, n_matched, n_hard, batch_size, crop_size,
                             cfg.seed, epoch, r.rank, s.steps_per_epoch)
            batches = iter(epoch_loader(plan, cache, s.workers, pin=device.type == "cuda"))
            model.train()
            t0, sums = time.perf_counter(), {"loss": 0.0, "bce": 0.0, "attention": 0.0, "annotated": 0, "wait": 0.0}
            for step in range(s.steps_per_epoch):
                waited = time.perf_counter()
                b = next(batches)
                sums["wait"] += time.perf_counter() - waited
                has_mask = b["has_mask"]
                # Full slices, then crops: two forward passes, two backward passes, one optimiser step
                # (the gradient of the mean of both losses; under DDP the first pass does not sync).
                half = 0.5 if crop_plan is not None else 1.0
                opt.zero_grad(set_to_none=True)
                with net.no_sync() if r.active and crop_plan is not None else nullcontext():  # type: ignore[operator]
                    bce, att = batch_loss(net, s, b["x"], b["m"], b["labels"], has_mask, device, autocast)
                    part = bce + s.attention_weight * att
                    _finite(part, epoch, step)
                    (half * part).backward()
                if crop_plan is not None:
                    cbce, catt = batch_loss(net, s, b["cx"], b["cm"], b["clabels"],
                                            torch.ones(len(b["clabels"]), dtype=torch.bool), device, autocast)
                    cpart = cbce + s.attention_weight * catt
                    _finite(cpart, epoch, step)
                    (half * cpart).backward()
                    bce, att = (bce + cbce) / 2, (att + catt) / 2
                loss = (bce + s.attention_weight * att).detach()
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
                opt.step()
                sched.step()
                sums["loss"] += loss.item()
                sums["bce"] += bce.item()
                sums["attention"] += att.item()
                sums["annotated"] += int(has_mask.sum())
                progress.update(task, advance=1, description=f"epoch {epoch + 1}/{s.epochs} "
                                f"loss {sums['loss'] / (step + 1):.3f} (bce {sums['bce'] / (step + 1):.3f}, "
                                f"attention {sums['attention'] / (step + 1):.3f})")
            val_auc = float("nan")
            if len(vpos) and r.main:  # rank 0 validates; every process takes its figure
                val_auc = roc_auc(val_labels, slice_scores(model, cache, val_rows, device, autocast=passes))
            val_auc = distributed.broadcast_float(val_auc)
            n = s.steps_per_epoch
            mean = distributed.mean_over_ranks([sums["loss"], sums["bce"], sums["attention"], sums["annotated"]])
            row = {"epoch": epoch + 1, "loss": mean[0] / n, "bce": mean[1] / n,
                   "attention": mean[2] / n, "annotated_per_batch": mean[3] / n * r.world,
                   "val_slice_auc": val_auc, "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t0,
                   "loader_wait_seconds": sums["wait"]}
            improved = np.isnan(val_auc) or val_auc >= best
            if improved and not np.isnan(val_auc):
                best = val_auc
            if not r.main:
                distributed.barrier()  # rank 0 writes the epoch's log and checkpoints
                continue
            payload = {"stage": "stage1", "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                       "scheduler": sched.state_dict(), "config": cfg.model_dump(mode="json"),
                       "preprocess": cfg.preprocess.spec().to_dict(), "feature_dim": model.feature_dim,
                       "best": best, "val_slice_auc": val_auc}
            if improved:
                save_checkpoint(best_path, payload)
            save_checkpoint(last, payload)
            # the epoch's log line after its checkpoint: a run killed in between repeats no logged epoch
            log.write(row)
            if on_epoch:
                on_epoch(row)
            if not console.is_terminal:  # a log file gets one line per epoch (the bar shows only at the end)
                console.print(f"stage 1 epoch {epoch + 1}/{s.epochs}: loss {row['loss']:.3f} (bce {row['bce']:.3f}, "
                              f"attention {row['attention']:.3f}), val slice AUC {val_auc:.3f}, "
                              f"{row['seconds']:.0f} s")
            distributed.barrier()
    return best_path


def _finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(f"stage 1: loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")


def load_slice_net(path: Path, device: torch.device) -> tuple[SliceNet, dict]:
    ckpt = load_checkpoint(path)
    cfg = TrainConfig.model_validate(ckpt["config"])
    model = build_slice_net(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def extract_features(cfg: TrainConfig, cache: SliceCache, run_dir: Path) -> Path:
    """Run the best stage-1 network over every cached slice: features.npy and slice_logits.npy.

    Under torchrun rank 0 extracts and the other processes wait for its files."""
    out = run_dir / "features.npy"
    if not distributed.ranks().main:
        distributed.barrier()
        return out
    device = pick_device(cfg.device)
    model, ckpt = load_slice_net(run_dir / "stage1.pt", device)
    if PreprocessSpec.from_dict(ckpt["preprocess"]) != cfg.preprocess.spec():
        raise TrainingError("the stage-1 checkpoint was trained with another preprocessing than this config")
    n = len(cache.images)
    feats = np.zeros((n, model.feature_dim), dtype=np.float32)
    logits = np.zeros(n, dtype=np.float32)
    with _progress() as progress, torch.no_grad():
        task = progress.add_task("extracting features", total=n, stage="features")
        for lo in range(0, n, 64):
            x = torch.from_numpy(to_float(cache.images[lo:lo + 64])).to(device)
            logit, feature, _ = model(x)
            feats[lo:lo + len(x)] = feature.float().cpu().numpy()
            logits[lo:lo + len(x)] = logit.float().cpu().numpy()
            progress.update(task, advance=len(x))
    np.save(run_dir / "slice_logits.npy", logits)
    np.save(out, feats)
    distributed.barrier()
    return out


def study_sequences(cache: SliceCache, feats: np.ndarray, uids: list[str]):
    """(features, study label, image labels) of each study, slices head first."""
    seqs = []
    for uid in uids:
        st = cache.study(uid)
        rows = slice(st["start"], st["start"] + st["count"])
        seqs.append((torch.from_numpy(feats[rows]), float(st["label"]),
                     torch.tensor(st["image_labels"], dtype=torch.float32)))
    return seqs


def _pad(batch, device):
    lengths = torch.tensor([len(f) for f, _, _ in batch])
    t = int(lengths.max())
    x = torch.zeros(len(batch), t, batch[0][0].shape[1])
    y = torch.tensor([lab for _, lab, _ in batch])
    sl = torch.full((len(batch), t), -1.0)
    for i, (f, _, s) in enumerate(batch):
        x[i, :len(f)], sl[i, :len(f)] = f, s
    return x.to(device), lengths, y.to(device), sl.to(device)


def study_scores(model: torch.nn.Module, seqs, device) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.array([torch.sigmoid(model(f[None].to(device))[0]).item() for f, _, _ in seqs])


def keeps_epoch(keep: Literal["val_loss", "val_auc"], val_auc: float, val_loss: float, best_auc: float,
                best_loss: float) -> bool:
    """Whether stage 2 keeps this epoch's weights over the ones kept so far (``stage2.keep``); an epoch
    without validation figures (no validation studies) is always kept, so the last one stays."""
    if keep == "val_loss":
        return bool(np.isnan(val_loss) or val_loss < best_loss)
    return bool(np.isnan(val_auc) or (val_auc, -val_loss) >= (best_auc, -best_loss))


def train_stage2(cfg: TrainConfig, cache: SliceCache, splits: dict[str, list[str]], run_dir: Path,
                 on_epoch: Callable[[dict], None] | None = None) -> Path:
    """Train the sequence model on frozen stage-1 features; returns the checkpoint of the epoch ``stage2.keep``
    chose (the lowest validation loss, or the highest validation study AUC)."""
    s = cfg.stage2
    device = pick_device(cfg.device)
    r = distributed.ranks()
    seed_everything(cfg.seed + 1)
    feats = np.load(run_dir / "features.npy")
    train, val = study_sequences(cache, feats, splits["train"]), study_sequences(cache, feats, splits["val"])
    model = build_stage2(cfg, feats.shape[1]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    log, best, best_loss, path = EpochLog(run_dir, "stage2"), -1.0, np.inf, run_dir / "stage2.pt"
    rng = np.random.default_rng(cfg.seed)
    train_rows = np.concatenate([f.numpy() for f, _, _ in train]) if train else feats
    spread = torch.from_numpy(train_rows.std(axis=0).astype(np.float32))[None, None, :]
    net = distributed.wrap(model, device, some_unused=True)
    with _progress() as progress:
        task = progress.add_task("", total=s.epochs, stage="stage 2")
        for epoch in range(s.epochs):
            model.train()
            order, total = rng.permutation(len(train)), 0.0  # the same order on every process
            for lo in range(0, len(order), s.batch_size):
                batch = order[lo:lo + s.batch_size]
                if len(batch) < r.world:  # a last batch too small to share: every process skips it
                    continue
                batch = batch[r.rank::r.world]  # this process's share of the batch
                x, lengths, y, sl = _pad([train[i] for i in batch], device)
                if s.feature_scale > 0 or s.feature_noise > 0:
                    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
                    scale = torch.exp(s.feature_scale * torch.randn(x.shape[0], 1, x.shape[2], generator=g))
                    noise = s.feature_noise * spread * torch.randn(x.shape, generator=g)
                    if cfg.stage1.enhancement:  # a calibrated HU figure, not an activation: left as measured
                        scale[..., -1], noise[..., -1] = 1.0, 0.0
                    x = x * scale.to(device) + noise.to(device)
                study_logit, slice_logits = net(x, lengths)
                loss = slice_loss(study_logit, y)
                known = sl >= 0
                if s.slice_loss_weight > 0 and bool(known.any()):
                    loss = loss + s.slice_loss_weight * slice_loss(slice_logits[known], sl[known])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                opt.step()
                total += loss.item() * len(y)
            val_auc = val_loss = float("nan")
            if r.main:  # rank 0 validates; every process takes its figures
                scores = study_scores(model, val, device)
                labels = np.array([lab for _, lab, _ in val])
                val_auc = roc_auc(labels, scores) if len(val) else float("nan")
                val_loss = float(np.mean(-(labels * np.log(scores + 1e-7) + (1 - labels) * np.log(1 - scores + 1e-7))))
            val_auc, val_loss = distributed.broadcast_float(val_auc), distributed.broadcast_float(val_loss)
            total = distributed.mean_over_ranks([total])[0] * r.world
            row = {"epoch": epoch + 1, "loss": total / len(train), "val_study_auc": val_auc, "val_loss": val_loss}
            if r.main:
                log.write(row)
            if r.main and not console.is_terminal and ((epoch + 1) % 10 == 0 or epoch + 1 == s.epochs):
                console.print(f"stage 2 epoch {epoch + 1}/{s.epochs}: loss {row['loss']:.3f}, "
                              f"val study AUC {val_auc:.3f}")
            if on_epoch:
                on_epoch(row)
            progress.update(task, advance=1, description=f"loss {row['loss']:.3f} val AUC {val_auc:.3f}")
            if keeps_epoch(s.keep, val_auc, val_loss, best, best_loss):
                best, best_loss = (val_auc if not np.isnan(val_auc) else best), val_loss
                if r.main:
                    save_checkpoint(path, {"stage": "stage2", "epoch": epoch, "model": model.state_dict(),
                                       "config": cfg.model_dump(mode="json"), "feature_dim": feats.shape[1],
                                       "val_study_auc": val_auc, "val_loss": val_loss})
    distributed.barrier()
    return path


def load_study_net(path: Path, device: torch.device) -> torch.nn.Module:
    ckpt = load_checkpoint(path)
    model = build_stage2(TrainConfig.model_validate(ckpt["config"]), ckpt["feature_dim"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
