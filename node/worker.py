"""The worker: lease a queued study, pick its CTPA series, run the model, record the outcome.

Outcomes are job states with a reason: ``done`` (the summary is stored as JSON, no patient data),
``skipped`` (no series qualifies, with the selection's reason) or ``failed`` (what went wrong). A
lease is renewed while the model runs; a worker that dies loses its lease and another takes the
job up. Results (SEG, SR, SC, KOS: ``outputs``) go to every destination, each taking the objects it
names, by C-STORE (priority HIGH when PE is suspected) or STOW-RS; a SOP class a destination refuses
is noted in its delivery, not retried. The triage priority (``node/triage.py``) and the
notifications (``node/notify``) are recorded with them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path

from node.config import Destination, NotifySettings, OutputSettings, TriageSettings
from node.delivery import deliver
from node.errors import NodeError
from node.inference import Engine
from node.outputs import for_outputs
from node.outputs.uids import result_key
from node.scu import HIGH, MEDIUM, SendError
from node.selection import SeriesRules, choose_ctpa
from node.series import (
    SeriesError,
    SeriesIndex,
    SliceError,
    check_spacing,
    index_series,
    load_header,
    screen_pixels,
    source_slice,
)
from node.storage_mark import StorageMark
from node.store import JobState, Store, utcnow
from node.triage import priority as triage_priority

log = logging.getLogger(__name__)


def worker_name(pid: int | None = None) -> str:
    """The lease owner name of the worker process ``pid`` (this process by default) on this host."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


#: Send retries: 5 s, 10 s, 20 s ... capped at an hour; after this many attempts the job fails.
BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS, MAX_SEND_ATTEMPTS = 5.0, 3600.0, 12


def _sr_reference(study_instance_uid: str, sr: dict):
    """An earlier SR's identity as a data set, as highdicom takes a predecessor."""
    import pydicom

    ds = pydicom.Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_instance_uid, sr["series_instance_uid"]
    ds.SOPInstanceUID, ds.SOPClassUID = sr["sop_instance_uid"], sr["sop_class_uid"]
    return ds


def _left_out(excluded: list) -> str:
    return f"; {len(excluded)} instance(s) left out (queue show lists them)" if excluded else ""


def backoff_seconds(attempt: int) -> float:
    """Seconds before send attempt ``attempt + 1`` (attempt counts from 1)."""
    return float(min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** max(0, attempt - 1)))


