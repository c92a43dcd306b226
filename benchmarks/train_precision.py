"""Stage-1 step time on the CPU: float32 (the baseline) against ``stage1.precision: bf16``.

    python benchmarks/train_precision.py [--config training/configs/varied.yaml] [--steps 8] [--rounds 3]

Builds the recipe's slice network and runs its training step as ``training.engine`` does (16 full
slabs and 48 crops of the config's sizes, forward and backward through ``batch_loss`` with the cells
attention loss, one AdamW step) on random inputs with a random mask, in float32 and in bfloat16
autocast with channels-last weights (``training_precision``), at ``--threads`` threads (2: the
recipe's machine). The two alternate for ``--rounds`` rounds of ``--steps`` timed steps after one warm-up
step; prints the median seconds per step of each and their ratio, and how far bfloat16's slice logits
and CAMs lie from float32's on the same weights in eval mode. Batch assembly and augmentation are
left out (the same in both); `train_speed.py` times the whole loop.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from training.config import load_train_config
from training.engine import batch_loss, build_slice_net, training_precision

RECIPE = Path(__file__).resolve().parent.parent / "training" / "configs" / "varied.yaml"


def step_seconds(cfg, precision: str, batches, steps: int) -> float:
    torch.manual_seed(0)
    s = cfg.stage1.model_copy(update={"precision": precision})
    model = build_slice_net(cfg)
    autocast = training_precision(model, s, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr)
    model.train()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for x, m, y in batches:
            known = torch.ones(len(y), dtype=torch.bool)
            bce, att = batch_loss(model, s, x, m, y, known, torch.device("cpu"), autocast)
            (0.5 * (bce + s.attention_weight * att)).backward()
        opt.step()
        if i:  # the first step carries oneDNN's warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def agreement(cfg, x: torch.Tensor) -> tuple[float, float]:
    """(max |logit difference|, max |CAM difference|) of bfloat16 against float32 on the same weights."""
    torch.manual_seed(0)
    ref = build_slice_net(cfg).eval()
    fast = build_slice_net(cfg).eval()
    fast.load_state_dict(ref.state_dict())
    autocast = training_precision(fast, cfg.stage1.model_copy(update={"precision": "bf16"}), torch.device("cpu"))
    with torch.no_grad():
        logit, _, cam = ref(x)
        with autocast:
            blogit, _, bcam = fast(x)
    return float((blogit.float() - logit).abs().max()), float((bcam.float() - cam).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=RECIPE)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_train_config(args.config)
    s, size, channels = cfg.stage1, cfg.preprocess.size, cfg.preprocess.spec().channels
    rng = np.random.default_rng(0)

    def batch(n: int, px: int):
        x = torch.from_numpy(rng.random((n, channels, px, px), dtype=np.float32))
        m = torch.zeros(n, px, px)
        m[: n // 2, px // 3: px // 3 + 6, px // 2: px // 2 + 6] = 1.0
        y = torch.tensor([1.0] * (n // 2) + [0.0] * (n - n // 2))
        return x, m, y

    batches = [batch(s.batch_size, size)] + ([batch(s.crop_batch, s.crop)] if s.crop else [])
    shapes = " + ".join(f"{len(b[2])} x {b[0].shape[-1]} px" for b in batches)
    print(f"stage-1 step of {args.config.name}: {shapes}, width {s.width}, {args.threads} threads, "
          f"{args.rounds} rounds of {args.steps} steps")
    timings: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        for precision in timings:
            timings[precision].append(step_seconds(cfg, precision, batches, args.steps))
            print(f"  round {r + 1}: {precision} {timings[precision][-1]:.3f} s/step", flush=True)
    fp32, bf16 = statistics.median(timings["fp32"]), statistics.median(timings["bf16"])
    dlogit, dcam = agreement(cfg, batches[0][0][:8])
    print(f"float32 (baseline)       {fp32:.3f} s/step  1.00x")
    print(f"bfloat16 + channels-last {bf16:.3f} s/step  {fp32 / bf16:.2f}x faster")
    print(f"bfloat16 against float32 on the same weights (eval, 8 slabs): logits differ by at most "
          f"{dlogit:.3f}, CAM cells by at most {dcam:.3f} (logit units)")


if __name__ == "__main__":
    main()
