"""Stage-1 augmentation on batches of cached model input (torch, on the training device).

Cached slices are already windowed (one channel per display window, 0-1), so intensity changes are
expressed in HU and mapped onto every channel exactly as the window maps HU: a study whose arteries
are 30 % brighter, or whose whole scale is shifted by 40 HU, changes all three channels
consistently. Values the window had clipped stay clipped, which is the one approximation here.

- bolus: the contrast bolus made weaker or stronger, which changes the enhanced blood and leaves soft
  tissue, fat, lung and clot where they are (HU above ``bolus_pivot`` pulled towards it), so that a
  grey artery in a weak bolus is seen as normal and only a lumen darker than the study's own blood as
  a clot (off unless ``bolus_probability`` > 0);
- intensity: HU scale and offset, window/level jitter per channel, gamma, Gaussian noise, blur or
  sharpening (a 3 x 3 kernel mixed in);
- geometry: rotation, isotropic scale, translation and left-right flip, applied alike to the image and
  its mask (bilinear), so the attention loss still points at the embolus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812


@dataclass(frozen=True)
class AugmentRanges:
    hu_scale: tuple[float, float] = (0.75, 1.3)
    hu_offset: tuple[float, float] = (-60.0, 60.0)
    window_jitter: float = 0.06  # relative change of each window's width and centre (in widths)
    gamma: tuple[float, float] = (0.75, 1.35)
    noise: tuple[float, float] = (0.0, 0.05)  # standard deviation, in window units
    blur_probability: float = 0.3
    sharpen_probability: float = 0.2
    rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.8, 1.25)
    shift: float = 0.08  # of the field
    flip_probability: float = 0.5
    bolus_probability: float = 0.0
    bolus_factor: tuple[float, float] = (0.25, 1.4)  # enhancement above the pivot times this (log-uniform)
    bolus_pivot: float = 80.0  # HU: soft tissue, clot and everything darker stay as they are


def bolus(x: torch.Tensor, windows: list[tuple[float, float]], rng: np.random.Generator,
          r: AugmentRanges = AugmentRanges()) -> torch.Tensor:
    """(B, C, S, S) windowed input -> the same slices with the enhancement above ``bolus_pivot`` scaled.

    Each pixel's HU is read from the first (PE) window, the widest over enhanced blood, of its own slab
    (a context channel is its neighbour's PE window), remapped, and written back through every
    channel's window; pixels the PE window clipped count as its top. Images not drawn are untouched,
    and nothing is drawn from ``rng`` when the probability is 0."""
    if r.bolus_probability <= 0:
        return x
    b = x.shape[0]
    chosen = rng.random(b) < r.bolus_probability
    factor = np.exp(rng.uniform(math.log(r.bolus_factor[0]), math.log(r.bolus_factor[1]), b))
    if not chosen.any():
        return x
    pe = windows[0]
    pe_lo, pe_width = pe[0] - pe[1] / 2.0, pe[1]
    k = torch.from_numpy(factor.astype(np.float32)).to(x.device)[:, None, None]
    out = x.clone()
    rows = torch.from_numpy(chosen).to(x.device)
    for c, (cw, ww) in enumerate(windows):
        source = c if (cw, ww) == pe else 0  # the PE-window channel that holds this pixel's HU
        hu = pe_lo + x[:, source] * pe_width
        above = hu > r.bolus_pivot
        remapped = torch.where(above, r.bolus_pivot + (hu - r.bolus_pivot) * k, hu)
        new = ((remapped - (cw - ww / 2.0)) / ww).clamp(0.0, 1.0)
        keep = ~(above & rows[:, None, None])
        out[:, c] = torch.where(keep, x[:, c], new)
    return out


def intensity(x: torch.Tensor, windows: list[tuple[float, float]], rng: np.random.Generator,
              r: AugmentRanges = AugmentRanges()) -> torch.Tensor:
    """(B, C, S, S) windowed input in 0-1 -> the same slices as if the HU had been rescaled."""
    x = bolus(x, windows, rng, r)
    b, c = x.shape[:2]
    dev = x.device
    a = torch.from_numpy(rng.uniform(*r.hu_scale, b).astype(np.float32)).to(dev)[:, None, None, None]
    off = torch.from_numpy(rng.uniform(*r.hu_offset, b).astype(np.float32)).to(dev)[:, None, None, None]
    lo = torch.tensor([cw - ww / 2.0 for cw, ww in windows], dtype=torch.float32, device=dev)[None, :, None, None]
    width = torch.tensor([ww for _, ww in windows], dtype=torch.float32, device=dev)[None, :, None, None]
    # HU' = a * HU + off; channel = (HU - lo) / width, so channel' = a * channel + (lo * (a - 1) + off) / width
    y = a * x + (lo * (a - 1.0) + off) / width
    jitter = torch.from_numpy(rng.normal(0.0, r.window_jitter, (b, c, 2)).astype(np.float32)).to(dev)
    jitter = jitter[:, [list(windows).index(w) for w in windows]]  # one window, one jitter (context channels)
    y = y * (1.0 + jitter[..., 0, None, None]) + jitter[..., 1, None, None]
    y = y.clamp(0.0, 1.0)
    gamma = torch.from_numpy(rng.uniform(*r.gamma, b).astype(np.float32)).to(dev)[:, None, None, None]
    y = y.clamp_min(1e-6) ** gamma
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float32, device=dev) / 16.0
    smooth = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), kernel.expand(c, 1, 3, 3), groups=c)
    mix = np.zeros(b, dtype=np.float32)
    u = rng.random(b)
    mix[u < r.blur_probability] = rng.uniform(0.3, 1.0, int((u < r.blur_probability).sum()))
    sharp = (u >= r.blur_probability) & (u < r.blur_probability + r.sharpen_probability)
    mix[sharp] = -rng.uniform(0.3, 1.0, int(sharp.sum()))
    m = torch.from_numpy(mix).to(dev)[:, None, None, None]
    y = y + m * (smooth - y)  # m > 0 blurs, m < 0 sharpens
    sigma = torch.from_numpy(rng.uniform(*r.noise, b).astype(np.float32)).to(dev)[:, None, None, None]
    gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))
    y = y + sigma * torch.randn(y.shape, generator=gen).to(dev)
    return y.clamp(0.0, 1.0)


def geometry(x: torch.Tensor, m: torch.Tensor, rng: np.random.Generator, windows: list[tuple[float, float]],
             r: AugmentRanges = AugmentRanges()) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation, scale, shift and left-right flip of images (B, C, S, S) and masks (B, S, S)."""
    b = x.shape[0]
    theta = np.radians(rng.uniform(-r.rotation_deg, r.rotation_deg, b))
    scale = np.exp(rng.uniform(math.log(r.scale[0]), math.log(r.scale[1]), b))
    flip = np.where(rng.random(b) < r.flip_probability, -1.0, 1.0)
    tx, ty = rng.uniform(-r.shift, r.shift, (2, b)) * 2.0
    # affine_grid maps output to input coordinates: a zoom-in by `scale` samples a smaller area.
    mat = np.zeros((b, 2, 3), dtype=np.float32)
    mat[:, 0, 0] = np.cos(theta) / scale * flip
    mat[:, 0, 1] = -np.sin(theta) / scale
    mat[:, 1, 0] = np.sin(theta) / scale * flip
    mat[:, 1, 1] = np.cos(theta) / scale
    mat[:, 0, 2], mat[:, 1, 2] = tx, ty
    grid = F.affine_grid(torch.from_numpy(mat).to(x.device), list(x.shape), align_corners=False)
    # Outside the field is air (-1000 HU), whatever each window makes of it.
    air = torch.tensor([min(max((-1000.0 - (cw - ww / 2.0)) / ww, 0.0), 1.0) for cw, ww in windows],
                       dtype=torch.float32, device=x.device)[None, :, None, None]
    x = F.grid_sample(x - air, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + air
    m = F.grid_sample(m[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    return x, m


def flip_shift(x: torch.Tensor, m: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-right flips and shifts of up to 6 % of the field, applied alike to images and masks."""
    x, m = x.clone(), m.clone()
    size = x.shape[-1]
    for i in range(x.shape[0]):
        if rng.random() < 0.5:
            x[i], m[i] = x[i].flip(-1), m[i].flip(-1)
        dy, dx = (int(v) for v in rng.integers(-size // 16, size // 16 + 1, 2))
        x[i], m[i] = x[i].roll((dy, dx), (-2, -1)), m[i].roll((dy, dx), (-2, -1))
    return x, m
