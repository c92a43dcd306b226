"""Evaluate a run on its held-out split: report.json, roc.png and cam_grid.png in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from node.phantom.spec import EMBOLUS_LEVELS, most_central_level  # noqa: E402
from node.preprocess import to_float  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import SliceCache  # noqa: E402
from training.engine import load_slice_net, load_study_net, pick_device, study_scores, study_sequences  # noqa: E402
from training.losses import upsample_cam  # noqa: E402
from training.metrics import (  # noqa: E402
    bootstrap_auc,
    pointing_hits,
    roc_auc,
    roc_curve,
    sensitivity_specificity,
    threshold_for_sensitivity,
    wilson_interval,
)


def _annotated(cache: SliceCache, uids: list[str]) -> list[tuple[int, int, float]]:
    """(row, mask row, pixel mm) of every annotated slice of these studies."""
    out = []
    for uid in uids:
        st = cache.study(uid)
        out += [(st["start"] + int(k), m, st["pixel_mm"]) for k, m in sorted(st["mask_rows"].items(),
                                                                               key=lambda kv: int(kv[0]))]
    return out


def most_central_levels(*data_roots: Path) -> dict[str, str | None]:
    """Study UID -> the most central level of its emboli (None: no embolus), from the phantom datasets'
    ``phantom.json``; nothing for data without that ground truth (real datasets)."""
    out: dict[str, str | None] = {}
    for root in data_roots:
        truth = Path(root) / "phantom.json"
        if truth.is_file():
            for study in json.loads(truth.read_text())["studies"]:
                out[study["study_instance_uid"]] = most_central_level(study.get("emboli", []))
    return out


def max_slice_auc(cache: SliceCache, slice_logits: np.ndarray, uids: list[str],
                  levels: dict[str, str | None]) -> dict:
    """Study AUC of the largest stage-1 slice logit alone, on all studies and, where the most central
    level of each study is known, for the positives of each level against every negative.

    On the training split it says what stage 1 has learnt at all: a level near 0.5 there is one the
    network does not detect, whatever stage 2 does with it."""
    top, labels = {}, {}
    for uid in uids:
        st = cache.study(uid)
        if st["count"]:
            top[uid], labels[uid] = float(slice_logits[st["start"]:st["start"] + st["count"]].max()), int(st["label"])
    neg = [top[u] for u in top if labels[u] == 0]
    pos = [top[u] for u in top if labels[u] == 1]

    def auc(p: list[float]) -> float | None:
        if not p or not neg:
            return None
        return roc_auc(np.r_[np.ones(len(p)), np.zeros(len(neg))], np.r_[p, neg])

    out: dict = {"all": auc(pos), "positive": len(pos), "negative": len(neg)}
    if levels:
        by_level = {}
        for lv in EMBOLUS_LEVELS:
            at_level = [top[u] for u in top if labels[u] == 1 and levels.get(u) == lv]
            if at_level:
                by_level[lv] = {"positive": len(at_level), "auc": auc(at_level)}
        out["by_most_central_level"] = by_level
    return out


def _cams(model, cache: SliceCache, rows: list[int], device) -> np.ndarray:
    out = []
    with torch.no_grad():
        for lo in range(0, len(rows), 32):
            x = torch.from_numpy(to_float(cache.images[rows[lo:lo + 32]])).to(device)
            cam = model(x)[2]
            out.append(upsample_cam(cam.float(), (int(x.shape[-2]), int(x.shape[-1]))).cpu().numpy())
    size = cache.images.shape[-1]
    return np.concatenate(out) if out else np.zeros((0, size, size))


def _roc_png(path: Path, labels, scores, auc, ci, threshold, sens, spec) -> None:
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot(fpr, tpr, lw=2, label=f"study AUC {auc:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.scatter([1 - spec], [sens], c="red", zorder=3,
               label=f"threshold {threshold:.2f}: sens {sens:.2f}, spec {spec:.2f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"Held-out test split ({int(np.sum(labels))} PE / {int(len(labels) - np.sum(labels))} no PE)")
    ax.legend(loc="lower right", fontsize=8)
    ax.text(0.02, 0.98, "synthetic data - not for clinical use", transform=ax.transAxes, va="top", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cam_grid(path: Path, cache: SliceCache, rows, mask_rows, cams, hits, n: int) -> None:
    jet = colormaps["jet"]
    tiles = []
    for row, mrow, cam, hit in list(zip(rows, mask_rows, cams, hits, strict=True))[:n]:
        grey = cache.images[row, 0].astype(np.float32)  # PE window channel
        norm = (cam - cam.min()) / (cam.max() - cam.min() + 1e-6)
        heat = jet(norm)[..., :3] * 255.0
        rgb = 0.6 * np.repeat(grey[..., None], 3, axis=-1) + 0.4 * heat
        mask = cache.masks[mrow] > 0
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        rgb[edge] = [255, 255, 255]
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        r, c = (int(v) for v in np.unravel_index(int(np.argmax(cam)), cam.shape))
        draw.line([(c - 5, r), (c + 5, r)], fill=(0, 255, 0) if hit else (255, 0, 255), width=2)
        draw.line([(c, r - 5), (c, r + 5)], fill=(0, 255, 0) if hit else (255, 0, 255), width=2)
        tiles.append(img)
    if not tiles:
        return
    cols = min(4, len(tiles))
    rows_n = (len(tiles) + cols - 1) // cols
    size = tiles[0].width
    grid = Image.new("RGB", (cols * size, rows_n * size + 16), (0, 0, 0))
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * size, (i // cols) * size + 16))
    ImageDraw.Draw(grid).text((4, 2), "CAM (jet) on PE window; white: embolus mask; cross: CAM peak "
                              "(green hit, magenta miss) - synthetic", fill=(255, 255, 0))
    grid.save(path)


def _ci(rate: float, n) -> list[float]:
    n = int(n)
    return list(wilson_interval(int(round(rate * n)), n)) if n else [float("nan"), float("nan")]


def evaluate(cfg: TrainConfig, cache: SliceCache, splits: dict[str, list[str]], run_dir: Path) -> dict:
    """Score the held-out test split and write report.json, roc.png, cam_grid.png."""
    device = pick_device(cfg.device)
    feats = np.load(run_dir / "features.npy")
    slice_logits = np.load(run_dir / "slice_logits.npy")
    study_model = load_study_net(run_dir / "stage2.pt", device)
    val, test = study_sequences(cache, feats, splits["val"]), study_sequences(cache, feats, splits["test"])
    val_labels, test_labels = np.array([s[1] for s in val]), np.array([s[1] for s in test])
    val_scores, test_scores = study_scores(study_model, val, device), study_scores(study_model, test, device)
    threshold = threshold_for_sensitivity(val_labels, val_scores, cfg.eval.target_sensitivity)
    auc = roc_auc(test_labels, test_scores)
    ci = bootstrap_auc(test_labels, test_scores, n=cfg.eval.bootstrap, seed=cfg.seed)
    sens, spec = sensitivity_specificity(test_labels, test_scores, threshold)
    val_sens, val_spec = sensitivity_specificity(val_labels, val_scores, threshold)
    rows, labels = [], []
    for uid in splits["test"]:
        st = cache.study(uid)
        for k, lab in enumerate(st["image_labels"]):
            if lab >= 0:
                rows.append(st["start"] + k)
                labels.append(lab)
    slice_auc = roc_auc(np.array(labels), slice_logits[rows]) if rows else float("nan")
    model, _ = load_slice_net(run_dir / "stage1.pt", device)
    annotated = _annotated(cache, splits["test"])
    a_rows, m_rows = [a[0] for a in annotated], [a[1] for a in annotated]
    cams = _cams(model, cache, a_rows, device)
    masks = np.stack([cache.masks[m] for m in m_rows]) if m_rows else np.zeros((0, 1, 1))
    tol_px = np.array([cfg.eval.pointing_tolerance_mm / a[2] for a in annotated])
    hits = np.array([pointing_hits(cams[i:i + 1], masks[i:i + 1], tol_px[i])[0] for i in range(len(a_rows))])
    strict = pointing_hits(cams, masks, 0.0) if len(a_rows) else np.zeros(0, dtype=bool)
    levels = most_central_levels(cfg.data.root, *cfg.data.train_extra)
    report = {
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "test_studies": {"positive": int(test_labels.sum()), "negative": int(len(test_labels) - test_labels.sum())},
        "study_auc": auc, "study_auc_ci95": list(ci),
        "operating_point": {"threshold": threshold, "chosen_on": "val",
                            "target_sensitivity": cfg.eval.target_sensitivity,
                            "val_sensitivity": val_sens, "val_specificity": val_spec,
                            "test_sensitivity": sens, "test_specificity": spec,
                            "val_studies": {"positive": int(val_labels.sum()),
                                            "negative": int(len(val_labels) - val_labels.sum())},
                            "val_sensitivity_ci95": _ci(val_sens, val_labels.sum()),
                            "val_specificity_ci95": _ci(val_spec, len(val_labels) - val_labels.sum()),
                            "test_sensitivity_ci95": _ci(sens, test_labels.sum()),
                            "test_specificity_ci95": _ci(spec, len(test_labels) - test_labels.sum())},
        "slice_auc_stage1": slice_auc,
        "pointing_game": {"slices": len(a_rows), "tolerance_mm": cfg.eval.pointing_tolerance_mm,
                          "score": float(hits.mean()) if len(hits) else float("nan"),
                          "score_strict_inside_mask": float(strict.mean()) if len(strict) else float("nan")},
        "stage1_max_slice_study_auc": {name: max_slice_auc(cache, slice_logits, splits[name], levels)
                                       for name in ("train", "val")},
        "attention_weight": cfg.stage1.attention_weight, "attention_loss": cfg.stage1.attention_loss,
        "synthetic_data": True,
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    if len(test_labels) and 0 < test_labels.sum() < len(test_labels):
        _roc_png(run_dir / "roc.png", test_labels, test_scores, auc, ci, threshold, sens, spec)
    _cam_grid(run_dir / "cam_grid.png", cache, a_rows, m_rows, cams, hits, cfg.eval.overlay_examples)
    return report
