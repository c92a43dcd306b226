"""Load: N concurrent senders x M studies against the whole node, for a bounded time.

    .venv/bin/python benchmarks/load.py [--senders 4] [--studies 3] [--slices 64] [--seconds 120]

Each of N DCMTK ``storescu`` senders (TCP_NODELAY=1) sends its M distinct phantom studies one after
another, all senders at once, starting no new study after ``--seconds``. The same senders first
send the same files to DCMTK ``storescp --fork`` (no fsync, no database: the baseline) and the
script prints both rates and their ratio. Against the node (listener, sweep, worker process, the
bundled model; this package's listener as the PACS) it then waits until every study sent has a
final job and reports:

- instances/s received by the node (all senders together) and vs storescp;
- lost: instances acknowledged by the node but not in its store, studies sent without a result;
- duplicated: results the PACS received twice (its store records every duplicate C-STORE);
- seconds from the last image of the run to the last result stored in the PACS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ingest import free_port  # benchmarks/ is on sys.path when this runs as a script
from sqlalchemy import func, select

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--studies", type=int, default=3, help="studies per sender")
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=120.0, help="no new study is started after this")
    parser.add_argument("--bundle", default="models/demo")
    args = parser.parse_args()
    if not shutil.which("storescu") or not shutil.which("storescp"):
        raise SystemExit("needs DCMTK storescu and storescp (make test installs them)")
    options = PhantomOptions(matrix=args.matrix, slices=args.slices, slice_spacing_mm=4.5, min_embolus_mm=10.0,
                             embolus_levels=("central", "lobar"))
    with tempfile.TemporaryDirectory() as tmp_name:
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

        # baseline: storescp, one process per association
        port = free_port()
        (tmp / "scp").mkdir()
        scp = subprocess.Popen([shutil.which("storescp") or "storescp", "--fork", "-od", str(tmp / "scp"), str(port)],
                               env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        try:
            n_base, t_base, fail_base = send_all(folders, port, "STORESCP", args.seconds)
        finally:
            scp.terminate()
            scp.wait(10)

        # the node, with this package's listener as the PACS
        pacs_port = free_port()
        pacs_cfg = load_config(None, environ={}, overrides=[f"storage.root={tmp / 'pacs'}", "node.host=127.0.0.1",
                                                            f"node.port={pacs_port}", "node.ae_title=PACS",
                                                            "storage.min_free_mb=0"])
        (tmp / "pacs").mkdir()
        pacs_store = Store(f"sqlite:///{tmp / 'pacs' / 'db.sqlite'}")
        pacs = start_scp(pacs_cfg, pacs_store, fsync=False)
        node_cfg = load_config(None, environ={}, overrides=[
            f"storage.root={tmp / 'node'}", "node.host=127.0.0.1", f"node.port={free_port()}",
            "study.quiet_seconds=2", f"model.bundle={Path(args.bundle).resolve()}", "model.device=cpu",
            "metrics.port=0", f"node.max_associations={max(10, args.senders + 2)}",
            f"destinations=[{{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {pacs_port}}}]"])
        node = Node(node_cfg, sweep_seconds=0.25, stop_timeout=120)
        try:
            time.sleep(3.0)  # the worker process loads the model
            n_node, t_node, fail_node = send_all(folders, node_cfg.node.port, node_cfg.node.ae_title, args.seconds)
            last_image = time.perf_counter()
            sent_uids = [u for u in uids if node.store.study(u)]
            while True:
                node.supervise()
                states = [(node.store.jobs_of(u) or [{}])[-1].get("state") for u in sent_uids]
                if all(s in FINAL_STATES for s in states):
                    break
                if time.perf_counter() - last_image > 1800:
                    raise SystemExit(f"results still missing after 1800 s: {states}")
                time.sleep(0.25)
            t_results = time.perf_counter() - last_image
            with node.store.engine.connect() as conn:
                stored = sum(int(node.store.study(u)["instances"]) for u in sent_uids)
                done = conn.execute(select(func.count()).select_from(jobs).where(jobs.c.state == JobState.DONE)
                                    ).scalar_one()
            with pacs_store.engine.connect() as conn:
                duplicates = conn.execute(select(func.count()).select_from(events).where(
                    events.c.kind == "duplicate")).scalar_one()
            results = sum(1 for u in sent_uids if (pacs_store.study(u) or {}).get("instances", 0) >= 2)
        finally:
            node.stop()
            pacs.shutdown()
        print(f"{args.senders} senders x {args.studies} studies x {args.slices} images ({args.matrix}^2), "
              f"TCP_NODELAY=1, bound {args.seconds:.0f} s")
        print(f"{'receiver':<36} {'images':>7} {'seconds':>8} {'images/s':>9} {'vs storescp':>12}")
        print(f"{'DCMTK storescp --fork (baseline)':<36} {n_base:7d} {t_base:8.2f} {n_base / t_base:9.0f} {1.0:11.2f}x")
        print(f"{'petriage node (fsync + SQLite)':<36} {n_node:7d} {t_node:8.2f} {n_node / t_node:9.0f} "
              f"{(n_node / t_node) / (n_base / t_base):11.2f}x")
        print(f"studies sent {len(sent_uids)}, jobs done {done}, with results in the PACS {results}")
        print(f"lost: {n_node - stored} instances, {len(sent_uids) - results} studies without results; "
              f"duplicated results: {duplicates}")
        print(f"last image -> last result in the PACS: {t_results:.1f} s; sender failures: "
              f"storescp {len(fail_base)}, node {len(fail_node)}")
    return 0 if n_node == stored and results == len(sent_uids) and duplicates == 0 and not fail_node else 1


if __name__ == "__main__":
    raise SystemExit(main())
