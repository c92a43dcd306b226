"""Can a stage-1 network learn small (segmental) clots at all? A crop probe, for choosing the input.

Trains one stage-1 architecture from scratch for a fixed number of steps on 64-px crops of the
training split's cache: half centred (with jitter) on small clots (``small_clot_spots``), half the
recipe's negatives (beside the clot, bright vessels of PE-negative slabs), with the recipe's
augmentation and losses. Every ``--every`` steps it scores a fixed set of crops of another cache
(the segmental validation set: clots only in segmental and subsegmental arteries, every slice masked;
its negatives cropped from PE-negative studies where the clots lie, so a crop's place says nothing)
and prints the crop AUC and how often the CAM's peak cell holds the clot.

Architectures are compared at equal steps (run them side by side, one thread each):

- ``current``: the recipe's SliceNet (7x7 stride-2 stem and max pool: 6 mm cells before block 1);
- ``fine``: the same plus a branch at the input's own pixels (a 3x3 convolution at 1.5 mm, two at
  3 mm, a strided one to the stem's 6 mm grid) added to the stem's output, its last batch norm
  starting at zero (``FineBranch`` below; measured, no gain, so not in training/models.py);
- ``strided``: the stem's max pool replaced by a learned stride-2 convolution (a 3x3 max pool over a
  bright vessel keeps its wall and drops a dark clot a few pixels wide: the suspect it tests);
- ``dense``, ``dense8``: the CAM at stride 4 or 8 (``DenseCam``);
- ``conv3d``: the slab and its neighbours as one volume through (2+1)D residual blocks (``Trunk3d``),
  with ``--set preprocess.context=K``;
- ``tophat``: black top-hats of the PE window (closing minus image at ``--tophat`` pixel sizes, ``TopHat``)
  as extra input channels: how much darker a pixel is than the lumen around it.

``--set`` passes config overrides (``preprocess.context=1``: neighbouring slabs; ``stage1.augmentation=
flip-shift``: no intensity augmentation; ``preprocess.size=288``: 1.0 mm input pixels, with caches built at
that size, ``--size 96`` for the same 96 mm crops and ``--spot-pixels 22 --spot-radius 6`` for the same
small-clot rule in millimetres).

    python scripts/probe_small_clots.py --arch fine --steps 1500 --out runs/probe/fine.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.preprocess import to_float  # noqa: E402
from training.config import load_train_config  # noqa: E402
from training.crops import MASK_ON, CropPlan, crop_batch, small_clot_spots  # noqa: E402
from training.data import open_cache, with_context  # noqa: E402
from training.engine import _rows, _step_loss, build_slice_net  # noqa: E402
from training.metrics import roc_auc  # noqa: E402


class FineBranch(torch.nn.Module):
    """Convolutions at the input's own pixels, added to the stem's 6 mm output (the ``fine`` probe)."""

    def __init__(self, stem: torch.nn.Module, cin: int, width: int):
        super().__init__()
        nn = torch.nn
        self.stem = stem
        self.net = nn.Sequential(
            nn.Conv2d(cin, width // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True),
            nn.Conv2d(width // 2, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width))
        nn.init.zeros_(self.net[-1].weight)  # the branch starts silent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.stem(x) + self.net(x))


class DenseCam(torch.nn.Module):
    """A top-down path from the last block back to block 1's grid (stride 4: 6 mm cells at 1.5 mm pixels),
    the CAM computed there: the attention loss then says which 6 mm cell holds the clot, not which
    24 mm one (the ``dense`` probe). The coarse CAM is kept and upsampled into it, so the decoder's
    last convolution starts at zero and the network starts as the SliceNet it wraps."""

    def __init__(self, net: torch.nn.Module, width: int, stride: int = 4):
        super().__init__()
        nn = torch.nn
        self.net, self.stride = net, stride
        c = 2 * width
        self.lat4 = nn.Conv2d(8 * width, c, 1)
        self.lat2 = nn.Conv2d(2 * width, c, 1)
        self.lat1 = nn.Conv2d(width, c, 1) if stride == 4 else None
        self.head = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                  nn.Conv2d(c, 1, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor):
        f = torch.nn.functional
        n = self.net
        h = n.stem(x)
        feats = []
        for i, block in enumerate(n.body):
            h = block(h)
            if i in (1, 3):
                feats.append(h)
        coarse = torch.einsum("bchw,c->bhw", h, n.fc.weight[0]) + n.fc.bias[0]
        p = self.lat4(h)
        p = f.interpolate(p, size=feats[1].shape[-2:], mode="nearest") + self.lat2(feats[1])
        if self.lat1 is not None:
            p = f.interpolate(p, size=feats[0].shape[-2:], mode="nearest") + self.lat1(feats[0])
        fine = self.head(p)[:, 0]
        cam = f.interpolate(coarse[:, None], size=fine.shape[-2:], mode="bilinear", align_corners=False)[:, 0] + fine
        flat = cam.flatten(1)
        nn_ = torch.tensor(float(flat.shape[1]))
        logit = torch.logsumexp(flat, dim=1) - torch.log(nn_)
        return logit, h.mean(dim=(2, 3)), cam


class Block3d(torch.nn.Module):
    """A (2+1)D residual block on (B, C, D, H, W): 3 x 3 in each slab, then 3 taps across slabs (both as 2D
    convolutions, which run several times faster than Conv3d on CPU)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        nn = torch.nn
        self.spatial = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(inplace=True))
        self.across = nn.Sequential(nn.Conv2d(cout, cout, (3, 1), 1, (1, 0), bias=False), nn.BatchNorm2d(cout))
        nn.init.zeros_(self.across[-1].weight)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        flat = x.transpose(1, 2).reshape(b * d, c, h, w)
        y = self.spatial(flat)
        c2, h2, w2 = y.shape[1:]
        y = y.reshape(b, d, c2, h2 * w2).transpose(1, 2)  # (B, C, D, HW)
        y = self.across(y)
        skip = flat if self.down is None else self.down(flat)
        skip = skip.reshape(b, d, c2, h2 * w2).transpose(1, 2)
        return torch.relu(y + skip).reshape(b, c2, d, h2, w2)