class Worker:
    """Runs jobs from the store one at a time: analyse, write SC + SR to the outbox, send."""

    def __init__(self, store: Store, engine: Engine, *, owner: str | None = None, lease_seconds: float = 120.0,
                 clock: Callable[[], dt.datetime] = utcnow, outbox_root: Path | None = None,
                 destinations: Sequence[Destination] = (), ae_title: str = "PETRIAGE",
                 rules: SeriesRules | None = None, max_gap_factor: float = 1.5,
                 triage: TriageSettings | None = None, notify: NotifySettings | None = None,
                 node_name: str | None = None, storage_mark: StorageMark | None = None,
                 outputs: OutputSettings | None = None):
        self.store, self.engine, self.storage_mark = store, engine, storage_mark
        self._mark_missing_logged = False
        self.node_name = node_name or socket.gethostname()
        self.owner = owner or worker_name()
        self.lease_seconds, self.clock = lease_seconds, clock
        self.outbox_root, self.destinations, self.ae_title = outbox_root, list(destinations), ae_title
        self.rules, self.max_gap_factor = rules or SeriesRules(), max_gap_factor
        self.triage, self.notify = triage or TriageSettings(), notify or NotifySettings()
        self.outputs = outputs or OutputSettings()
        self._last_beat = 0.0

    def run_once(self) -> dict | None:
        """Claim and advance one job; returns its new state, or None when nothing is due (or the
        storage root's mark is gone: the shared storage is not mounted, so no job is started)."""
        if self.storage_mark is not None and not self.storage_mark.present():
            if not self._mark_missing_logged:
                log.error("storage.root %s has lost its mark %s (shared storage not mounted?): no job is claimed "
                          "until it is back", self.storage_mark.root, self.storage_mark.path.name)
                self._mark_missing_logged = True
            return None
        self._mark_missing_logged = False
        job = self.store.claim_job(self.owner, self.lease_seconds, self.clock())
        if job is None:
            return None
        if job["outbox"]:
            return self._deliver(job)
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
            choice, index, analysis = self._analyse(job_id, uid, files, beat)
            excluded = [*choice.unreadable, *index.excluded]
            summary = analysis.summary() | {"series": {"series_instance_uid": choice.series_instance_uid,
                                                       "description": choice.description,
                                                       "reason": choice.reason},
                                            "excluded": [e.describe() for e in excluded]}
            study = self.store.study(uid) or {}
            priority = triage_priority(self.triage, positive=analysis.positive, probability=analysis.probability,
                                       urgent=bool(study.get("urgent")))
            summary["priority"] = priority
            model_id = self._model_id(analysis)
            summary["result_key"] = result_key(uid, model_id, analysis.sop_instance_uids)
            earlier_id, earlier = self._earlier_result(uid, job_id)
            reason = f"{summary['decision']}, probability {summary['probability']:.3f}" + _left_out(excluded)
            asked = str(job.get("reason") or "").startswith("retry requested")  # an admin's retry is always sent
            if earlier is not None and earlier.get("result_key") == summary["result_key"] and not asked:
                summary["sr"] = earlier.get("sr")
                return self._finish(job_id, uid, JobState.DONE, f"{reason}; unchanged since job {earlier_id} (same "
                                    f"model, same {len(analysis.sop_instance_uids)} slices): not sent or notified "
                                    "again", json.dumps(summary))
            outbox = None
            headers = dict(zip(choice.paths, choice.headers, strict=False))
            if self.outbox_root is not None and self.destinations:
                predecessors = [_sr_reference(uid, earlier["sr"])] if earlier and earlier.get("sr") else []
                outbox, summary["sr"] = self._write_outputs(job_id, analysis, index, headers, model_id, predecessors)
            state, result = JobState.DONE, json.dumps(summary)
            source = headers.get(index.paths[0]) if len(index) else None  # an analysed, undamaged instance
            notes = self._notifications(for_outputs(source) if source is not None else None, summary, uid, priority)
            if not self.store.set_outputs(job_id, self.owner, str(outbox) if outbox else None, result, self.clock(),
                                          priority=priority, notify=notes):
                log.warning("job %d: lease lost or job cancelled while analysing; outcome discarded", job_id)
                return {"id": job_id, "study_instance_uid": uid, "state": "lost", "reason": "lease lost"}
            if outbox is not None:
                job = job | {"outbox": str(outbox), "result": result, "delivered": "[]", "send_attempts": 0}
                return self._deliver(job)
        except SeriesError as exc:
            state, reason = JobState.SKIPPED, f"no CTPA series: {exc}"
        except NodeError as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - the worker turns anything into a failed job with its reason
            log.exception("job %d failed unexpectedly", job_id)
            reason = f"internal error: {type(exc).__name__}: {exc}"
        return self._finish(job_id, uid, state, reason, result)

    def _analyse(self, job_id: int, uid: str, files: list[Path], beat: Callable[[int, int], None]):
        """Choose the series, leave out what is damaged (each an event), check the series rules, run the model.

        A slice whose pixels do not decode is found when the model reads it; then every slice is
        decoded once on its own, all damaged ones are left out, and the rules and the model run again.
        """
        choice = choose_ctpa(files, self.rules)
        index = index_series(choice.paths, choice.headers)
        self._record_excluded(job_id, uid, [*choice.unreadable, *index.excluded])
        self._check(index, len(index.excluded))
        try:
            return choice, index, self.engine.analyze(index, progress=beat)
        except SliceError:
            screened = screen_pixels(index)
            self._record_excluded(job_id, uid, list(screened.excluded[len(index.excluded):]))
            self._check(screened, len(screened.excluded))
            return choice, screened, self.engine.analyze(screened, progress=beat)

    def _check(self, index: SeriesIndex, n_excluded: int) -> None:
        try:
            check_spacing(index, self.max_gap_factor)
        except SeriesError as exc:
            if not n_excluded:
                raise
            raise SeriesError(f"{exc}, after {n_excluded} damaged or inconsistent instance(s) were left out") from exc

    def _record_excluded(self, job_id: int, uid: str, excluded: list) -> None:
        for e in excluded:
            self.store.record_event(uid, "instance-excluded", f"job {job_id}: {e.describe()}", self.clock())
            log.warning("job %d: instance left out: %s", job_id, e.describe())

    def _finish(self, job_id: int, uid: str, state: JobState, reason: str, result: str | None = None) -> dict:
        if not self.store.finish_job(job_id, self.owner, state, reason, self.clock(), result):
            log.warning("job %d: lease lost before it finished; another worker owns it now", job_id)
        log.info("job %d (study ...%s): %s - %s", job_id, uid[-8:], state, reason)
        return {"id": job_id, "study_instance_uid": uid, "state": state, "reason": reason, "result": result}

    def _notifications(self, source, summary: dict, uid: str, priority: int) -> list[tuple[str, str]]:
        """The messages for the RIS (HL7) and the webhook, if configured and this result is to be notified."""
        if source is None or (self.notify.results == "positive" and not summary["positive"]):
            return []
        from node.notify.hl7 import build_oru
        from node.notify.webhook import build_payload

        earlier = any(n["channel"] == "hl7" for n in self.store.notifications_of(uid))
        notes = []
        if self.notify.hl7 is not None:
            notes.append(("hl7", build_oru(self.notify.hl7, source, summary, corrected=earlier)))
        if self.notify.webhook is not None:
            notes.append(("webhook", build_payload(source, summary, priority)))
        return notes

    def _model_id(self, analysis) -> str:
        """What, besides the instances, a result depends on: both model files and the operating point."""
        return (f"{self.engine.stage1_file.sha256}:{self.engine.stage2_file.sha256}:"
                f"{analysis.operating_point}:{analysis.threshold!r}")

    def _earlier_result(self, uid: str, job_id: int) -> tuple[int | None, dict | None]:
        """The newest finished analysis of this study before job ``job_id`` (its id and summary), if any."""
        for job in reversed(self.store.jobs_of(uid)):
            if job["id"] != job_id and job["state"] == JobState.DONE and job.get("result"):
                return job["id"], json.loads(job["result"])
        return None, None

    def _write_outputs(self, job_id: int, analysis, index: SeriesIndex, headers: dict, model_id: str,
                       predecessors: list) -> tuple[Path, dict]:
        """SEG, SR, SC and KOS into the outbox; ``index`` is the analysed series, ``headers`` its files' headers
        by path. Returns the outbox and the SR's reference (what a later, changed report names as its predecessor)."""
        from node.outputs.kos import make_kos
        from node.outputs.sc import make_sc_series
        from node.outputs.seg import make_seg
        from node.outputs.sr import CTPA, make_sr
        from node.spool import write_atomic

        assert self.outbox_root is not None
        manifest, o = self.engine.bundle.manifest, self.outputs
        sources = [source_slice(index, k.index, headers.get(index.paths[k.index])) for k in analysis.key_slices]
        keys = [s.dataset for s in sources]
        segs = []
        if o.seg:
            segs = make_seg(analysis, index, [headers.get(p) or load_header(p) for p in index.paths],
                            model_sha256=model_id, spec=manifest.spec(), cam_stride=manifest.cam_stride,
                            floor=o.seg_floor, binary_threshold=o.seg_binary_threshold)
        performed = CTPA
        if o.procedure_code:
            from pydicom.sr.coding import Code

            performed = Code(*o.procedure_code.split("^"))
        sr = make_sr(analysis, keys, model_sha256=model_id, predecessors=predecessors,
                     segmentation=segs[0] if segs else None, performed=performed)
        sc = make_sc_series(analysis, sources, model_sha256=model_id, spec=manifest.spec(),
                            cam_stride=manifest.cam_stride)
        objects = [*segs, sr, *sc]
        if o.kos:
            objects.append(make_kos(analysis, keys, [sr, *sc, *segs], model_sha256=model_id))
        outbox = self.outbox_root / analysis.study_instance_uid / f"job-{job_id}"
        for obj in objects:
            buffer = BytesIO()
            obj.save_as(buffer, enforce_file_format=True)
            write_atomic(outbox / f"{obj.SOPInstanceUID}.dcm", buffer.getvalue())
        return outbox, {"series_instance_uid": str(sr.SeriesInstanceUID), "sop_instance_uid": str(sr.SOPInstanceUID),
                        "sop_class_uid": str(sr.SOPClassUID)}

    def _deliver(self, job: dict) -> dict:
        job_id, uid = job["id"], job["study_instance_uid"]
        files = sorted(Path(job["outbox"]).glob("*.dcm"))
        delivered = set(json.loads(job.get("delivered") or "[]"))
        problems, refused = [], []
        kinds: dict[Path, str] = {}  # each outbox file's object kind, read once for every destination
        summary = json.loads(job["result"])
        urgent = bool(summary.get("positive"))
        for dest in self.destinations:
            if dest.name in delivered:
                continue
            if not self.store.heartbeat(job_id, self.owner, self.lease_seconds, self.clock()):
                log.warning("job %d: cancelled or taken over before sending to %s", job_id, dest.name)
                return {"id": job_id, "study_instance_uid": uid, "state": "lost", "reason": "lease lost"}
            try:
                delivery = deliver(files, dest, calling_ae_title=self.ae_title, priority=HIGH if urgent else MEDIUM,
                                   kinds=kinds)
                how = "STOW-RS" if dest.kind == "dicomweb" else f"priority {'HIGH' if urgent else 'MEDIUM'}"
                self.store.mark_delivered(job_id, dest.name, self.clock(),
                                          f"{dest.where}, {how}: {delivery.describe()}: "
                                          + ", ".join(delivery.acknowledged))
                if delivery.refused:
                    refused.append(f"{dest.name} refused " + ", ".join(sorted(delivery.refused)))
                delivered.add(dest.name)
            except (SendError, OSError) as exc:
                problems.append(str(exc))
        base = f"{summary['decision']}, probability {summary['probability']:.3f}"
        if not problems:
            return self._finish(job_id, uid, JobState.DONE, f"{base}; sent to {', '.join(sorted(delivered))}"
                                + "".join(f"; {r} (not sent; see destinations[].objects)" for r in refused),
                                job.get("result"))
        attempts = int(job.get("send_attempts") or 0) + 1
        if attempts >= MAX_SEND_ATTEMPTS:
            return self._finish(job_id, uid, JobState.FAILED, f"{base}; sending failed after {attempts} attempts: "
                                + "; ".join(problems), job.get("result"))
        when = self.clock() + dt.timedelta(seconds=backoff_seconds(attempts))
        reason = f"{base}; send attempt {attempts} failed, next at {when:%H:%M:%S}: " + "; ".join(problems)
        self.store.retry_later(job_id, self.owner, when, reason, self.clock())
        log.warning("job %d (study ...%s): %s", job_id, uid[-8:], reason)
        return {"id": job_id, "study_instance_uid": uid, "state": JobState.SENDING, "reason": reason,
                "result": job.get("result")}

    def beat(self, every_seconds: float = 5.0) -> None:
        """Tell the store this worker is alive (``petriage status`` reads it), at most every few seconds."""
        if time.monotonic() - self._last_beat >= every_seconds:
            self.store.beat("worker", socket.gethostname(), os.getpid(), self.clock(),
                            self.engine.describe() | {"owner": self.owner}, node=self.node_name)
            self._last_beat = time.monotonic()

    def run_forever(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        """Run jobs until ``stop`` is set (checked between jobs)."""
        while not stop.is_set():
            self.beat()
            if self.run_once() is None:
                stop.wait(poll_seconds)
