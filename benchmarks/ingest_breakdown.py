"""Where one association's C-STORE time goes in the node's listener, and what waking pynetdicom's
reactors on work (node/reactor.py) buys over polling.

    .venv/bin/python benchmarks/ingest_breakdown.py [--slices 200] [--rounds 2]

One 512x512 phantom study is sent with DCMTK ``storescu`` (one association, TCP_NODELAY=1) to DCMTK
``storescp`` (the baseline) and to the node's listener, ``--rounds`` times each, alternating. In the
listener, the handler's parts are timed by wrapping them (packing the file meta, header parse,
spool write and its fsyncs, the store's transaction in the group-commit thread); what is left of the
wall time per image is pynetdicom (PDU reading, DIMSE decoding and the C-STORE-RSP) and the sender.
A second listener run polls as the node did before node/reactor.py (the DUL reactor every 0.1 ms,
the association reactor every 1 ms, pynetdicom's own sleeps) in the same round, and a third reads each
PDU as pynetdicom does, 4 KB per recv, instead of node/pdu_reader.py's one buffer, with the CPU time
the process spent per image for each.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pynetdicom.association as pynetdicom_association
import pynetdicom.dul as pynetdicom_dul

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import listener_run, storescp_run  # noqa: E402

import node.group_commit as group_commit  # noqa: E402
import node.scp as scp  # noqa: E402
from node.phantom import PhantomOptions, generate_study, write_study  # noqa: E402
from node.store import Store  # noqa: E402

SPENT: dict[str, float] = collections.defaultdict(float)
VARIANTS = ["storescp", "listener", "polling", "small"]


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start
    return wrapper


class Polling:
    """The listener's reactors as before node/reactor.py: pynetdicom's sleeps, the DUL's at 0.1 ms."""

    def __enter__(self):
        self.saved = pynetdicom_dul.time, pynetdicom_association.time, scp.reactor.install, scp.reactor.uninstall
        pynetdicom_dul.time = pynetdicom_association.time = time  # type: ignore[assignment]
        scp.reactor.install = lambda assoc: setattr(assoc.dul, "_run_loop_delay", 0.0001)  # type: ignore[assignment]
        scp.reactor.uninstall = lambda assoc: None  # type: ignore[assignment]
        return self

    def __exit__(self, *exc) -> None:
        (pynetdicom_dul.time, pynetdicom_association.time, scp.reactor.install,
         scp.reactor.uninstall) = self.saved  # type: ignore[assignment]


class SmallReads:
    """The listener's sockets as pynetdicom leaves them: 4 KB per recv (no node/pdu_reader.py)."""

    def __enter__(self):
        self.saved = scp.pdu_reader.install
        scp.pdu_reader.install = lambda assoc: None  # type: ignore[assignment]
        return self

    def __exit__(self, *exc) -> None:
        scp.pdu_reader.install = self.saved  # type: ignore[assignment]


def cpu_run(run, *args) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one listener run."""
    cpu = time.process_time()
    wall = run(*args)
    return wall, time.process_time() - cpu


def instrument() -> None:
    scp.part10_header = timed("file meta, packed (node/file_meta.py)", scp.part10_header)
    scp.pydicom.dcmread = timed("parse the header (UIDs, urgency)", scp.pydicom.dcmread)
    scp.write_atomic = timed("spool write (incl. fsyncs)", scp.write_atomic)
    os.fsync = timed("  of which fsync (file + folder)", os.fsync)  # only node.spool calls it from Python
    group_commit.GroupRecorder.record = timed("store: record (group commit)", group_commit.GroupRecorder.record)
    Store.record_instances = timed("  of which the transaction (2 statements + WAL fsync)", Store.record_instances)
    scp.StorageHandler._store = timed("handler in all", scp.StorageHandler._store)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not shutil.which("storescu") or not shutil.which("storescp"):
        raise SystemExit("needs DCMTK storescu and storescp (make test installs them)")
    instrument()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        study = generate_study(4711, pe=True, options=PhantomOptions(slices=args.slices))
        n = len(write_study(study, tmp / "in")["ctpa"])
        rows, spent, listener_seconds = [], collections.defaultdict(float), 0.0
        for k in range(args.rounds):
            # the four runs of a round in a rotating order, each folder removed after it: on a small shared
            # machine a run's speed drifts with the dirty pages the previous runs left, so no variant may
            # always come last
            results: dict[str, tuple[float, float]] = {}
            for name in VARIANTS[k % len(VARIANTS):] + VARIANTS[:k % len(VARIANTS)]:
                folder = tmp / f"{name}{k}"
                if name == "storescp":
                    results[name] = (storescp_run(tmp / "in", folder), 0.0)
                elif name == "listener":
                    SPENT.clear()
                    results[name] = cpu_run(listener_run, tmp / "in", folder)
                    for part, seconds in SPENT.items():
                        spent[part] += seconds
                    listener_seconds += results[name][0]
                else:
                    with (Polling() if name == "polling" else SmallReads()):
                        results[name] = cpu_run(listener_run, tmp / "in", folder)
                shutil.rmtree(folder, ignore_errors=True)
            (base, _), (node, node_cpu) = results["storescp"], results["listener"]
            (polled, polled_cpu), (small, small_cpu) = results["polling"], results["small"]
            rows.append((n / base, n / node, n / polled, n / small, 1000 * node_cpu / n, 1000 * polled_cpu / n,
                         1000 * small_cpu / n))
    print(f"{n} images of 512x512, one association, TCP_NODELAY=1, {args.rounds} rounds")
    print(f"{'round':<6} {'storescp img/s':>15} {'listener img/s':>15} {'ratio':>6} {'CPU ms/img':>10} "
          f"{'polling img/s':>14} {'ratio':>6} {'CPU ms/img':>10} {'4 KB reads img/s':>17} {'ratio':>6} "
          f"{'CPU ms/img':>10}")
    for k, (base, node, polled, small, cpu, polled_cpu, small_cpu) in enumerate(rows, 1):
        print(f"{k:<6} {base:15.0f} {node:15.0f} {node / base:5.2f}x {cpu:10.2f} {polled:14.0f} "
              f"{polled / base:5.2f}x {polled_cpu:10.2f} {small:17.0f} {small / base:5.2f}x {small_cpu:10.2f}")
    per = 1000 * listener_seconds / (n * args.rounds)
    print(f"\nlistener, ms per image (wall {per:.2f} ms; the parts below overlap across threads):")
    order = ["file meta, packed (node/file_meta.py)", "parse the header (UIDs, urgency)", "spool write (incl. fsyncs)",
             "  of which fsync (file + folder)", "store: record (group commit)",
             "  of which the transaction (2 statements + WAL fsync)", "handler in all"]
    for name in order:
        seconds = spent[name]
        ms = 1000 * seconds / (n * args.rounds)
        print(f"  {name:<55} {ms:6.2f} ms  {ms / per:5.0%}")
    handler = 1000 * spent["handler in all"] / (n * args.rounds)
    print(f"  {'outside the handler (pynetdicom, sender, network)':<55} {per - handler:6.2f} ms  "
          f"{(per - handler) / per:5.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
