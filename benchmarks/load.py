"""Load: receiver processes, worker processes and the store, against DCMTK storescp in the same run.

    .venv/bin/python benchmarks/load.py [--senders 4] [--studies 2] [--slices 48] [--receivers 1,2,4]
                                        [--workers 1,2] [--stores sqlite,postgresql] [--out load.png]

Each of N DCMTK ``storescu`` senders (TCP_NODELAY=1) sends its M distinct phantom studies one after
another, all senders at once. Baselines, in the same run: the same senders against DCMTK ``storescp
--fork`` (a process per association, no fsync, no database), and one association against plain
``storescp``. Then, for every store (SQLite; PostgreSQL in a throwaway cluster), every number of
receiver processes (``node.receivers``) and of worker processes (``worker.processes``), a whole node
(this package's listener as the PACS) receives the same studies, and the script reports:

- images/s received (all senders together) and its ratio to storescp --fork;
- studies/min from the first image sent to the last result stored in the PACS;
- lost (acknowledged but not recorded, or without results) and duplicated results (must be 0);
- one association alone (receivers 1, workers 1) against plain storescp.

The ratios go to a PNG (``--out``). Figures depend on the machine: compare ratios, not rates.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ingest import free_port  # benchmarks/ is on sys.path when this runs as a script
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pgcluster import throwaway_cluster  # noqa: E402 - the tests' throwaway PostgreSQL cluster

from node.commands.serve import Node
from node.config import load_config
from node.phantom import PhantomOptions, generate_study, write_study
from node.scp import start_scp
from node.store import FINAL_STATES, JobState, Store, events, jobs


def send_all(folders: list[list[Path]], port: int, aec: str, seconds: float) -> tuple[int, float, list[str]]:
    """Every sender sends its folders, at once; returns (instances sent, seconds, failures)."""
    sent, failures, lock = [0], [], threading.Lock()
    start_line = threading.Barrier(len(folders) + 1)
    deadline = [0.0]

    def sender(mine: list[Path]) -> None:
        start_line.wait()
        for folder in mine:
            if time.perf_counter() > deadline[0]:
                break
            proc = subprocess.run([shutil.which("storescu") or "storescu", "-aec", aec, "+sd", "+r", "127.0.0.1",
                                   str(port), str(folder)], env={**os.environ, "TCP_NODELAY": "1"},
                                  capture_output=True, timeout=600)
            with lock:
                if proc.returncode == 0:
                    sent[0] += sum(1 for _ in folder.rglob("*.dcm"))
                else:
                    failures.append(f"{folder.name}: storescu exit {proc.returncode}")

    threads = [threading.Thread(target=sender, args=(mine,)) for mine in folders]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    start_line.wait()
    for t in threads:
        t.join()
    return sent[0], time.perf_counter() - t0, failures


def storescp_rate(folders: list[list[Path]], tmp: Path, fork: bool) -> float:
    port = free_port()
    out = tmp / f"scp-{port}"
    out.mkdir()
    scp = subprocess.Popen([shutil.which("storescp") or "storescp", *(["--fork"] if fork else []), "-od", str(out),
                            str(port)], env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        n, t, failures = send_all(folders, port, "STORESCP", 1e9)
    finally:
        scp.terminate()
        scp.wait(10)
        shutil.rmtree(out, ignore_errors=True)
    if failures:
        raise SystemExit(f"storescp baseline failed: {failures}")
    return n / t


def node_run(folders: list[list[Path]], uids: list[str], tmp: Path, url: str | None, receivers: int, workers: int,
             bundle: Path, tag: str) -> dict:
    """One whole node (receivers x workers) on store ``url`` (None: SQLite); its figures."""
    pacs_port = free_port()
    pacs_cfg = load_config(None, environ={}, overrides=[f"storage.root={tmp / tag / 'pacs'}", "node.host=127.0.0.1",
                                                        f"node.port={pacs_port}", "node.ae_title=PACS",
                                                        "storage.min_free_mb=0"])
    (tmp / tag / "pacs").mkdir(parents=True)
    pacs_store = Store(f"sqlite:///{tmp / tag / 'pacs' / 'db.sqlite'}")
    pacs = start_scp(pacs_cfg, pacs_store, fsync=False)
    senders = len(folders)
    node_cfg = load_config(None, environ={}, overrides=[
        f"storage.root={tmp / tag / 'node'}", "node.host=127.0.0.1", f"node.port={free_port()}",
        *([f"store.url={url}"] if url else []), f"node.receivers={receivers}", f"worker.processes={workers}",
        "study.quiet_seconds=2", f"model.bundle={bundle}", "model.device=cpu", "model.threads=1",
        "metrics.port=0", f"node.max_associations={max(10, senders + 2)}",
        f"destinations=[{{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {pacs_port}}}]"])
    node = Node(node_cfg, sweep_seconds=0.25, stop_timeout=120)
    try:
        time.sleep(3.0)  # the worker processes load the model
        first_image = time.perf_counter()
        n, t, failures = send_all(folders, node_cfg.node.port, node_cfg.node.ae_title, 1e9)
        last_image = time.perf_counter()
        while True:
            node.supervise()
            states = [(node.store.jobs_of(u) or [{}])[-1].get("state") for u in uids]
            if all(s in FINAL_STATES for s in states):
                break
            if time.perf_counter() - last_image > 1800:
                raise SystemExit(f"results still missing after 1800 s: {states}")
            time.sleep(0.25)
        analysed = [u for u in uids if node.store.jobs_of(u)[-1]["state"] == JobState.DONE]
        while sum(1 for u in analysed if (pacs_store.study(u) or {}).get("instances", 0) >= 2) < len(analysed):
            if time.perf_counter() - last_image > 1800:
                break
            time.sleep(0.1)
        finished = time.perf_counter()
        stored = sum(int((node.store.study(u) or {}).get("instances", 0)) for u in uids)
        with node.store.engine.connect() as conn:
            done = conn.execute(select(func.count()).select_from(jobs).where(jobs.c.state == JobState.DONE)
                                ).scalar_one()
        with pacs_store.engine.connect() as conn:
            duplicates = conn.execute(select(func.count()).select_from(events).where(
                events.c.kind == "duplicate")).scalar_one()
        results = sum(1 for u in uids if (pacs_store.study(u) or {}).get("instances", 0) >= 2)
    finally:
        node.stop()
        pacs.shutdown()
    return {"images": n, "seconds": t, "images_s": n / t, "studies_min": len(uids) / (finished - first_image) * 60,
            "lost_instances": n - stored, "lost_studies": len(uids) - results, "duplicates": duplicates,
            "jobs_done": done, "failures": failures}


def draw(rows: list[dict], fork_rate: float, one: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (store, workers), style in zip(sorted({(r["store"], r["workers"]) for r in rows}),
                                       ["o-", "s--", "^-", "v--"], strict=False):
        mine = sorted((r for r in rows if r["store"] == store and r["workers"] == workers),
                      key=lambda r: r["receivers"])
        label = f"{store}, {workers} worker{'s' if workers > 1 else ''}"
        left.plot([r["receivers"] for r in mine], [r["images_s"] / fork_rate for r in mine], style, label=label)
        right.plot([r["receivers"] for r in mine], [r["studies_min"] for r in mine], style, label=label)
    for axis in (left, right):
        axis.set_xlabel("receiver processes (node.receivers)")
        axis.set_xticks(sorted({r["receivers"] for r in rows}))
        axis.grid(alpha=0.3)
    left.axhline(0.40, color="grey", lw=0.8, ls=":")
    left.set_ylabel("images/s vs storescp --fork (same senders)")
    left.set_title(f"receiving, {rows[0]['senders']} senders; one association: "
                   + ", ".join(f"{k} {v:.2f}x" for k, v in one.items()), fontsize=9)
    right.set_ylabel("studies/min, first image to last result")
    right.set_title("whole node (model on CPU)", fontsize=9)
    left.legend(fontsize=8)
    fig.suptitle("petriage load (benchmarks/load.py) - AI triage aid, not for diagnostic use", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--studies", type=int, default=2, help="studies per sender")
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--receivers", default="1,2,4")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--bundle", default="models/demo")
    parser.add_argument("--out", default="load.png")
    args = parser.parse_args()
    if not shutil.which("storescu") or not shutil.which("storescp"):
        raise SystemExit("needs DCMTK storescu and storescp (make test installs them)")
    receivers = [int(v) for v in args.receivers.split(",")]
    workers = [int(v) for v in args.workers.split(",")]
    stores = [v.strip() for v in args.stores.split(",")]
    options = PhantomOptions(matrix=args.matrix, slices=args.slices, slice_spacing_mm=4.5, min_embolus_mm=10.0,
                             embolus_levels=("central", "lobar"))
    bundle = Path(args.bundle).resolve()
    with tempfile.TemporaryDirectory() as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        folders: list[list[Path]] = [[] for _ in range(args.senders)]
        uids = []
        print(f"writing {args.senders * args.studies} phantom studies ({args.slices} slices of {args.matrix}^2)...",
              flush=True)
        for k in range(args.senders * args.studies):
            study = generate_study(990000 + k, pe=bool(k % 2), options=options)
            write_study(study, tmp / "in" / str(k))
            folders[k % args.senders].append(tmp / "in" / str(k))
            uids.append(study.identity.study_instance_uid)
        urls: dict[str, str | None] = {"sqlite": None}
        if "postgresql" in stores:
            cluster = stack.enter_context(throwaway_cluster(free_port()))
        fork_rates = [storescp_rate(folders, tmp, fork=True)]
        single = [[f for fs in folders for f in fs][:2]]  # one association: two studies, one after the other
        single_uids = [u for k, u in enumerate(uids) if k % args.senders == 0][:2]
        plain_rate = storescp_rate(single, tmp, fork=False)
        rows, one = [], {}
        for store in stores:
            for r in receivers:
                for w in workers:
                    tag = f"{store}-r{r}-w{w}"
                    if store == "postgresql":
                        urls[tag] = cluster.database(tag.replace("-", "_"))
                    print(f"{tag}...", flush=True)
                    row = node_run(folders, uids, tmp, urls.get(tag), r, w, bundle, tag)
                    rows.append({"store": store, "receivers": r, "workers": w, "senders": args.senders, **row})
                    shutil.rmtree(tmp / tag, ignore_errors=True)
            tag = f"{store}-one"
            if store == "postgresql":
                urls[tag] = cluster.database(tag.replace("-", "_"))
            alone = node_run(single, single_uids, tmp, urls.get(tag), 1, 1, bundle, tag)
            one[store] = alone["images_s"] / plain_rate
            shutil.rmtree(tmp / tag, ignore_errors=True)
        fork_rates.append(storescp_rate(folders, tmp, fork=True))  # again at the end: the machine may drift
    fork_rate = sum(fork_rates) / len(fork_rates)
    print(f"{args.senders} senders x {args.studies} studies x {args.slices} images ({args.matrix}^2), TCP_NODELAY=1; "
          f"storescp --fork {fork_rates[0]:.0f} / {fork_rates[1]:.0f} images/s (start / end), "
          f"one association to storescp {plain_rate:.0f} images/s")
    print(f"{'store':<11} {'receivers':>9} {'workers':>7} {'images/s':>9} {'vs fork':>8} {'studies/min':>12} "
          f"{'lost':>5} {'dup':>4}")
    bad = 0
    for row in rows:
        lost = row["lost_instances"] + row["lost_studies"]
        bad += lost + row["duplicates"] + len(row["failures"])
        print(f"{row['store']:<11} {row['receivers']:9d} {row['workers']:7d} {row['images_s']:9.0f} "
              f"{row['images_s'] / fork_rate:7.2f}x {row['studies_min']:12.1f} {lost:5d} {row['duplicates']:4d}")
    for store, ratio in one.items():
        print(f"one association, {store}: {ratio:.2f}x storescp")
    draw(rows, fork_rate, one, Path(args.out))
    print(f"wrote {args.out}")
    return 0 if not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
