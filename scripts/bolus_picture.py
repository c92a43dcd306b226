"""The bolus augmentation on one cached training slab, weaker and stronger (docs/training-bolus-augmentation.png).

    .venv/bin/python scripts/bolus_picture.py data/varied/.cache/KEY [--study 5] [--out PNG]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.preprocess import to_float  # noqa: E402
from training.augment import AugmentRanges, bolus  # noqa: E402
from training.config import PreprocessSettings  # noqa: E402
from training.data import open_cache  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache", type=Path)
    ap.add_argument("--study", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("docs/training-bolus-augmentation.png"))
    a = ap.parse_args()
    cache = open_cache(a.cache)
    st = cache.studies[a.study]
    row = st["start"] + st["count"] // 2
    x = torch.from_numpy(to_float(np.asarray(cache.images[row:row + 1])))
    windows = [(float(c), float(w)) for c, w in PreprocessSettings().windows]
    size = x.shape[-1]
    lo, hi = size // 5, size - size // 5
    fig, ax = plt.subplots(2, 3, figsize=(12, 8.4))
    for i, k in enumerate([0.25, 1.0, 1.4]):
        y = bolus(x, windows, np.random.default_rng(0), AugmentRanges(bolus_probability=1.0, bolus_factor=(k, k)))
        for r, ch in enumerate([0, 1]):
            ax[r, i].imshow(y[0, ch, lo:hi, lo:hi], cmap="gray", vmin=0, vmax=1)
            ax[r, i].set_xticks([])
            ax[r, i].set_yticks([])
            ax[r, i].set_title(f"x {k} above 80 HU, {'PE' if ch == 0 else 'mediastinal'} window", fontsize=10)
    fig.suptitle("bolus augmentation on one training slab (training/augment.py, bolus)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=60)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
