"""Stage-1 steps assembled and augmented by DataLoader workers, so the training loop only trains.

Each item of ``Stage1Steps`` is one whole step: the full-slice batch (positives, position-matched,
hard and plain negatives) and the crop batch, read from the memory-mapped cache and augmented. Step
``k`` of an epoch draws from its own random stream (seed, epoch, process rank, k), so the batches are
the same whether 0, 1 or 8 workers build them, and workers take steps round-robin, which is the order
the DataLoader hands them back in. A worker opens the cache itself (the memory maps are never pickled)
and runs torch on one thread; with a GPU the batches come in pinned memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from node.preprocess import to_float
from training.augment import AugmentRanges, flip_shift, geometry, intensity
from training.config import Stage1Settings
from training.crops import MASK_ON, CropPlan, crop_batch
from training.data import SliceCache, open_cache, with_context


@dataclass(frozen=True)
class EpochPlan:
    """What an epoch's batches are drawn from (picklable: rows and settings, never pixels)."""

    cache_folder: Path
    context: int
    settings: Stage1Settings
    windows: list[tuple[float, float]]
    pos: np.ndarray
    neg: np.ndarray
    neg_p: np.ndarray
    hard: np.ndarray
    hard_spots: np.ndarray
    annotated: np.ndarray
    masks: dict[int, int]
    small_spots: np.ndarray | None
    crop_plan: CropPlan | None
    n_pos: int
    n_matched: int
    n_hard: int
    batch_size: int
    crop_size: int
    seed: int
    epoch: int
    rank: int
    steps: int


def augment(s: Stage1Settings, images: np.ndarray, mask: np.ndarray, labels: np.ndarray, has_mask: np.ndarray,
            rng: np.random.Generator, windows: list[tuple[float, float]]
            ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """uint8 images and masks to the augmented float tensors a step trains on, and the labels of what the
    augmented images show (``follow_masks``)."""
    x = torch.from_numpy(to_float(images))
    m = torch.from_numpy(mask).float() / 255.0
    if s.augment and s.augmentation == "full":
        x, m = geometry(x, m, rng, windows)
        ranges = AugmentRanges(**s.intensity.model_dump(), bolus_probability=s.bolus_probability)
        x = intensity(x, windows, rng, ranges)
    elif s.augment:
        x, m = flip_shift(x, m, rng)
    return x, m, follow_masks(labels, m, has_mask)


CLOT_KEPT = MASK_ON / 255.0 / 2  # a clot still in the augmented image: a mask pixel at half the "on" level


def follow_masks(labels: np.ndarray, m: torch.Tensor, has_mask: np.ndarray) -> np.ndarray:
    """Labels of masked images after geometric augmentation: a positive whose every clot the rotation,
    zoom or shift moved out of the frame now shows no clot and is trained as negative (about 2 % of
    the small-clot crops, whose clot may sit 5 px from the crop's edge); images without a complete
    mask keep their label."""
    gone = (m.flatten(1).amax(dim=1) < CLOT_KEPT).numpy() & has_mask & (labels > 0)
    return np.where(gone, 0.0, labels).astype(np.float32)


def slab_rows(cache: SliceCache, rows: np.ndarray, masks: dict[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, masks and has-mask of these rows, read in row order (sequential reads of the memory map)."""
    rows = np.sort(rows)
    images = cache.images[rows]
    mask = np.zeros((len(rows), *images.shape[-2:]), dtype=np.uint8)
    has_mask = np.zeros(len(rows), dtype=bool)
    for i, r in enumerate(rows):
        if int(r) in masks:
            mask[i] = cache.masks[masks[int(r)]]
            has_mask[i] = True
    return images, mask, has_mask


def draw_step(cache: SliceCache, p: EpochPlan, step: int) -> dict[str, torch.Tensor]:
    """One step's batches, drawn from the step's own stream and augmented."""
    rng = np.random.default_rng([p.seed, p.epoch, p.rank, step])
    k_hard = p.n_hard if len(p.hard) else 0
    rows = np.concatenate([rng.choice(p.pos, p.n_pos), rng.choice(p.neg, p.n_matched, p=p.neg_p),
                           rng.choice(p.hard, k_hard) if k_hard else np.zeros(0, dtype=np.int64),
                           rng.choice(p.neg, p.batch_size - p.n_pos - p.n_matched - k_hard)])
    images, mask, has_mask = slab_rows(cache, rows, p.masks)
    labels = np.isin(np.sort(rows), p.pos).astype(np.float32)
    x, m, labels = augment(p.settings, images, mask, labels, has_mask, rng, p.windows)
    out = {"x": x, "m": m, "labels": torch.from_numpy(labels), "has_mask": torch.from_numpy(has_mask)}
    if p.crop_plan is not None:
        cx, cm, clab = crop_batch(cache.images, cache.masks, p.annotated, p.masks, p.neg, p.crop_size, p.crop_plan,
                                  rng, p.hard_spots, p.small_spots)
        out["cx"], out["cm"], clab = augment(p.settings, cx, cm, clab, np.ones(len(clab), dtype=bool), rng, p.windows)
        out["clabels"] = torch.from_numpy(clab)
    return out


class Stage1Steps(IterableDataset):
    """An epoch's steps; a worker builds steps worker_id, worker_id + workers, ..."""

    def __init__(self, plan: EpochPlan, cache: SliceCache | None = None):
        self.plan, self._cache = plan, cache

    def __getstate__(self) -> dict:
        return {"plan": self.plan, "_cache": None}  # workers open the cache themselves

    def cache(self) -> SliceCache:
        if self._cache is None:
            self._cache = with_context(open_cache(self.plan.cache_folder), self.plan.context)
        return self._cache

    def __iter__(self):
        info = get_worker_info()
        first, every = (info.id, info.num_workers) if info is not None else (0, 1)
        cache = self.cache()
        for step in range(first, self.plan.steps, every):
            yield draw_step(cache, self.plan, step)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def epoch_loader(plan: EpochPlan, cache: SliceCache, workers: int, pin: bool) -> DataLoader:
    """The epoch's steps, built by ``workers`` processes (0: in this one)."""
    return DataLoader(Stage1Steps(plan, cache), batch_size=None, num_workers=workers, pin_memory=pin,
                      worker_init_fn=_one_thread if workers else None, prefetch_factor=2 if workers else None)