class Trunk3d(torch.nn.Module):
    """The slab and its context as a 3D volume (the ``conv3d`` probe): a per-slab 2D stem, three stages of
    (2+1)D residual blocks that keep every slab (so a vessel is followed across them: bright above an
    occluding clot, grey in it), then the centre slab's features through the recipe's last 2D stage, CAM
    and log-mean-exp logit. Input: the recipe's channels (3 windows of the centre, then the neighbours'
    PE window, -1..-k, +1..+k); the volume is the PE window in slab order."""

    def __init__(self, net: torch.nn.Module, width: int, context: int):
        super().__init__()
        nn = torch.nn
        self.k = context
        self.stem = nn.Sequential(nn.Conv2d(1, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))  # per slab
        self.stages = nn.Sequential(Block3d(width, width, 1), Block3d(width, width, 1),
                                    Block3d(width, 2 * width, 2), Block3d(2 * width, 2 * width, 1),
                                    Block3d(2 * width, 4 * width, 2), Block3d(4 * width, 4 * width, 1))
        self.last = nn.Sequential(*list(net.body)[-2:])  # the recipe's dilated last stage (2D)
        self.fc = net.fc
        nn.init.kaiming_normal_(self.stem[0].weight, mode="fan_out", nonlinearity="relu")
        for m in self.stages.modules():
            if isinstance(m, nn.Conv2d) and m.weight.abs().sum() > 0:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor):
        k = self.k
        order = [3 + k - 1 - i for i in range(k)] + [0] + [3 + k + i for i in range(k)]
        b, d, size = x.shape[0], 2 * k + 1, x.shape[-1]
        v = self.stem(x[:, order].reshape(b * d, 1, size, size))  # every slab through the 2D stem
        v = v.reshape(b, d, *v.shape[1:]).transpose(1, 2)  # (B, C, D, H, W)
        h = self.stages(v)[:, :, k]  # the centre slab's features
        fmap = self.last(h)
        cam = torch.einsum("bchw,c->bhw", fmap, self.fc.weight[0]) + self.fc.bias[0]
        flat = cam.flatten(1)
        logit = torch.logsumexp(flat, dim=1) - torch.log(torch.tensor(float(flat.shape[1])))
        return logit, fmap.mean(dim=(2, 3)), cam


