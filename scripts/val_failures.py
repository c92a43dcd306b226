"""Where a bundle fails on the validation split among studies a reader would call easy: the
highest-scoring PE-negative studies and the lowest-scoring positives whose most central clot is central
or lobar, each shown on its highest-scoring slab (and, for positives, the slab at the middle of its
largest clot) with the stage-1 CAM over it. Validation data only (the studies that choose settings).

    .venv/bin/python scripts/val_failures.py --bundle models/demo --results runs/choose-030/results.json \
        --cache data/varied/.cache/KEY --out docs/training-val-failures.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.inference import Engine  # noqa: E402
from training.data import open_cache  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("models/demo"))
    ap.add_argument("--results", type=Path, required=True, help="check_bundle results.json with a 'val' test")
    ap.add_argument("--phantom", type=Path, default=Path("data/varied/phantom.json"))
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    cache = open_cache(a.cache)
    rows_of = {s["study_instance_uid"]: s for s in cache.studies}
    truth = {s["study_instance_uid"]: s for s in json.loads(a.phantom.read_text())["studies"]}
    test = next(t for t in json.loads(a.results.read_text())["tests"] if t["test"] == "val")
    negatives = sorted((r for r in test["rows"] if not r["pe"]), key=lambda r: -r["probability"])[:a.n]
    missed = sorted((r for r in test["rows"] if r["pe"] and r["level"] in ("central", "lobar")),
                    key=lambda r: r["probability"])[:a.n]
    engine = Engine(a.bundle, device="cpu", threads=1)
    fig, axes = plt.subplots(2, 2 * a.n, figsize=(4.2 * a.n * 2, 9.4))
    for c, row in enumerate(negatives + missed):
        uid = row["study_instance_uid"]
        st, t = rows_of[uid], truth[uid]
        x = np.asarray(cache.images[st["start"]:st["start"] + st["count"]])
        logits, _, cams = engine.run_slices(x)
        top = int(np.argmax(logits))
        show = [top]
        if t["emboli"]:
            largest = max(t["emboli"], key=lambda e: e["size_mm"])
            show.append(min(int(np.median(largest["slices"])) // max(row["slab"], 1), len(logits) - 1))
        for r, j in enumerate(show[:2]):
            ax = axes[r, c]
            size = x.shape[-1]
            lo, hi = size // 5, size - size // 5  # the chest's middle three fifths: hila and central arteries
            stride = size // cams.shape[-1]
            ax.imshow(x[j, 0][lo:hi, lo:hi], cmap="gray", vmin=0, vmax=255)
            cam = np.kron(cams[j], np.ones((stride, stride)))[lo:hi, lo:hi]
            ax.contour(cam, levels=[0.0, 2.0], colors=["yellow", "red"], linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            what = "highest slab" if r == 0 else f"largest clot: {largest['level']} {largest['size_mm']:.0f} mm " \
                                                 f"{largest['kind']}"
            ax.set_title(f"{what}\nslab {j + 1}/{len(logits)}, stage-1 logit {logits[j]:.1f}", fontsize=10)
        if len(show) < 2:
            axes[1, c].axis("off")
        kind = "PE-negative" if not row["pe"] else f"PE ({row['level']})"
        axes[0, c].text(0.0, 1.28, f"{kind}: p = {row['probability']:.2f}; arteries {t['artery_hu']:.0f} HU, "
                        f"noise {t['noise_sigma_hu']:.0f} HU", transform=axes[0, c].transAxes, fontsize=10)
    fig.suptitle(f"{engine.describe()['name']} {engine.describe()['version']} on the validation split: top "
                 f"{a.n} negatives, bottom {a.n} central/lobar positives (CAM contours: yellow logit 0, red logit 2)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=70)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
