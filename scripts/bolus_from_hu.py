"""How well does a statistic of a study's HU on the input grid read its drawn arterial enhancement? (Training data.)

Measures the candidates behind ``node.preprocess.study_bolus_hu`` (which the bolus normalisation,
``preprocess.bolus_reference_hu``, uses): each study decoded, averaged into slabs and cropped and
resized as the spec does, then the central 60 % of the field and the middle half of the slabs; among
the pixels between a floor and a cap, a percentile. Ranked (Spearman) against the phantom's drawn
arterial lumen HU (phantom.json ``artery_hu``), with the interquartile range of statistic / truth:

    .venv/bin/python scripts/bolus_from_hu.py --data data/varied --splits runs/v18/splits.json --studies 80
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from node.preprocess import PreprocessSpec, bolus_region, study_bolus_hu, to_grid
from training.data import _slab_volume, read_datasets

SPEC = PreprocessSpec(size=192, field_mm=288.0, slab_mm=3.0)  # the recipe's grid


def statistics(study) -> dict[str, float]:
    volume, _, hu = _slab_volume(study, SPEC)
    grid = to_grid(hu, SPEC, volume.pixel_spacing_mm)
    middle = bolus_region(grid)
    out = {}
    for floor in (120, 150):
        for cap in (450, 700, 1000):
            blood = middle[(middle > floor) & (middle < cap)]
            for q in (50, 75, 90):
                out[f"p{q} of {floor}-{cap} HU"] = float(np.percentile(blood, q)) if blood.size else 0.0
    out["node.preprocess.study_bolus_hu"] = study_bolus_hu(grid) or 0.0
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--splits", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--studies", type=int, default=80)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    keep = set(json.loads(Path(args.splits).read_text())[args.split])
    drawn = {s["study_instance_uid"]: s["artery_hu"]
             for s in json.loads((Path(args.data) / "phantom.json").read_text())["studies"]}
    studies = [s for s in read_datasets(Path(args.data)) if s.study_instance_uid in keep & drawn.keys()][:args.studies]
    with ProcessPoolExecutor(args.workers) as pool:
        stats = list(pool.map(statistics, studies))
    truth = np.array([drawn[s.study_instance_uid] for s in studies])
    weak = truth < 250
    print(f"{len(studies)} {args.split} studies (drawn lumen {truth.min():.0f}-{truth.max():.0f} HU, median "
          f"{np.median(truth):.0f}): Spearman with the drawn HU; statistic / drawn, interquartile; the same on the "
          f"{int(weak.sum())} under 250 HU, median and largest")
    for name in stats[0]:
        v = np.array([s[name] for s in stats])
        ratio = v / truth
        print(f"  {name}: {spearmanr(truth, v).statistic:+.3f}; {np.percentile(ratio, 25):.2f}-"
              f"{np.percentile(ratio, 75):.2f}; weak {np.median(ratio[weak]):.2f}, {ratio[weak].max():.2f}; "
              f"median {np.median(v):.0f} HU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
