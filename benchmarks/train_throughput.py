"""Stage-1 training throughput and data-loader stall: 1 process against 2 (torchrun), 0 against 2 loader workers.

    python benchmarks/train_throughput.py --root data/varied [--steps 8] [--json out.json]
    python benchmarks/train_throughput.py                      # a small phantom set written first

Runs ``petriage-train stage1`` with the recipe (training/configs/varied.yaml: 16 full slabs + 48 crops
per step, full augmentation, the cells loss) for two epochs of ``--steps`` steps, no validation split,
in four ways on this machine's CPUs, and times the second epoch from the run's own log: its seconds
and the seconds the loop waited for batches (``loader_wait_seconds``). The baseline is the plain run
(1 process, no loader workers); every other row prints its throughput as a ratio of the baseline's.
From the best row and from the GPU step time measured on a lent H200 (docs/training.md), it prints
the time of one RSNA-STR PE-sized epoch (1.79 M images of about 1.25 mm, 746 k slabs of 3 mm, each
slab once as a full slice) on 1 and on 8 GPUs; the 8-GPU figure assumes linear scaling and is an
estimate, not a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "training" / "configs" / "varied.yaml"
RSNA_SLABS = 1_790_000 * 1.25 / 3.0
H200_S_PER_STEP = 0.074  # docs/training.md, "On a lent GPU" (benchmarks/train_speed.py on an NVIDIA H200)


def run(name: str, root: Path, work: Path, steps: int, processes: int, workers: int) -> dict:
    out = work / name
    threads = max(1, (os.cpu_count() or 2) // processes)
    sets = [f"data.root={root}", "data.val_fraction=0", "data.test_fraction=0", "stage1.epochs=2",
            f"stage1.steps_per_epoch={steps}", f"stage1.workers={workers}", f"threads={threads}"]
    args = ["stage1", "--config", str(RECIPE), "--run-dir", str(out), *sum((["--set", s] for s in sets), [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if processes > 1:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(processes),
               "-m", "training.cli", *args]
    else:
        cmd = [sys.executable, "-m", "training.cli", *args]
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-2000:]}")
    last = json.loads((out / "stage1_log.jsonl").read_text().splitlines()[-1])
    slabs = (16 + 48) * steps
    return {"name": name, "processes": processes, "workers": workers, "threads_each": threads,
            "seconds": last["seconds"], "wait": last["loader_wait_seconds"], "slabs_per_s": slabs / last["seconds"],
            "s_per_step": last["seconds"] / steps, "wall_s": time.perf_counter() - t}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path,
                        help="an RSNA-layout dataset (its cache is reused); default: a new phantom set")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = a.root
        if root is None:
            from node.phantom import PhantomOptions
            from node.phantom.dataset import write_rsna_dataset

            root = work / "varied"
            write_rsna_dataset(root, studies=16, positive_fraction=0.5, seed=11, options=PhantomOptions(style="varied"),
                               annotated_fraction=1.0, workers=2)
        print(f"{os.cpu_count()} CPUs; dataset {root}; {a.steps} steps per epoch, second epoch timed", flush=True)
        rows = [run("1 process, no loader workers (baseline)", root, work, a.steps, 1, 0)]
        rows.append(run("1 process, 2 loader workers", root, work, a.steps, 1, 2))
        rows.append(run("2 processes (torchrun, gloo), no loader workers", root, work, a.steps, 2, 0))
        rows.append(run("2 processes (torchrun, gloo), 1 loader worker each", root, work, a.steps, 2, 1))
    base = rows[0]["slabs_per_s"]
    print(f"{'':52} {'s/step':>7} {'slabs/s':>8} {'ratio':>6} {'waiting for batches':>20}")
    for r in rows:
        print(f"{r['name']:52} {r['s_per_step']:7.2f} {r['slabs_per_s']:8.1f} {r['slabs_per_s'] / base:6.2f} "
              f"{100 * r['wait'] / r['seconds']:18.0f} %")
    best = max(rows, key=lambda r: r["slabs_per_s"])
    cpu_h = RSNA_SLABS / 16 * best["s_per_step"] / 3600
    gpu_h = RSNA_SLABS / 16 * H200_S_PER_STEP / 3600
    print(f"one RSNA-sized epoch ({RSNA_SLABS / 1e3:.0f} k slabs as full slices, 16 a step with 48 crops): "
          f"{cpu_h:.0f} h on this CPU ({best['name']}); {gpu_h:.1f} h on one H200 (step time measured), "
          f"{gpu_h / 8 * 60:.0f} min on 8 (estimated: linear scaling)")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "rsna_epoch_h": {"cpu": cpu_h, "h200": gpu_h, "8xh200": gpu_h / 8}},
                                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
