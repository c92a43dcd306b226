"""Run a model bundle through the node's engine on fresh phantom studies it never saw; print the AUC.

    .venv/bin/python scripts/check_bundle.py [--bundle models/demo] [--studies 40] [--seed 900001] \
        [--out var/check-bundle]

The studies are drawn like the demo training set (``--matrix 256 --slices 64 --slice-spacing 4.5
--min-embolus-mm 10 --embolus-levels central,lobar``; change with the options) from seeds that the
training set did not use, written as DICOM, and analysed from the files by ``node.inference.Engine``
exactly as ``petriage analyze`` would. Prints each study's probability and decision, the AUC with a
95 % bootstrap interval, sensitivity and specificity at the bundle's operating point, and writes
``roc.png`` and ``results.json`` under ``--out``. Needs only the runtime (and matplotlib for the PNG).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from node.inference import Engine
from node.phantom import PhantomOptions, generate_study, write_study
from node.series import index_series


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/demo"))
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--seed", type=int, default=900001, help="first study seed (fresh seeds follow)")
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--slice-spacing", type=float, default=4.5)
    parser.add_argument("--min-embolus-mm", type=float, default=10.0)
    parser.add_argument("--embolus-levels", default="central,lobar")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--training-manifest", type=Path, default=Path("data/phantom/phantom.json"),
                        help="phantom.json of the training set: its seeds are refused here (if present)")
    parser.add_argument("--out", type=Path, default=Path("var/check-bundle"))
    args = parser.parse_args()
    used: set[int] = set()
    if args.training_manifest.is_file():
        used = {s["seed"] for s in json.loads(args.training_manifest.read_text())["studies"]}
    options = PhantomOptions(matrix=args.matrix, slices=args.slices, slice_spacing_mm=args.slice_spacing,
                             min_embolus_mm=args.min_embolus_mm,
                             embolus_levels=tuple(args.embolus_levels.split(",")))
    engine = Engine(args.bundle, device="cpu", precision=args.precision, threads=2)
    print(f"bundle {args.bundle}: {engine.describe()}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, seed = [], args.seed
    for i in range(args.studies):
        while seed in used:
            seed += 1
        pe = i % 2 == 0
        study = generate_study(seed, pe=pe, options=options)
        folder = args.out / "dicom" / str(seed)
        paths = write_study(study, folder)["ctpa"]
        start = time.perf_counter()
        result = engine.analyze(index_series(paths))
        rows.append({"seed": seed, "pe": pe, "probability": result.probability, "positive": result.positive,
                     "seconds": time.perf_counter() - start})
        print(f"{i + 1:3d}/{args.studies} seed {seed}: truth {'PE' if pe else 'no PE':5s} probability "
              f"{result.probability:.3f} -> {'PE suspected' if result.positive else 'not suspected'}")
        shutil.rmtree(folder)
        seed += 1
    labels = np.array([r["pe"] for r in rows], dtype=int)
    scores = np.array([r["probability"] for r in rows])
    decided = np.array([r["positive"] for r in rows])
    rng = np.random.default_rng(0)
    boots = []
    for _ in range(2000):
        idx = rng.integers(0, len(rows), len(rows))
        if 0 < labels[idx].sum() < len(idx):
            boots.append(auc(labels[idx], scores[idx]))
    value, ci = auc(labels, scores), (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)))
    sens = float(decided[labels == 1].mean())
    spec = float((~decided[labels == 0]).mean())
    print(f"AUC {value:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}) on {len(rows)} fresh studies; at the bundle's "
          f"operating point sensitivity {sens:.2f}, specificity {spec:.2f}; "
          f"{np.mean([r['seconds'] for r in rows]):.2f} s per study")
    (args.out / "results.json").write_text(json.dumps({"auc": value, "auc_ci95": ci, "sensitivity": sens,
                                                       "specificity": spec, "engine": engine.describe(),
                                                       "options": vars(args) | {"bundle": str(args.bundle),
                                                                                "out": str(args.out),
                                                                                "training_manifest": None},
                                                       "studies": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    order = np.argsort(-scores)
    tpr = np.concatenate([[0], np.cumsum(labels[order]) / labels.sum()])
    fpr = np.concatenate([[0], np.cumsum(1 - labels[order]) / (len(labels) - labels.sum())])
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot(fpr, tpr, lw=2, label=f"AUC {value:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.scatter([1 - spec], [sens], c="red", zorder=3, label=f"operating point: sens {sens:.2f}, spec {spec:.2f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"{args.bundle.name} via node.inference on {len(rows)} fresh phantom studies", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.text(0.02, 0.98, "synthetic data - not for clinical use", transform=ax.transAxes, va="top", fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "roc.png")
    print(f"wrote {args.out / 'roc.png'}, {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
