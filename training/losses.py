"""Stage-1 losses: slice classification plus the attention loss on annotated slices only."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

EMBOLUS_FRACTION = 0.4  # a pixel at least this much embolus counts as embolus (the phantom's voxel rule)


def upsample_cam(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) CAM to (B, H, W), bilinear."""
    return F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def attention_loss(cam: torch.Tensor, mask: torch.Tensor, form: str = "mass", hard_cells: int = 0) -> torch.Tensor:
    """Pull the attention map onto the embolus mask.

    Parameters
    ----------
    cam
        (B, h, w) class activation maps of annotated PE slices.
    mask
        (B, H, W) fraction of each input pixel inside an embolus (0-1).
    form
        ``mass``: the CAM, upsampled and normalised into a spatial distribution (softmax), should put
        its mass inside the mask; loss = -log(mass inside). ``mse``: the upsampled CAM, min-max
        normalised to 0-1, against the binary mask. ``cells``: every CAM cell against "holds embolus
        pixels" (``cell_loss``), plus, with ``hard_cells`` > 0, ``hard_cell_loss``.
    """
    up = upsample_cam(cam.float(), (int(mask.shape[-2]), int(mask.shape[-1])))
    target = (mask > 0).float().flatten(1)
    if form == "mass":
        p = torch.softmax(up.flatten(1), dim=1)
        return -torch.log((p * target).sum(dim=1) + 1e-6).mean()
    if form == "mse":
        flat = up.flatten(1)
        lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
        return F.mse_loss((flat - lo) / (hi - lo + 1e-6), target)
    if form == "cells":
        loss = cell_loss(cam, mask)
        return loss + hard_cell_loss(cam, mask, hard_cells) if hard_cells else loss
    raise ValueError(f"unknown attention loss {form!r}")


def slice_loss(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logit.float(), label.float())


def cell_loss(cam: torch.Tensor, mask: torch.Tensor, pos_weight: float = 4.0) -> torch.Tensor:
    """Every cell of the CAM as a detector: BCE against "this cell holds embolus pixels".

    ``mask`` (B, H, W) must be complete for these slices (annotated PE slices, or PE-negative slices
    whose mask is empty). A cell's target is 1 when any of its pixels is at least 40 % embolus (the
    slab labels' rule). This is the attention loss in its densest form: it pulls the attention map onto
    the mask and pushes it off everything else, the confounders included.
    """
    h, w = int(cam.shape[-2]), int(cam.shape[-1])
    target = F.adaptive_max_pool2d((mask >= EMBOLUS_FRACTION).float()[:, None], (h, w))[:, 0]
    weight = torch.tensor(pos_weight, device=cam.device)
    return F.binary_cross_entropy_with_logits(cam.float(), target, pos_weight=weight)


def hard_cell_loss(cam: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """The cells a study's verdict hangs on: every embolus cell, and each slice's k hottest other cells.

    A study is called by its hottest cell among some 10,000 (90 slabs of 12 x 12), so a clot must
    outscore every normal cell of its study, not the average one. ``cell_loss`` averages BCE over all
    cells, where the easy ones (air, bone, fat) outnumber an embolus cell by 100 to 1 and a normal
    hilum's hottest cell counts as one of 144. This term is the mean BCE of all embolus cells of the
    batch plus the mean BCE of the k highest-scoring non-embolus cells of each slice (online hard
    example mining at the cell level), so both weigh as much as the slice loss.
    """
    h, w = int(cam.shape[-2]), int(cam.shape[-1])
    target = F.adaptive_max_pool2d((mask >= EMBOLUS_FRACTION).float()[:, None], (h, w))[:, 0].flatten(1)
    flat = cam.float().flatten(1)
    bce = F.binary_cross_entropy_with_logits(flat, target, reduction="none")
    k = min(k, flat.shape[1])
    hottest = flat.masked_fill(target > 0, float("-inf")).topk(k, dim=1).indices  # non-embolus cells first
    negative = (target.gather(1, hottest) == 0).float()  # a slice with fewer than k of them keeps only those
    loss = (bce.gather(1, hottest) * negative).sum() / negative.sum().clamp(min=1.0)
    if bool((target > 0).any()):
        loss = loss + bce[target > 0].mean()
    return loss
