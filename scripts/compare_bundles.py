"""Two bundles on the same studies: the paired bootstrap interval of their study-AUC difference.

    .venv/bin/python scripts/compare_bundles.py OLD/results.json NEW/results.json --test segmental-val \
        [--out compare.png]

Both files come from ``scripts/check_bundle.py`` run on the same named test. The studies are matched
by StudyInstanceUID and resampled together (2,000 times), so the interval is that of the difference
on these studies, much narrower than the two AUCs' own intervals side by side. A change is better
than the old bundle on this set when the whole interval lies above zero. Draws both ROC curves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from training.metrics import roc_auc, roc_curve


def rows_of(path: Path, test: str) -> dict[str, tuple[bool, float]]:
    tests = json.loads(path.read_text())["tests"]
    found = [t for t in tests if t["test"] == test]
    if not found:
        raise SystemExit(f"{path}: no test named {test!r} (has: {', '.join(t['test'] for t in tests)})")
    return {r["study_instance_uid"]: (bool(r["pe"]), float(r["probability"])) for r in found[0]["rows"]}


def paired_difference(labels: np.ndarray, old: np.ndarray, new: np.ndarray, n: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """AUC(new) - AUC(old) and its percentile 95 % interval, resampling studies together."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        a, b = roc_auc(labels[idx], new[idx]), roc_auc(labels[idx], old[idx])
        if not (np.isnan(a) or np.isnan(b)):
            diffs.append(a - b)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return roc_auc(labels, new) - roc_auc(labels, old), float(lo), float(hi)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--test", required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    old, new = rows_of(args.old, args.test), rows_of(args.new, args.test)
    shared = sorted(set(old) & set(new))
    if len(shared) != len(old) or len(shared) != len(new):
        raise SystemExit(f"the two runs hold different studies ({len(old)} and {len(new)}, {len(shared)} shared)")
    labels = np.array([old[u][0] for u in shared])
    p_old, p_new = np.array([old[u][1] for u in shared]), np.array([new[u][1] for u in shared])
    diff, lo, hi = paired_difference(labels, p_old, p_new)
    print(f"{args.test}: {int(labels.sum())} positive, {int((~labels).sum())} negative studies")
    print(f"AUC old {roc_auc(labels, p_old):.3f}, new {roc_auc(labels, p_new):.3f}; "
          f"difference {diff:+.3f} (paired 95 % interval {lo:+.3f} to {hi:+.3f}): "
          f"{'better' if lo > 0 else 'worse' if hi < 0 else 'not shown different'}")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.8, 4.6))
        for name, p in (("old", p_old), ("new", p_new)):
            fpr, tpr, _ = roc_curve(labels, p)
            ax.plot(fpr, tpr, label=f"{name} ({args.__dict__[name].parent.name}): AUC {roc_auc(labels, p):.3f}")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"{args.test}: difference {diff:+.3f} ({lo:+.3f} to {hi:+.3f})", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
