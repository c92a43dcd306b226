"""Stage-1 training speed of the varied recipe: this machine's GPU against its CPU at 2 threads.

    python benchmarks/train_speed.py [--studies 32] [--workers 16] [--steps 100] [--cpu-steps 6]

Writes a small varied-family dataset with the phantom generator (``--workers`` processes; every
positive study masked, so a few studies give crops), caches it as training does, then runs the real
stage-1 loop of ``training/configs/varied.yaml`` (16 full slabs + 48 crops per step, full
augmentation, the cells attention loss) for two short epochs on each device: ``--steps`` steps on CUDA
when torch sees one, ``--cpu-steps`` on the CPU with 2 threads (the recipe machine's size), and times
the second epoch of each (the first carries warm-up). Also times one validation pass over 1,600
cached slabs, the other per-epoch cost.

Prints seconds per step on each device and their ratio, phantom studies per minute and cached slabs
per second at ``--workers``, and the recipe's stage 1 (26 + 28 epochs of 100 steps, each with a
1,600-slab validation pass and a 768-slab hard-negative pass) extrapolated on each device. The
extrapolation leaves out the data and cache time, printed apart.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from node.phantom import PhantomOptions
from node.phantom.dataset import write_rsna_dataset
from training.config import load_train_config
from training.data import build_cache, read_rsna, split_by_patient
from training.engine import build_slice_net, slice_scores, train_stage1

RECIPE = Path(__file__).resolve().parent.parent / "training" / "configs" / "varied.yaml"


def stage1_seconds_per_step(cache, splits: dict, device: str, steps: int, threads: int, run_dir: Path) -> float:
    """Seconds per step of the second of two stage-1 epochs (no validation pass inside the timing)."""
    cfg = load_train_config(RECIPE, [f"device={device}", f"threads={threads}", "stage1.epochs=2",
                                     f"stage1.steps_per_epoch={steps}"])
    torch.set_num_threads(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    no_val = {**splits, "val": []}  # the validation pass is timed apart
    train_stage1(cfg, cache, no_val, run_dir, on_epoch=rows.append)
    return rows[-1]["seconds"] / steps


def scoring_seconds(cache, device: str, threads: int, n: int = 1600) -> float:
    cfg = load_train_config(RECIPE, [f"device={device}"])
    torch.set_num_threads(threads)
    model = build_slice_net(cfg).to(torch.device(device))
    rows = np.sort(np.random.default_rng(0).choice(len(cache.images), min(n, len(cache.images)), replace=False))
    slice_scores(model, cache, rows[:64], torch.device(device))  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    slice_scores(model, cache, rows, torch.device(device))
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * n / len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=32)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cpu-steps", type=int, default=6)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}; GPU: {torch.cuda.get_device_name(0) if cuda else 'none'}; "
          f"{args.workers} phantom/cache workers", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "varied"
        t = time.perf_counter()
        write_rsna_dataset(root, studies=args.studies, positive_fraction=0.5, seed=11,
                           options=PhantomOptions(style="varied"), annotated_fraction=1.0, workers=args.workers)
        phantom_s = time.perf_counter() - t
        print(f"phantom: {args.studies} studies in {phantom_s:.0f} s "
              f"({60 * args.studies / phantom_s:.1f} studies/min)", flush=True)
        cfg = load_train_config(RECIPE)
        studies = read_rsna(root)
        parts = split_by_patient(studies, val_fraction=0.2, test_fraction=0.0, seed=0)
        splits = {k: [s.study_instance_uid for s in v] for k, v in parts.items()}
        t = time.perf_counter()
        cache = build_cache(studies, cfg.preprocess.spec(), Path(tmp) / "cache", workers=args.workers)
        cache_s = time.perf_counter() - t
        print(f"cache: {len(cache.images)} slabs in {cache_s:.0f} s ({len(cache.images) / cache_s:.0f} slabs/s)",
              flush=True)
        figures: dict[str, float] = {"phantom_studies_per_min": 60 * args.studies / phantom_s,
                                     "cache_slabs_per_s": len(cache.images) / cache_s}
        devices = [("cpu", args.cpu_steps, 2)] + ([("cuda", args.steps, 2)] if cuda else [])
        for device, steps, threads in devices:
            step = stage1_seconds_per_step(cache, splits, device, steps, threads, Path(tmp) / f"run-{device}")
            score = scoring_seconds(cache, device, threads)
            recipe_min = 54 * (100 * step + score * (1 + 768 / 1600)) / 60
            figures |= {f"{device}_s_per_step": step, f"{device}_s_per_1600_scored": score,
                        f"{device}_recipe_stage1_min": recipe_min}
            print(f"{device}: {step:.3f} s per stage-1 step; {score:.2f} s to score 1,600 slabs; "
                  f"recipe stage 1 (54 x 100 steps) ~ {recipe_min:.1f} min", flush=True)
        if cuda:
            print(f"ratio: a CUDA step takes {figures['cuda_s_per_step'] / figures['cpu_s_per_step']:.3f} "
                  f"of a 2-thread CPU step ({figures['cpu_s_per_step'] / figures['cuda_s_per_step']:.0f}x faster)")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
