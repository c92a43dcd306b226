"""``petriage serve``: the node. The listener and the study sweep run here; the worker in its own process.

The worker process runs the model, so a slow or crashing model never blocks or kills the receiver.
If it dies it is started again (its leased job is taken up again when the lease runs out). SIGTERM or
SIGINT stops the listener first (no new instances), then the sweep, then asks the worker to finish its
current job (``stop_timeout`` seconds, then it is killed; its job is leased, so nothing is lost).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from node.config import Config

log = logging.getLogger(__name__)


def _worker_main(config_json: dict, lease_seconds: float) -> None:
    """Entry point of the worker process (spawned: a clean interpreter, no inherited threads)."""
    from node.config import Config
    from node.inference import Engine
    from node.selection import SeriesRules
    from node.store import Store, database_url
    from node.worker import Worker

    logging.basicConfig(level=config_json["logging"]["level"],
                        format="%(asctime)s %(levelname)s worker %(name)s: %(message)s")
    from node.cli_runner import quiet_libraries

    quiet_libraries()
    cfg = Config.model_validate(config_json)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    store = Store(database_url(cfg.storage.root))
    engine = Engine(cfg.model.bundle, device=cfg.model.device, precision=cfg.model.precision,
                    threads=cfg.model.threads or None, key_slices=cfg.model.key_images)
    worker = Worker(store, engine, lease_seconds=lease_seconds, outbox_root=Path(cfg.storage.root) / "outbox",
                    destinations=cfg.destinations, ae_title=cfg.node.ae_title,
                    rules=SeriesRules.from_settings(cfg.series), max_gap_factor=cfg.series.max_gap_factor)
    worker.run_forever(stop, poll_seconds=0.5)


class Node:
    """The running node: listener, sweep and a supervised worker process."""

    def __init__(self, cfg: Config, *, sweep_seconds: float = 1.0, lease_seconds: float = 120.0,
                 stop_timeout: float = 300.0):
        from node.assembly import Assembler, start_sweeper
        from node.scp import start_scp
        from node.spool import sweep_partials
        from node.store import Store, database_url

        self.cfg, self.lease_seconds, self.stop_timeout = cfg, lease_seconds, stop_timeout
        root = Path(cfg.storage.root)
        root.mkdir(parents=True, exist_ok=True)
        removed = sweep_partials(root / "spool") if (root / "spool").exists() else 0
        if removed:
            log.warning("removed %d partial files left by an earlier crash", removed)
        self.store = Store(database_url(root))
        self.server = start_scp(cfg, self.store)
        self.sweeper = start_sweeper(Assembler(self.store, cfg.study), sweep_seconds)
        self._ctx = mp.get_context("spawn")
        self.worker = self._start_worker()

    def _start_worker(self):
        proc = self._ctx.Process(target=_worker_main, args=(self.cfg.model_dump(mode="json"), self.lease_seconds),
                                 name="petriage-worker", daemon=False)
        proc.start()
        return proc

    def supervise(self) -> None:
        if not self.worker.is_alive():
            log.error("worker process exited with code %s; starting a new one", self.worker.exitcode)
            self.worker = self._start_worker()

    def stop(self) -> None:
        self.server.shutdown()
        self.sweeper.shutdown(wait=False)
        if self.worker.is_alive():
            self.worker.terminate()  # SIGTERM: the worker finishes its current job, then exits
            self.worker.join(self.stop_timeout)
            if self.worker.is_alive():
                self.worker.kill()
                self.worker.join(10)
        self.store.engine.dispose()


def serve_cmd(
    ctx: typer.Context,
    stop_timeout: Annotated[float, typer.Option(help="Seconds the worker may take to finish its job on stop.")] = 300.0,
) -> None:
    """Run the node: receive (C-STORE), complete studies, analyse, send SC + SR to the destinations."""
    cfg: Config = ctx.obj.config
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    node = Node(cfg, stop_timeout=stop_timeout)
    log.warning("petriage serving as %s on %s:%d (storage %s, %d destination(s)) - AI triage aid, not for "
                "diagnostic use", cfg.node.ae_title, cfg.node.host, cfg.node.port, cfg.storage.root,
                len(cfg.destinations))
    try:
        while not stopping.wait(1.0):
            node.supervise()
    finally:
        node.stop()
        log.warning("petriage stopped")
