"""Evaluation numbers: ROC AUC with a bootstrap interval, operating points, the pointing game."""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN when a class is absent."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=float)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_auc(labels: np.ndarray, scores: np.ndarray, n: int = 2000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC, resampling cases."""
    rng = np.random.default_rng(seed)
    labels, scores = np.asarray(labels), np.asarray(scores)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        auc = roc_auc(labels[idx], scores[idx])
        if not np.isnan(auc):
            values.append(auc)
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and the thresholds giving them (descending)."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=float)
    thresholds = np.concatenate([[np.inf], np.unique(scores)[::-1]])
    tpr = np.array([(scores[labels] >= t).mean() for t in thresholds])
    fpr = np.array([(scores[~labels] >= t).mean() for t in thresholds])
    return fpr, tpr, thresholds


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity reaches the target (on the split it is chosen on)."""
    _, tpr, thresholds = roc_curve(labels, scores)
    ok = np.nonzero(tpr >= target)[0]
    return float(thresholds[ok[0]]) if ok.size else float(np.min(scores))


def sensitivity_specificity(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=float)
    positive = scores >= threshold
    return float(positive[labels].mean()), float((~positive[~labels]).mean())


def pointing_hits(cams: np.ndarray, masks: np.ndarray, tolerance_px: float) -> np.ndarray:
    """Whether each CAM's peak lies inside its mask, or within ``tolerance_px`` of it.

    cams and masks share the input grid (N, S, S); masks are fractions (> 0 counts as inside).
    """
    hits = np.zeros(len(cams), dtype=bool)
    for i, (cam, mask) in enumerate(zip(cams, masks, strict=True)):
        r, c = np.unravel_index(int(np.argmax(cam)), cam.shape)
        rows, cols = np.nonzero(mask > 0)
        if rows.size:
            hits[i] = float(np.min(np.hypot(rows - r, cols - c))) <= tolerance_px
    return hits


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n (nan when n is 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
