"""Crops of cached slices for stage 1: emboli seen large and often, confounders seen close up.

A slab's embolus covers a median 24 of 36,864 input pixels (the varied family at 1.5 mm pixels), so a
full-slice batch spends almost all of its compute on pixels that teach nothing new. Crops of a few
centimetres make four times as many samples for the same compute and let the loss look closely at
what matters. The class activation map is fully convolutional, so the network trained on crops runs
on full slices at inference unchanged; the full-slice steps that alternate with crop steps keep its
slice logit calibrated on whole slices.

Three kinds of crop, all from the training split only:

- ``embolus``: from an annotated PE slab, around a random pixel of its mask (anywhere in the crop);
- ``beside``: from the same annotated slabs, a crop that holds none of the mask (same anatomy, same
  scan, no clot: the closest negative there is);
- ``vessel``: from PE-negative slabs, centred on a bright (contrast-filled) pixel most of the time:
  arteries, veins, the heart, flow artefacts, the confounders a clot hides among; with ``hard``, a
  share of them centred where the network's CAM peaked on its highest-scoring negatives last epoch.

Each crop's label and its pixel mask come from the slab's mask, so a crop that misses the clot is a
negative, never a mislabelled positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from training.losses import EMBOLUS_FRACTION

MASK_ON = math.ceil(EMBOLUS_FRACTION * 255)  # the same rule on the cache's mask bytes (102)


@dataclass(frozen=True)
class CropPlan:
    size: int
    embolus: float = 0.5  # shares of a crop batch
    beside: float = 0.2
    bright: float = 0.7  # share of vessel crops centred on a bright pixel
    bright_level: int = 146  # first-window byte of about 150 HU in the PE window (100, 700)
    hard: float = 0.0  # share of vessel crops centred on a hard negative's CAM peak (when given)
    small: float = 0.0  # share of embolus crops centred on a small clot's pixel (when given)


def small_clot_spots(masks: np.ndarray, annotated: np.ndarray, mask_of: dict[int, int], max_pixels: int = 10,
                     radius: int = 4) -> np.ndarray:
    """(k, 3) row, y, x of every clot pixel with at most ``max_pixels`` clot pixels within ``radius``.

    A pixel of a large clot has many clot neighbours, one of a segmental clot (a median 6 input pixels
    at 1.5 mm) few; the box count is that distinction without labelling components. Uniform crops
    draw a slab, then a pixel of its mask, so a slab with a lobar and a segmental clot is almost always
    cropped on the lobar one, and the 6 % of annotated slabs whose clots are all small rarely come up.
    """
    k = 2 * radius + 1
    spots = []
    for row in annotated:
        on = (np.asarray(masks[mask_of[int(row)]]) >= MASK_ON).astype(np.int32)
        if not on.any():
            continue
        c = np.pad(on, radius).cumsum(0).cumsum(1)
        c = np.pad(c, ((1, 0), (1, 0)))
        count = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]  # clot pixels in each pixel's box
        ys, xs = np.nonzero(on.astype(bool) & (count <= max_pixels))
        spots += [(int(row), int(y), int(x)) for y, x in zip(ys, xs, strict=True)]
    return np.array(spots, dtype=np.int64).reshape(-1, 3)


def _clamp(c: int, size: int, full: int) -> int:
    return int(min(max(c - size // 2, 0), full - size))


def _window(img: np.ndarray, mask: np.ndarray | None, cy: int, cx: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    full = img.shape[-1]
    y0, x0 = _clamp(cy, size, full), _clamp(cx, size, full)
    crop = img[:, y0:y0 + size, x0:x0 + size]
    m = np.zeros((size, size), np.uint8) if mask is None else mask[y0:y0 + size, x0:x0 + size]
    return crop, m


def crop_batch(images: np.ndarray, masks: np.ndarray, annotated: np.ndarray, mask_of: dict[int, int],
               negatives: np.ndarray, n: int, plan: CropPlan, rng: np.random.Generator,
               hard_spots: np.ndarray | None = None,
               small_spots: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n crops: images (n, C, s, s) uint8, masks (n, s, s) uint8 and labels (n,) from the crops' masks.

    ``annotated``: rows of annotated PE slabs; ``mask_of``: row -> mask row; ``negatives``: rows of
    PE-negative slabs; ``hard_spots``: (k, 3) PE-negative row, y, x where the network fired last;
    ``small_spots``: (k, 3) annotated row, y, x of small clots' pixels (``small_clot_spots``).
    """
    hard = hard_spots if hard_spots is not None and len(hard_spots) and plan.hard > 0 else None
    small = small_spots if small_spots is not None and len(small_spots) and plan.small > 0 else None
    s, full = plan.size, images.shape[-1]
    if s > full:
        raise ValueError(f"crop {s} is larger than the cached slices ({full})")
    n_emb = round(n * plan.embolus) if len(annotated) else 0
    n_bes = round(n * plan.beside) if len(annotated) else 0
    out_x = np.zeros((n, images.shape[1], s, s), np.uint8)
    out_m = np.zeros((n, s, s), np.uint8)
    half = s // 2 - max(2, s // 12)  # the clot stays at least this far inside the crop's edge
    for i in range(n):
        if i < n_emb + n_bes:
            row = int(rng.choice(annotated))
            img, mask = images[row], masks[mask_of[row]]
            ys, xs = np.nonzero(mask >= MASK_ON)
            if not len(ys):
                ys, xs = np.unravel_index([int(np.argmax(mask))], mask.shape)
            if i < n_emb and small is not None and rng.random() < plan.small:
                row, y, x = (int(v) for v in small[int(rng.integers(len(small)))])
                img, mask = images[row], masks[mask_of[row]]
                cy, cx = (int(v) for v in np.array([y, x]) + rng.integers(-half, half + 1, 2))
            elif i < n_emb:
                k = int(rng.integers(len(ys)))
                cy, cx = (int(v) for v in np.array([ys[k], xs[k]]) + rng.integers(-half, half + 1, 2))
            else:  # beside: a window clear of the clot, if one is found in a few tries
                cy = cx = -1
                for _ in range(12):
                    ty, tx = (int(v) for v in rng.integers(s // 2, full - s // 2 + 1, 2))
                    y0, x0 = _clamp(ty, s, full), _clamp(tx, s, full)
                    if not (mask[y0:y0 + s, x0:x0 + s] >= MASK_ON).any():
                        cy, cx = ty, tx
                        break
                if cy < 0:
                    row, mask = int(rng.choice(negatives)), None
                    img = images[row]
                    cy, cx = full // 2, full // 2
        elif hard is not None and rng.random() < plan.hard:
            row, cy, cx = (int(v) for v in hard[int(rng.integers(len(hard)))])
            img, mask = images[row], None
            cy, cx = (int(v) for v in np.array([cy, cx]) + rng.integers(-s // 4, s // 4 + 1, 2))
        else:
            row = int(rng.choice(negatives))
            img, mask = images[row], None
            cy, cx = (int(v) for v in rng.integers(s // 2, full - s // 2 + 1, 2))
            if rng.random() < plan.bright:
                ys, xs = np.nonzero(img[0, ::2, ::2] >= plan.bright_level)
                if len(ys):
                    k = int(rng.integers(len(ys)))
                    cy, cx = int(ys[k]) * 2 + int(rng.integers(-s // 4, s // 4 + 1)), int(xs[k]) * 2 + int(
                        rng.integers(-s // 4, s // 4 + 1))
        out_x[i], out_m[i] = _window(np.asarray(img), None if mask is None else np.asarray(mask), cy, cx, s)
    labels: np.ndarray = np.asarray((out_m >= MASK_ON).reshape(n, -1).any(axis=1), dtype=np.float32)
    return out_x, out_m, labels
