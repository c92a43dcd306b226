"""Training in several processes through torchrun (gloo on CPUs): the same step as one process, and
both stages end to end with rank 0 alone writing the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddp_step import fixed_batch, model, step
from node.phantom import PhantomOptions, write_rsna_dataset

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def torchrun(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_two_processes_each_with_half_the_batch_take_the_step_one_process_takes_with_all_of_it(tmp_path):
    done = torchrun(str(ROOT / "tests" / "ddp_step.py"), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    alone = model()
    x, lengths, y = fixed_batch()
    before = {k: v.clone() for k, v in alone.state_dict().items()}
    step(alone, alone.parameters(), x, lengths, y)
    for key, value in alone.state_dict().items():
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)  # the processes agree exactly
        torch.testing.assert_close(rank0[key], value, rtol=1e-5, atol=1e-6)  # and with one process
    assert any(not torch.equal(before[k], v) for k, v in alone.state_dict().items())  # a step was taken


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-ddp")
    write_rsna_dataset(root, studies=10, positive_fraction=0.5, seed=5,
                       options=PhantomOptions(matrix=96, slices=24, slice_spacing_mm=12.0), annotated_fraction=1.0,
                       annotated_slice_fraction=0.3)
    return root


def test_petriage_train_all_runs_in_two_processes_and_rank_0_alone_writes_the_run(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    overrides = [f"data.root={tiny_dataset}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.2",
                 "data.test_fraction=0.4", "preprocess.size=64", "stage1.width=8", "stage1.epochs=2",
                 "stage1.steps_per_epoch=4", "stage1.batch_size=8", "stage1.crop=32", "stage1.crop_batch=8",
                 "stage2.epochs=3", "stage2.batch_size=4", "eval.bootstrap=100", "threads=1"]
    done = torchrun("-m", "training.cli", "all", "--run-dir", str(run), *sum((["--set", o] for o in overrides), []))
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    report = json.loads((run / "report.json").read_text())
    assert report["processes"] == 2 and 0.0 <= report["study_auc"] <= 1.0
    log1 = [json.loads(line) for line in (run / "stage1_log.jsonl").read_text().splitlines()]
    log2 = (run / "stage2_log.jsonl").read_text().splitlines()
    assert [row["epoch"] for row in log1] == [1, 2] and len(log2) == 3  # one writer, one line per epoch
    assert done.stdout.count("(chosen on val)") == 1  # one report printed, by rank 0
    for name in ("stage1.pt", "stage1_last.pt", "stage2.pt", "features.npy", "splits.json"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.tmp"))


def test_a_killed_two_process_run_resumes_from_rank_0s_checkpoint(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    overrides = [f"data.root={tiny_dataset}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.2",
                 "data.test_fraction=0.4", "preprocess.size=64", "stage1.width=8", "stage1.steps_per_epoch=40",
                 "stage1.batch_size=8", "stage1.crop=null", "stage1.epochs=3", "threads=1"]
    args = ["-m", "training.cli", "stage1", "--run-dir", str(run), *sum((["--set", o] for o in overrides), [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = run / "stage1_log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        assert first.poll() is None, "the first run ended before its first epoch was written"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the machine goes: both processes and the launcher at once
    first.wait()
    assert (run / "stage1_last.pt").is_file()
    second = torchrun(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming after epoch" in second.stdout
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert set(epochs) == {1, 2, 3} and epochs[-1] == 3
    assert torch.load(run / "stage1_last.pt", weights_only=False)["epoch"] == 2  # the third epoch, counted from 0
