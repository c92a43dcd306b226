"""Can the stage-1 input itself tell a study's arterial enhancement? (Training split only.)

The weak-bolus PE-negative studies are the ones the bundles flag most (docs/training.md, "Which
PE-negative studies bundle 0.4.0 flags"); giving stage 2 the study's enhancement needs a number the
node and training both compute from the same input. This reads a slab cache's first channel, the
PE window (its centre and width from the cache's own layout.json: 0..255 -> the window's ends),
keeps the central 60 % of the field and the middle half of each study's slabs (where the pulmonary
arteries are), and ranks candidate study statistics against the phantom's drawn arterial lumen HU
(phantom.json ``artery_hu``), the last of them the one ``stage1.enhancement`` computes (training/models.py):

    .venv/bin/python scripts/bolus_from_input.py --cache data/varied/.cache/8e78324b57e4c310 \\
        --phantom data/varied/phantom.json --splits runs/v16/splits.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from node.preprocess import BOLUS_FLOOR_HU, bolus_region
from training.data import open_cache
from training.models import slab_enhancement, study_enhancement


def study_statistics(slabs: np.ndarray, low: float, top: float) -> dict[str, float]:
    """(N, H, W) PE-window bytes of one study, the window's ends in HU -> candidate enhancement statistics."""
    n = len(slabs)
    hu = low + bolus_region(slabs).astype(np.float32) / 255 * (top - low)
    bright = hu[(hu > BOLUS_FLOOR_HU) & (hu < top - 1)]
    out = {f"p{q} of {BOLUS_FLOOR_HU:.0f}-{top - 1:.0f} HU": float(np.percentile(bright, q)) if bright.size else 0.0
           for q in (50, 75, 90, 99)}
    out["fraction at the window's top"] = float((hu >= top - 1).mean())
    # what stage1.enhancement computes in the exported graph, per slab, and stage 2 averages
    per_slab = slab_enhancement(torch.from_numpy(slabs.astype(np.float32) / 255.0), low, top)
    valid = torch.ones(1, n, dtype=torch.bool)
    out["stage1.enhancement (graph)"] = float(study_enhancement(per_slab[None], valid)[0])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--phantom", required=True)
    parser.add_argument("--splits", required=True)
    parser.add_argument("--split", default="train")
    args = parser.parse_args()
    cache = open_cache(args.cache)
    centre, width = json.loads((Path(args.cache) / "layout.json").read_text())["spec"]["windows"][0]
    low, top = centre - width / 2, centre + width / 2
    keep = set(json.load(open(args.splits))[args.split])
    drawn = {s["study_instance_uid"]: s["artery_hu"] for s in json.load(open(args.phantom))["studies"]}
    truth, stats = [], []
    for study in cache.studies:
        uid = study["study_instance_uid"]
        if uid in keep and uid in drawn:
            truth.append(drawn[uid])
            slabs = np.asarray(cache.images[study["start"]:study["start"] + study["count"], 0])
            stats.append(study_statistics(slabs, low, top))
    print(f"{len(truth)} {args.split} studies: Spearman correlation with the drawn arterial lumen HU")
    for name in stats[0]:
        print(f"  {name}: {spearmanr(truth, [s[name] for s in stats]).statistic:+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
