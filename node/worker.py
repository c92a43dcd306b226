"""The worker: lease a queued study, pick its CTPA series, run the model, record the outcome.

Outcomes are job states with a reason: ``done`` (the summary is stored as JSON, no patient data),
``skipped`` (no series qualifies, with the selection's reason) or ``failed`` (what went wrong). A
lease is renewed while the model runs; a worker that dies loses its lease and another takes the
job up. Sending SC + SR to the destinations comes next (the ``sending`` state is reserved for it).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from node.errors import NodeError
from node.inference import Engine
from node.selection import choose_ctpa
from node.series import SeriesError, index_series
from node.store import JobState, Store, utcnow

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    """Runs jobs from the store one at a time."""

    def __init__(self, store: Store, engine: Engine, *, owner: str | None = None, lease_seconds: float = 120.0,
                 clock: Callable[[], dt.datetime] = utcnow):
        self.store, self.engine = store, engine
        self.owner = owner or worker_name()
        self.lease_seconds, self.clock = lease_seconds, clock

    def run_once(self) -> dict | None:
        """Claim and run one job; returns the finished job's row values, or None when the queue is empty."""
        job = self.store.claim_job(self.owner, self.lease_seconds, self.clock())
        if job is None:
            return None
        job_id, uid = job["id"], job["study_instance_uid"]
        state, reason, result = JobState.FAILED, "", None
        last_beat = time.monotonic()

        def beat(done: int, total: int) -> None:
            nonlocal last_beat
            if time.monotonic() - last_beat > self.lease_seconds / 4:
                self.store.heartbeat(job_id, self.owner, self.lease_seconds, self.clock())
                last_beat = time.monotonic()

        try:
            files = self.store.study_files(uid)
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise NodeError(f"{len(missing)} of {len(files)} spooled files are missing (e.g. {missing[0].name})")
            choice = choose_ctpa(files)
            analysis = self.engine.analyze(index_series(choice.paths), progress=beat)
            summary = analysis.summary() | {"series": {"series_instance_uid": choice.series_instance_uid,
                                                       "description": choice.description,
                                                       "reason": choice.reason}}
            state, result = JobState.DONE, json.dumps(summary)
            reason = f"{summary['decision']}, probability {analysis.probability:.3f}"
        except SeriesError as exc:
            state, reason = JobState.SKIPPED, f"no CTPA series: {exc}"
        except NodeError as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - the worker turns anything into a failed job with its reason
            log.exception("job %d failed unexpectedly", job_id)
            reason = f"internal error: {type(exc).__name__}: {exc}"
        if not self.store.finish_job(job_id, self.owner, state, reason, self.clock(), result):
            log.warning("job %d: lease lost before it finished; another worker owns it now", job_id)
        log.info("job %d (study ...%s): %s - %s", job_id, uid[-8:], state, reason)
        return {"id": job_id, "study_instance_uid": uid, "state": state, "reason": reason, "result": result}

    def run_forever(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        """Run jobs until ``stop`` is set (checked between jobs)."""
        while not stop.is_set():
            if self.run_once() is None:
                stop.wait(poll_seconds)
