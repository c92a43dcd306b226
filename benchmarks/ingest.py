"""Receiving speed: the node's listener against DCMTK storescp, and last image -> SR in the PACS.

    .venv/bin/python benchmarks/ingest.py [--slices 300] [--rounds 5]

One 512x512 phantom CTPA study (explicit VR little endian) is sent with DCMTK ``storescu`` (one
association, TCP_NODELAY=1) to (a) DCMTK ``storescp`` writing to a temporary folder - the baseline -
and (b) the node's listener (spool with fsync + SQLite record per instance), alternating for ``--rounds``
rounds. Prints images/s for each, the ratio of each round and the median ratio. Then the whole node
runs (listener, sweep with quiet_seconds 2, worker process, bundled model) with the listener of this
package as the PACS, and the script reports the seconds from the last image acknowledged to the SR
stored in the PACS, and how much of that is the quiet period.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from node.commands.serve import Node
from node.config import load_config
from node.phantom import PhantomOptions, generate_study, write_study
from node.scp import start_scp
from node.store import Store, naive_utc, utcnow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send(folder: Path, port: int, aec: str) -> float:
    start = time.perf_counter()
    subprocess.run([shutil.which("storescu") or "storescu", "-aec", aec, "+sd", "+r", "-xe", "127.0.0.1", str(port),
                    str(folder)], check=True, timeout=600, env={**os.environ, "TCP_NODELAY": "1"},
                   capture_output=True)
    return time.perf_counter() - start


def storescp_run(folder: Path, out: Path) -> float:
    port = free_port()
    out.mkdir()
    scp = subprocess.Popen([shutil.which("storescp") or "storescp", "-od", str(out), str(port)],
                           env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        return send(folder, port, "STORESCP")
    finally:
        scp.terminate()
        scp.wait(10)


def listener_run(folder: Path, root: Path) -> float:
    cfg = load_config(None, environ={}, overrides=[f"storage.root={root}", "node.host=127.0.0.1",
                                                   f"node.port={free_port()}"])
    root.mkdir()
    store = Store(f"sqlite:///{root / 'petriage.db'}")
    server = start_scp(cfg, store)
    try:
        return send(folder, cfg.node.port, cfg.node.ae_title)
    finally:
        server.shutdown()
        store.engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--bundle", default="models/demo")
    parser.add_argument("--rounds", type=int, default=5, help="storescp and listener runs, alternating")
    args = parser.parse_args()
    if not shutil.which("storescu") or not shutil.which("storescp"):
        raise SystemExit("needs DCMTK storescu and storescp (make test installs them)")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        study = generate_study(4711, pe=True, options=PhantomOptions(slices=args.slices))
        n = len(write_study(study, tmp / "in")["ctpa"])
        # (a) the baseline, DCMTK storescp, and (b) the node's listener, alternating for --rounds rounds: on a
        # small shared machine either one's speed moves by a quarter from run to run, so the ratio is taken
        # within each round and the median reported.
        rows = []
        for k in range(args.rounds):
            t_dcmtk = storescp_run(tmp / "in", tmp / f"scp{k}")
            t_node = listener_run(tmp / "in", tmp / f"node{k}")
            rows.append((t_dcmtk, t_node))
        print(f"{n} images of 512x512 (explicit VR LE), one association, TCP_NODELAY=1, {args.rounds} rounds")
        print(f"{'round':<6} {'storescp img/s':>15} {'listener img/s (fsync + SQLite)':>32} {'ratio':>6}")
        for k, (t_dcmtk, t_node) in enumerate(rows, 1):
            print(f"{k:<6} {n / t_dcmtk:15.0f} {n / t_node:32.0f} {t_dcmtk / t_node:5.2f}x")
        print(f"median ratio {statistics.median(d / t for d, t in rows):.2f}x "
              f"(listener {statistics.median(n / t for _, t in rows):.0f} images/s)")
        # (c) the whole node: last image -> SR stored in the PACS
        pacs_port = free_port()
        pacs_cfg = load_config(None, environ={}, overrides=[f"storage.root={tmp / 'pacs'}", "node.host=127.0.0.1",
                                                            f"node.port={pacs_port}", "node.ae_title=PACS"])
        (tmp / "pacs").mkdir()
        pacs_store = Store(f"sqlite:///{tmp / 'pacs' / 'db.sqlite'}")
        pacs = start_scp(pacs_cfg, pacs_store, fsync=False)
        quiet = 2.0
        node_cfg = load_config(None, environ={}, overrides=[
            f"storage.root={tmp / 'node2'}", "node.host=127.0.0.1", f"node.port={free_port()}",
            f"study.quiet_seconds={quiet}", f"model.bundle={Path(args.bundle).resolve()}", "model.device=cpu",
            "metrics.port=0",
            f"destinations=[{{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {pacs_port}}}]"])
        node = Node(node_cfg, sweep_seconds=0.25, stop_timeout=60)
        try:
            time.sleep(3.0)  # let the worker process load the model first
            t_send = send(tmp / "in", node_cfg.node.port, node_cfg.node.ae_title)
            last = time.perf_counter()
            uid = study.identity.study_instance_uid
            while (pacs_store.study(uid) or {}).get("instances", 0) < 5:
                node.supervise()
                if time.perf_counter() - last > 600:
                    raise SystemExit("no results in 600 s")
                time.sleep(0.05)
            t_result = time.perf_counter() - last
            # storescu exits some time after its last image is acknowledged (the release, its own exit):
            # time the results from the node's record of the last image instead, on the same clock
            results_at = utcnow()
            row = node.store.study(uid)
            assert row is not None  # the results are in the PACS, so the node recorded the study
            last_image_at = row["last_received_at"]
            t_from_last_image = (naive_utc(results_at) - naive_utc(last_image_at)).total_seconds()
            # what queued each analysis: a sender that stalls past the quiet period gets a partial study
            # analysed first, and the figure above would then not be last image -> results of the whole study
            triggers = [e["detail"] for e in node.store.events_of(uid) if e["kind"] == "study-complete"]
        finally:
            node.stop()
            pacs.shutdown()
        print(f"whole node: {n} images sent in {t_send:.2f} s (storescu start to exit); last image recorded -> "
              f"SR and 4 key images stored in the PACS: {t_from_last_image:.2f} s, of which {quiet:.1f} s is the "
              f"quiet period that decides the study is complete ({t_result:.2f} s after storescu exited); "
              f"the study was completed by: {', '.join(triggers) or 'nothing recorded'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