class TopHat(torch.nn.Module):
    """Black top-hats of the PE window channel appended to the input (the ``tophat`` probe): closing minus
    image with square structuring elements of ``sizes`` pixels, i.e. how much darker each pixel is than
    what surrounds it within that size: a filling defect in a bright lumen, whatever the bolus. Max
    pools only, so it exports to ONNX as part of the network."""

    def __init__(self, net: torch.nn.Module, cin: int, width: int, sizes: tuple[int, ...]):
        super().__init__()
        self.net, self.sizes = net, sizes
        net.stem[0] = torch.nn.Conv2d(cin + len(sizes), width, 7, 2, 3, bias=False)
        torch.nn.init.kaiming_normal_(net.stem[0].weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor):
        pool = torch.nn.functional.max_pool2d
        pe = x[:, :1]
        hats = []
        for k in self.sizes:
            closed = -pool(-pool(pe, k, 1, k // 2), k, 1, k // 2)
            hats.append(2.0 * (closed - pe))  # about 0-1 for a clot in an enhanced lumen
        return self.net(torch.cat([x, *hats], dim=1))


def _dilate(b: np.ndarray, r: int) -> np.ndarray:
    out = b.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(b, dy, -2), dx, -1)
    return out


def bright_border(pe: np.ndarray, clot: np.ndarray) -> int:
    """Pixels within 2 px of the clot that are contrast-filled lumen at least 150 HU brighter than the
    clot's mean (PE-window bytes of one crop or window, the clot's mask): the filling defect a reader
    sees. An occluded small artery, a grey dot among grey dots, has none."""
    hu = pe.astype(np.float32) / 255 * 700 - 250
    if not clot.any():
        return 0
    c = float(hu[clot].mean())
    ring = _dilate(clot, 2) & ~clot
    return int((ring & (hu >= max(150.0, c + 150.0)) & (hu < 700)).sum())


def bordered_spots(cache, spots: np.ndarray, masks: dict[int, int], need: int) -> np.ndarray:
    keep = []
    for k, (row, y, x) in enumerate(spots):
        y0, x0 = max(int(y) - 6, 0), max(int(x) - 6, 0)
        win = cache.images[int(row)][0, y0:y0 + 13, x0:x0 + 13]
        clot = np.asarray(cache.masks[masks[int(row)]])[y0:y0 + 13, x0:x0 + 13] >= MASK_ON
        if bright_border(win, clot) >= need:
            keep.append(k)
    return spots[keep]


def placed_negative_crops(cache, spots: np.ndarray, negative_studies: list[dict], n: int, size: int,
                          rng: np.random.Generator) -> np.ndarray:
    """n crops of PE-negative studies placed where small clots lie: a clot pixel's row, y and x are
    taken to a random PE-negative study at the same relative height and cropped with the clot crops'
    jitter, so a crop's place in the chest (lung periphery, near the hilum) says nothing."""
    full = cache.images.shape[-1]
    half = size // 2 - max(2, size // 12)
    where = {}
    for st in cache.studies:
        for k in range(st["count"]):
            where[st["start"] + k] = (k + 0.5) / st["count"]
    out = np.zeros((n, cache.images.shape[1], size, size), np.uint8)
    for i in range(n):
        row, y, x = (int(v) for v in spots[int(rng.integers(len(spots)))])
        st = negative_studies[int(rng.integers(len(negative_studies)))]
        other = st["start"] + min(int(where[row] * st["count"]), st["count"] - 1)
        cy, cx = (int(v) for v in np.array([y, x]) + rng.integers(-half, half + 1, 2))
        y0, x0 = (int(min(max(v - size // 2, 0), full - size)) for v in (cy, cx))
        out[i] = cache.images[other][:, y0:y0 + size, x0:x0 + size]
    return out


def batch_of(cache, annotated, masks, neg, small, negative_studies, n: int, size: int, rng: np.random.Generator):
    """Half small-clot crops, half crops of PE-negative studies at the same places."""
    plan = CropPlan(size, embolus=1.0, beside=0.0, small=1.0)
    px, pm, py = crop_batch(cache.images, cache.masks, annotated, masks, neg, n // 2, plan, rng, small_spots=small)
    nx = placed_negative_crops(cache, small, negative_studies, n - n // 2, size, rng)
    x = np.concatenate([px, nx])
    m = np.concatenate([pm, np.zeros((len(nx), size, size), np.uint8)])
    return x, m, np.concatenate([py, np.zeros(len(nx), np.float32)])


def rows_of(cache, uids: set[str], spot: tuple[int, int] = (10, 4)):
    pos, neg, masks = _rows(cache, uids)
    pos_set = set(pos.tolist())
    annotated = np.array(sorted(r for r in masks if r in pos_set), dtype=np.int64)
    negative_studies = [st for st in cache.studies if st["study_instance_uid"] in uids and not st["label"]]
    small = small_clot_spots(cache.masks, annotated, masks, max_pixels=spot[0], radius=spot[1])
    return annotated, masks, neg, small, negative_studies


def evaluate(model, x: np.ndarray, m: np.ndarray, y: np.ndarray, border: np.ndarray | None = None) -> dict:
    model.eval()
    logits, hits = [], []
    with torch.no_grad():
        for lo in range(0, len(x), 128):
            logit, _, cam = model(torch.from_numpy(to_float(x[lo:lo + 128])))
            logits.append(logit.numpy())
            h, w = cam.shape[-2:]
            on = torch.nn.functional.adaptive_max_pool2d(
                torch.from_numpy((m[lo:lo + 128] >= MASK_ON).astype(np.float32))[:, None], (h, w))[:, 0]
            peak = cam.flatten(1).argmax(1)
            hits.append(on.flatten(1)[torch.arange(len(peak)), peak].numpy())
    model.train()
    s, hit = np.concatenate(logits), np.concatenate(hits)
    evaluate.last_scores = s  # type: ignore[attr-defined]
    out = {"auc": roc_auc(y, s), "peak_on_clot": float(hit[y == 1].mean())}
    if border is not None:  # positives that show a filling defect (>= 4 bright pixels beside), against all negatives
        sel = (y == 0) | (border >= 4)
        out["auc_defects"] = roc_auc(y[sel], s[sel])
        sel = (y == 0) | ((y == 1) & (border == 0))
        out["auc_grey_dots"] = roc_auc(y[sel], s[sel])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=["current", "fine", "strided", "dense", "dense8", "conv3d", "tophat"],
                    required=True)
    ap.add_argument("--tophat", default="5,9", help="--arch tophat: structuring-element sizes in pixels")
    ap.add_argument("--config", type=Path, default=Path("training/configs/varied.yaml"))
    ap.add_argument("--splits", type=Path, default=Path("runs/v7/splits.json"))
    ap.add_argument("--train-cache", type=Path, required=True)
    ap.add_argument("--val-cache", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=150)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--spot-pixels", type=int, default=10,
                    help="a small clot: at most this many clot pixels within --spot-radius (scale with the pixel)")
    ap.add_argument("--spot-radius", type=int, default=4)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-fraction", type=float, default=1.0,
                    help="train on this share of the training split's studies (a learning-curve point)")
    ap.add_argument("--bordered", type=int, default=0,
                    help="train on small-clot spots with at least this many bright-lumen pixels beside the clot")
    ap.add_argument("--save-crops", type=Path, help="npz of the validation crops, masks, labels and last scores")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override, e.g. preprocess.context=1 or stage1.augmentation=flip-shift")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = load_train_config(a.config, a.overrides)
    s = cfg.stage1
    context = cfg.preprocess.context
    train, val = with_context(open_cache(a.train_cache), context), with_context(open_cache(a.val_cache), context)
    splits = json.loads(a.splits.read_text())
    rng = np.random.default_rng(0)
    spot = (a.spot_pixels, a.spot_radius)
    vx, vm, vy = batch_of(val, *rows_of(val, {st["study_instance_uid"] for st in val.studies}, spot), 2000, a.size,
                          np.random.default_rng(1))
    train_uids = sorted(splits["train"])
    if a.train_fraction < 1.0:
        keep = np.random.default_rng(2).permutation(len(train_uids))[:round(a.train_fraction * len(train_uids))]
        train_uids = [train_uids[int(i)] for i in keep]
    annotated, masks, neg, small, negative_studies = rows_of(train, set(train_uids), spot)
    vborder = np.array([bright_border(vx[i, 0], vm[i] >= MASK_ON) for i in range(len(vy))])
    if a.bordered:
        n0 = len(small)
        small = bordered_spots(train, small, masks, a.bordered)
        print(f"small-clot spots with >= {a.bordered} bright pixels beside: {len(small)} of {n0}", flush=True)
    plan = CropPlan(a.size, embolus=0.5, beside=0.15, small=1.0)
    model = build_slice_net(cfg)
    if a.arch == "fine":
        model.stem = FineBranch(model.stem, cfg.preprocess.spec().channels, s.width)
    elif a.arch == "strided":  # the stem's 3x3 max pool replaced by a learned stride-2 convolution
        model.stem[3] = torch.nn.Sequential(torch.nn.Conv2d(s.width, s.width, 3, 2, 1, bias=False),
                                            torch.nn.BatchNorm2d(s.width), torch.nn.ReLU(inplace=True))
    elif a.arch in ("dense", "dense8"):
        model = DenseCam(model, s.width, 4 if a.arch == "dense" else 8)
    elif a.arch == "conv3d":
        if not context:
            raise SystemExit("--arch conv3d needs neighbouring slabs: --set preprocess.context=K")
        model = Trunk3d(model, s.width, context)
    elif a.arch == "tophat":
        model = TopHat(model, cfg.preprocess.spec().channels, s.width, tuple(int(k) for k in a.tophat.split(",")))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=a.steps, pct_start=0.15)
    windows = cfg.preprocess.channel_windows()
    print(f"{a.arch}: {sum(p.numel() for p in model.parameters())} parameters; train small-clot pixels "
          f"{len(small)}; val crops {int(vy.sum())} with clot / {len(vy)}", flush=True)
    curve, t0 = [], time.time()
    for step in range(1, a.steps + 1):
        if step % 2:  # the recipe's crop mix with small clots, then small clots against small vessels
            x, m, y = crop_batch(train.images, train.masks, annotated, masks, neg, a.batch, plan, rng,
                                 small_spots=small)
        else:
            x, m, y = batch_of(train, annotated, masks, neg, small, negative_studies, a.batch, a.size, rng)
        has = np.ones(len(y), dtype=bool)
        bce, att = _step_loss(model, s, x, m, y, has, rng, windows, torch.device("cpu"),
                              torch.autocast("cpu", enabled=False))
        loss = bce + s.attention_weight * att
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        sched.step()
        if step % a.every == 0 or step == a.steps:
            row = {"step": step, "seconds": round(time.time() - t0), "bce": float(bce.detach()),
                   "att": float(att.detach()), **evaluate(model, vx, vm, vy, vborder)}
            curve.append(row)
            print(json.dumps(row), flush=True)
            a.out.write_text(json.dumps({"arch": a.arch, "overrides": a.overrides, "curve": curve}, indent=1))
    if a.save_crops:
        np.savez_compressed(a.save_crops, x=vx, m=vm, y=vy, scores=evaluate.last_scores)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
