"""Does the intensity augmentation let a weak bolus's lumen read like a clot? (Training split only.)

Every PE-negative training study's drawn arterial lumen HU and every drawn clot HU of the positive
training studies are painted as uniform slices, windowed as the recipe's cache windows them, and put
through the training loader's own augmentation (``training.loader.augment``: geometry, then the
intensity changes with the config's ``stage1.intensity`` ranges) many times. The HU each augmented
slice reads back through its window (the slice's mean, so the per-pixel noise averages out) is
compared between lumens and clots: the share of (clot, lumen) pairs in which the clot still reads
darker (1.0 without augmentation: the phantom draws clots at 0-90 HU, lumens at 150-600), and the
share of lumens read below the clots' drawn top (90 HU). Weak boluses (lumen under 250 HU) apart:

    .venv/bin/python scripts/intensity_overlap.py --data data/varied --splits runs/v18/splits.json \\
        --config training/configs/varied.yaml --set stage1.intensity.hu_scale=[0.9,1.1] ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from training.config import load_train_config
from training.loader import augment

CLOT_TOP_HU = 90.0  # node/phantom/styles.py: the varied family's embolus_hu is 0-90
SIZE = 32


def readings(values_hu: np.ndarray, cfg, repeats: int, rng: np.random.Generator) -> np.ndarray:
    """The HU each uniform slice of ``values_hu`` reads through each channel's window after augmentation: (C, N, R)."""
    windows = cfg.preprocess.channel_windows()
    lo = np.array([c - w / 2.0 for c, w in windows])[:, None]
    width = np.array([w for _, w in windows])[:, None]
    out = np.empty((len(windows), len(values_hu), repeats))
    for r in range(repeats):
        channel = np.clip((values_hu[None, :] - lo) / width, 0.0, 1.0)  # (C, N)
        images = np.rint(np.broadcast_to(channel.T[:, :, None, None], (len(values_hu), len(windows), SIZE, SIZE))
                         * 255.0).astype(np.uint8)
        mask = np.zeros((len(values_hu), SIZE, SIZE), dtype=np.uint8)
        labels = np.zeros(len(values_hu), dtype=np.float32)
        x, _, _ = augment(cfg.stage1, images, mask, labels, np.zeros(len(values_hu), bool), rng, windows)
        centre = x[:, :, SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4]  # away from rotated borders
        out[:, :, r] = (lo + centre.mean(dim=(2, 3)).numpy().T * width)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a phantom folder with phantom.json")
    parser.add_argument("--splits", type=Path, required=True, help="a run's splits.json: its training split is read")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cfg = load_train_config(args.config, args.overrides)
    train = set(json.loads(args.splits.read_text())["train"])
    studies = [s for s in json.loads((args.data / "phantom.json").read_text())["studies"]
               if s["study_instance_uid"] in train]
    lumens = np.array([s["artery_hu"] for s in studies if not s["pe_present"]])
    clots = np.array([e["hu"] for s in studies if s["pe_present"] for e in s["emboli"]])
    rng = np.random.default_rng(0)
    read_lumen, read_clot = readings(lumens, cfg, args.repeats, rng), readings(clots, cfg, args.repeats, rng)
    print(f"intensity ranges: {cfg.stage1.intensity}")
    print(f"{len(lumens)} negative lumens ({(lumens < 250).sum()} under 250 HU), {len(clots)} clots; "
          f"{args.repeats} augmentations each")
    for c, (centre, width) in enumerate(cfg.preprocess.channel_windows()):
        clot = read_clot[c].ravel()
        for name, keep in (("all lumens", lumens >= 0), ("lumens under 250 HU", lumens < 250)):
            lumen = read_lumen[c][keep].ravel()
            darker = np.mean(clot[:, None] < lumen[None, :]) if lumen.size else float("nan")
            below = np.mean(lumen < CLOT_TOP_HU) if lumen.size else float("nan")
            print(f"  window {centre:g}/{width:g}, {name}: clot reads darker in {darker:.3f} of pairs; "
                  f"lumen reads under {CLOT_TOP_HU:g} HU in {below:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
