"""``petriage serve``: the node. The listener and the study sweep run here; the worker in its own process.

The worker process runs the model, so a slow or crashing model never blocks or kills the receiver.
If it dies it is started again (its leased job is taken up again when the lease runs out). SIGTERM or
SIGINT stops the listener first (no new instances), then the sweep, then asks the worker to finish its
current job (``stop_timeout`` seconds, then it is killed and its job goes straight back to the queue).
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy.exc import SQLAlchemyError

from node.config import Config
from node.errors import NodeError

log = logging.getLogger(__name__)


def _worker_main(config_json: dict, lease_seconds: float) -> None:
    """Entry point of the worker process (spawned: a clean interpreter, no inherited threads)."""
    from node.config import Config
    from node.inference import Engine
    from node.logs import configure_logging
    from node.selection import SeriesRules
    from node.storage_mark import claim_storage
    from node.store import Store, database_url
    from node.worker import Worker

    cfg = Config.model_validate(config_json)
    configure_logging(cfg.logging, role="worker")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    os.umask(0o077)  # outbox files: the node's user only
    store = Store(database_url(cfg.storage.root, cfg.store.url))
    mark = claim_storage(Path(cfg.storage.root), store)
    engine = Engine(cfg.model.bundle, device=cfg.model.device, precision=cfg.model.precision,
                    threads=cfg.model.threads or None, key_slices=cfg.model.key_images)
    worker = Worker(store, engine, lease_seconds=lease_seconds, outbox_root=Path(cfg.storage.root) / "outbox",
                    destinations=cfg.destinations, ae_title=cfg.node.ae_title,
                    rules=SeriesRules.from_settings(cfg.series), max_gap_factor=cfg.series.max_gap_factor,
                    triage=cfg.triage, notify=cfg.notify, node_name=cfg.node.name, storage_mark=mark,
                    outputs=cfg.outputs)
    worker.run_forever(stop, poll_seconds=0.5)


def _receiver_main(config_json: dict, statuses) -> None:
    """Entry point of an extra receiver process (``node.receivers`` > 1): a listener on the shared port.

    Its C-STORE statuses go to the node's process in counts every half second (``statuses``, a queue),
    where the Prometheus counter lives, so the counter is right however many processes receive.
    """
    from node.config import Config
    from node.logs import configure_logging
    from node.scp import start_scp
    from node.storage_mark import claim_storage
    from node.store import Store, database_url

    cfg = Config.model_validate(config_json)
    configure_logging(cfg.logging, role="receiver")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    os.umask(0o077)
    store = Store(database_url(cfg.storage.root, cfg.store.url))
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def count(status: str) -> None:
        with lock:
            counts[status] += 1

    def flush() -> None:
        with lock:
            if counts:
                statuses.put((os.getpid(), dict(counts)))
                counts.clear()

    server = start_scp(cfg, store, mark=claim_storage(Path(cfg.storage.root), store), on_status=count,
                       shared_port=True)
    statuses.put((os.getpid(), "listening"))
    try:
        while not stop.wait(0.5):
            flush()
    finally:
        server.shutdown()
        flush()
        store.engine.dispose()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True


class Node:
    """The running node: listener, sweep, notifier, metrics and a supervised worker process.

    Files and the database are made readable by the node's user only (umask 077, storage root 0700).
    """

    def __init__(self, cfg: Config, *, sweep_seconds: float = 1.0, lease_seconds: float | None = None,
                 stop_timeout: float = 300.0, notify_seconds: float = 2.0):
        from apscheduler.schedulers.background import BackgroundScheduler

        from node.assembly import Assembler
        from node.housekeeping import Housekeeper
        from node.metrics import NodeMetrics
        from node.notify import Notifier
        from node.scp import start_scp
        from node.spool import sweep_partials
        from node.storage_mark import claim_storage
        from node.store import Store, database_url

        self.cfg, self.stop_timeout = cfg, stop_timeout
        self.lease_seconds = lease_seconds or cfg.worker.lease_seconds
        os.umask(0o077)
        root = Path(cfg.storage.root)
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        removed = sweep_partials(root / "spool") if (root / "spool").exists() else 0
        if removed:
            log.warning("removed %d partial files left by an earlier crash", removed)
        self.store = Store(database_url(root, cfg.store.url))
        self.mark = claim_storage(root, self.store)
        self._release_orphans()
        self.metrics = NodeMetrics(self.store)
        try:
            self.metrics_server = (self.metrics.serve(cfg.metrics.host, cfg.metrics.port)[0]
                                   if cfg.metrics.port else None)
        except OSError as exc:
            raise NodeError(f"metrics: cannot listen on {cfg.metrics.host}:{cfg.metrics.port}: "
                            f"{exc.strerror or exc} (set metrics.port, or 0 to switch metrics off)") from exc
        self.role = cfg.node.role
        receives, works = self.role in ("all", "receiver"), self.role in ("all", "worker")
        self.sweeper = BackgroundScheduler(timezone="UTC")
        self.server = None
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self.received_by_process: Counter[int] = Counter()  # C-STORE answers per receiving process
        self.receivers: list = []
        self._pending: list = []
        if receives:  # the listener(s), and the sweep that decides when their studies are complete
            shared = cfg.node.receivers > 1
            self.server = start_scp(cfg, self.store, mark=self.mark, shared_port=shared, on_status=self._count)
            if shared:
                self._statuses = self._ctx.Queue()
                self.receivers = [self._start_receiver() for _ in range(cfg.node.receivers - 1)]
                self._wait_for_receivers()
                threading.Thread(target=self._count_statuses, name="petriage-receiver-statuses",
                                 daemon=True).start()
            assembler = Assembler(self.store, cfg.study, triage=cfg.triage, on_complete=self.metrics.completed.inc)
            self.sweeper.add_job(assembler.sweep, "interval", seconds=sweep_seconds, id="study-sweep",
                                 max_instances=1, coalesce=True)
        self.workers = [self._start_worker() for _ in range(cfg.worker.processes)] if works else []
        self.notifier = Notifier(self.store, cfg.notify)  # every role: notifications are leased
        self.housekeeper = Housekeeper(self.store, root, cfg.retention, cfg.storage.min_free_mb)
        self.sweeper.add_job(self._housekeep, "interval", minutes=cfg.retention.interval_minutes, id="housekeeping",
                             max_instances=1, coalesce=True, next_run_time=dt.datetime.now(dt.UTC))
        self.sweeper.add_job(self.notifier.run_due, "interval", seconds=notify_seconds, id="notify",
                             max_instances=1, coalesce=True)
        if receives:
            self.sweeper.add_job(self._beat, "interval", seconds=5, id="heartbeat", max_instances=1,
                                 coalesce=True, next_run_time=dt.datetime.now(dt.UTC))
        self.sweeper.start()
        self.console = None
        if cfg.web.with_node and receives:  # the console beside the listener (petriage web runs it alone)
            from node.web.server import start_console

            self.console = start_console(cfg, self.store)
            log.info("console on %s", self.console.url)

    def _housekeep(self) -> None:
        """Retention and disk-pressure removal; what it did is this node's "housekeeping" heartbeat."""
        from node.store import StoreError, utcnow

        try:
            result = self.housekeeper.run_once()
        except (StoreError, SQLAlchemyError, OSError) as exc:
            log.error("housekeeping failed: %s", exc)
            return
        self.store.beat("housekeeping", socket.gethostname(), os.getpid(), utcnow(), result.summary(),
                        node=self.cfg.node.name)

    def _beat(self) -> None:
        from node.store import utcnow

        self.store.beat("listener", socket.gethostname(), os.getpid(), utcnow(), {
            "ae_title": self.cfg.node.ae_title, "host": self.cfg.node.host, "port": self.cfg.node.port,
            "tls": self.cfg.node.tls is not None, "worker_pid": self.worker.pid if self.worker else None,
            "worker_pids": [w.pid for w in self.workers], "receiver_pids": [r.pid for r in self.receivers],
            "role": self.role, "metrics_port": self.cfg.metrics.port}, node=self.cfg.node.name)

    def _release_orphans(self) -> None:
        """Jobs held by worker processes of this host that are gone (a crash of this node before this
        start): back in the queue now, not after their lease. Live processes (another node on this
        host) keep theirs."""
        from node.store import utcnow

        for owner in self.store.running_owners(f"{socket.gethostname()}:"):
            pid = owner.rsplit(":", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                released = self.store.release_leases(owner, utcnow(), f"worker {owner} gone (node restarted)")
                log.warning("re-queued job(s) %s of worker %s, gone since the last start",
                            ", ".join(map(str, released)), owner)

    def _release(self, proc) -> None:
        """Put the job a dead or killed worker held back in the queue at once (not after its lease)."""
        from node.store import utcnow
        from node.worker import worker_name

        released = self.store.release_leases(worker_name(proc.pid), utcnow(),
                                             f"worker {proc.pid} stopped mid-job; re-queued")
        if released:
            log.warning("re-queued job(s) %s held by worker %d", ", ".join(map(str, released)), proc.pid)

    @property
    def worker(self):
        """The first worker process (None for a receiver)."""
        return self.workers[0] if self.workers else None

    def _start_receiver(self):
        proc = self._ctx.Process(target=_receiver_main, args=(self.cfg.model_dump(mode="json"), self._statuses),
                                 name="petriage-receiver", daemon=False)
        proc.start()
        return proc

    def _wait_for_receivers(self, seconds: float = 120.0) -> None:
        """Return once every receiver process listens (so the node is whole when it says it serves)."""
        import queue
        import time

        waiting = {p.pid for p in self.receivers}
        deadline = time.monotonic() + seconds
        while waiting:
            try:
                pid, message = self._statuses.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in self.receivers if p.pid in waiting and not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    for proc in self.receivers:  # a node that cannot listen as configured does not start
                        proc.kill()
                        proc.join(10)
                    if self.server is not None:
                        self.server.shutdown()
                    if self.metrics_server is not None:
                        self.metrics_server.shutdown()
                    raise NodeError(f"receiver process {dead[0].pid} exited with code {dead[0].exitcode} before "
                                    "it listened (its log says why)" if dead else
                                    f"receiver processes did not listen within {seconds:.0f} s") from None
                continue
            if message == "listening":
                waiting.discard(pid)
            else:
                self._pending.append((pid, message))  # counts that came early

    def _count(self, status: str, n: int = 1, pid: int | None = None) -> None:
        """One C-STORE status (or ``n``), answered by this process or by receiver process ``pid``."""
        self.metrics.received.labels(status).inc(n)
        with self._lock:
            self.received_by_process[pid or os.getpid()] += n

    def _count_statuses(self) -> None:
        while True:
            item = self._pending.pop(0) if self._pending else self._statuses.get()
            if item is None:
                return
            pid, counts = item
            if counts == "listening":  # a restarted receiver process
                continue
            for status, n in counts.items():
                self._count(status, n, pid)

    def _start_worker(self):
        proc = self._ctx.Process(target=_worker_main, args=(self.cfg.model_dump(mode="json"), self.lease_seconds),
                                 name="petriage-worker", daemon=False)
        proc.start()
        return proc

    def supervise(self) -> None:
        for i, proc in enumerate(self.workers):
            if not proc.is_alive():
                log.error("worker process %d exited with code %s; starting a new one", proc.pid, proc.exitcode)
                self._release(proc)
                self.workers[i] = self._start_worker()
        for i, proc in enumerate(self.receivers):
            if not proc.is_alive():
                log.error("receiver process %d exited with code %s; starting a new one", proc.pid, proc.exitcode)
                self.receivers[i] = self._start_receiver()

    def stop(self) -> None:
        console = getattr(self, "console", None)
        if console is not None:
            console.stop()
        for proc in self.receivers:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: it stops listening, its associations end
        if self.server is not None:
            self.server.shutdown()
        for proc in self.receivers:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        if self.receivers:
            self._statuses.put(None)
        self.sweeper.shutdown(wait=False)
        for proc in self.workers:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the worker finishes its current job, then exits
        for proc in self.workers:
            proc.join(self.stop_timeout)
            if proc.is_alive():
                log.warning("worker %d did not finish its job in %.0f s; stopping it", proc.pid, self.stop_timeout)
                proc.kill()
                proc.join(10)
            self._release(proc)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.store.engine.dispose()


def serve_cmd(
    ctx: typer.Context,
    stop_timeout: Annotated[float, typer.Option(help="Seconds the worker may take to finish its job on stop.")] = 300.0,
    role: Annotated[str | None, typer.Option(help="all, receiver or worker (default: node.role from the config).")]
    = None,
) -> None:
    """Run the node: receive (C-STORE), complete studies, analyse, send SC + SR to the destinations."""
    from node.logs import configure_logging

    cfg: Config = ctx.obj.config
    if role is not None:
        if role not in ("all", "receiver", "worker"):
            raise NodeError(f"--role {role!r}: expected all, receiver or worker")
        cfg = cfg.model_copy(update={"node": cfg.node.model_copy(update={"role": role})})
    configure_logging(cfg.logging, role="node")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    node = Node(cfg, stop_timeout=stop_timeout)
    listens = f" on {cfg.node.host}:{cfg.node.port}" if cfg.node.role != "worker" else " (no listener)"
    log.warning("petriage serving %s (role %s) as %s%s (storage %s, %d destination(s)) - AI triage aid, "
                "not for diagnostic use", cfg.node.name or socket.gethostname(), cfg.node.role, cfg.node.ae_title,
                listens, cfg.storage.root, len(cfg.destinations))
    try:
        while not stopping.wait(1.0):
            node.supervise()
    finally:
        node.stop()
        log.warning("petriage stopped")
