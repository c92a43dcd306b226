"""What stage 1 detects, level by level: study AUC of the largest slice logit, per run, on train and val.

    .venv/bin/python scripts/stage1_levels.py runs/v2 runs/v3 runs/v4 --out docs/stage1-levels.png

For each run folder (``config.yaml``, ``splits.json``, ``slice_logits.npy`` as ``petriage-train
features`` leaves them) the positives of each most central embolus level (from the phantom's
``phantom.json``) are ranked against every negative of the split by their largest stage-1 slice
logit. A level near 0.5 on the *training* split is one the network has not learnt at all. Only the
training and validation splits are read: this is a tool for choosing, and tests are not for choosing.
Prints a table and draws grouped bars (train hatched, val solid) as a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from node.phantom.spec import EMBOLUS_LEVELS  # noqa: E402
from training.config import load_train_config  # noqa: E402
from training.data import build_cache, read_datasets  # noqa: E402
from training.evaluate import max_slice_auc, most_central_levels  # noqa: E402

SPLITS = ("train", "val")


def run_levels(run: Path) -> dict:
    cfg = load_train_config(run / "config.yaml")
    studies = read_datasets(cfg.data.root, cfg.data.train_extra)
    cache = build_cache(studies, cfg.preprocess.spec(), cfg.data.cache_folder)
    logits = np.load(run / "slice_logits.npy")
    if len(logits) != len(cache.images):
        raise SystemExit(f"{run}: {len(logits)} slice logits for {len(cache.images)} cached slices")
    splits = json.loads((run / "splits.json").read_text())
    levels = most_central_levels(cfg.data.root, *cfg.data.train_extra)
    return {name: max_slice_auc(cache, logits, splits[name], levels) for name in SPLITS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="PNG to draw")
    args = parser.parse_args(argv)
    results = {}
    for run in args.runs:
        if not (run / "slice_logits.npy").is_file():
            print(f"{run}: no slice_logits.npy (run petriage-train features first)", file=sys.stderr)
            return 2
        results[run.name] = run_levels(run)
    levels = list(EMBOLUS_LEVELS)
    print("run      split  all     " + "  ".join(f"{lv:>17}" for lv in levels))
    for name, res in results.items():
        for split in SPLITS:
            by = res[split].get("by_most_central_level", {})
            cells = [f"{by[lv]['auc']:.3f} ({by[lv]['positive']:>3})" if lv in by else " " * 11 for lv in levels]
            print(f"{name:<8} {split:<6} {res[split]['all']:.3f}   " + "  ".join(f"{c:>17}" for c in cells))
    if args.out:
        groups = ["all", *levels]
        fig, ax = plt.subplots(figsize=(9, 4), dpi=120)
        width = 0.8 / (2 * len(results))
        for i, (name, res) in enumerate(results.items()):
            for j, split in enumerate(SPLITS):
                by = res[split].get("by_most_central_level", {})
                values = [res[split]["all"]] + [by[lv]["auc"] if lv in by and by[lv]["auc"] is not None
                                                 else np.nan for lv in levels]
                x = np.arange(len(groups)) + (2 * i + j - len(results)) * width + width / 2
                ax.bar(x, values, width, color=f"C{i}", hatch="//" if split == "train" else None,
                       alpha=0.6 if split == "train" else 1.0, label=f"{name} {split}")
        ax.axhline(0.5, ls="--", c="grey", lw=1)
        ax.set_xticks(np.arange(len(groups)), ["all PE", *[f"most central:\n{lv}" for lv in levels]])
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("study AUC of the largest slice logit")
        ax.set_title("What stage 1 detects, by the most central embolus level (train hatched, val solid)")
        ax.legend(fontsize=7, ncol=len(results), loc="lower left")
        ax.text(0.99, 0.02, "synthetic data - not for clinical use", transform=ax.transAxes, ha="right", fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out)
        plt.close(fig)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
