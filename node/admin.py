"""Queue administration on the store: what ``petriage queue``/``worklist`` do, without the printing.

Every change is one conditional UPDATE (the node may be running: a job changes state only from the
states named here, so an admin never overwrites what a worker just did) plus an ``admin-*`` event
naming the operating-system user: the audit trail says who retried, cancelled or purged what.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, insert, select, update

from node.errors import NodeError
from node.store import JobState, Store, events, instances, jobs, naive_utc, studies, utcnow


class AdminError(NodeError):
    """An admin request that cannot be done (no such job, wrong state); the message says why."""


def operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"


def _age_seconds(at: dt.datetime | None, now: dt.datetime) -> float | None:
    return None if at is None else max(0.0, (naive_utc(now) - naive_utc(at)).total_seconds())


def _job_row(row, now: dt.datetime) -> dict:
    d = dict(row._mapping)
    result = json.loads(d.get("result") or "null") or {}
    d["probability"] = result.get("probability")
    d["decision"] = result.get("decision")
    d["positive"] = result.get("positive")
    d["age_seconds"] = _age_seconds(d["created_at"], now)
    return d


def list_jobs(store: Store, states: list[str] | None = None, limit: int = 200,
              now: dt.datetime | None = None) -> list[dict]:
    """Jobs, most urgent first (priority, then oldest), optionally only in ``states``."""
    now = now or utcnow()
    query = select(jobs).order_by(jobs.c.priority.desc(), jobs.c.id).limit(limit)
    if states:
        query = query.where(jobs.c.state.in_(states))
    with store.engine.connect() as conn:
        return [_job_row(r, now) for r in conn.execute(query).all()]


def find(store: Store, ref: str, now: dt.datetime | None = None) -> tuple[str, list[dict]]:
    """(StudyInstanceUID, its jobs) for job number ``ref``, or for the study whose UID is ``ref`` or ends
    with it (6+ characters); a study still being received has no job yet."""
    now = now or utcnow()
    with store.engine.connect() as conn:
        if ref.isdigit():
            row = conn.execute(select(jobs).where(jobs.c.id == int(ref))).first()
            if row is not None:
                return str(row.study_instance_uid), [_job_row(row, now)]
        if len(ref) >= 6:
            uids = [r[0] for r in conn.execute(select(studies.c.study_instance_uid).where(
                (studies.c.study_instance_uid == ref) | studies.c.study_instance_uid.like(f"%{ref}"))).all()]
            if len(uids) > 1:
                raise AdminError(f"{ref!r} matches {len(uids)} studies; give more of the UID")
            if uids:
                rows = conn.execute(select(jobs).where(jobs.c.study_instance_uid == uids[0])
                                    .order_by(jobs.c.id)).all()
                return uids[0], [_job_row(r, now) for r in rows]
    raise AdminError(f"no job or study {ref!r}")


def get_job(store: Store, job_id: int) -> dict:
    """The job's row; AdminError if there is none."""
    with store.engine.connect() as conn:
        row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
    if row is None:
        raise AdminError(f"no job {job_id}")
    return dict(row._mapping)


def _change(store: Store, job_id: int, allowed: tuple[str, ...], values: dict, kind: str, detail: str,
            by: str | None = None) -> dict:
    job = get_job(store, job_id)
    now = utcnow()
    with store.engine.begin() as conn:
        changed = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.state.in_(allowed))
                               .values(**values, updated_at=now)).rowcount
        if changed != 1:
            current = conn.execute(select(jobs.c.state).where(jobs.c.id == job_id)).scalar_one()
            raise AdminError(f"job {job_id} is {current}; this works on {', '.join(allowed)} jobs")
        conn.execute(insert(events).values(at=now, study_instance_uid=job["study_instance_uid"], kind=kind,
                                           detail=f"job {job_id}: {detail} by {by or operator()}"))
    return get_job(store, job_id)


def retry(store: Store, job_id: int, *, force: bool = False, by: str | None = None) -> dict:
    """A failed, skipped or cancelled job (or, with ``force``, a done one) runs again; a job waiting to
    re-send (sending) is sent now instead of at its next backoff time.

    A job whose results were made but not delivered is sent again (state sending, due now, send
    attempts reset); any other is analysed again from its study's stored instances.
    """
    job = get_job(store, job_id)
    if job["state"] == JobState.SENDING:
        return _change(store, job_id, (JobState.SENDING,), {"next_attempt_at": utcnow()}, "admin-retry",
                       "sending now", by)
    allowed = (JobState.FAILED, JobState.SKIPPED, JobState.CANCELLED) + ((JobState.DONE,) if force else ())
    if job["state"] == JobState.DONE and not force:
        raise AdminError(f"job {job_id} is done; --force analyses it again")
    resend = bool(job["outbox"]) and Path(job["outbox"]).is_dir() and job["state"] != JobState.DONE
    if resend:
        values = {"state": JobState.SENDING, "next_attempt_at": utcnow(), "send_attempts": 0,
                  "reason": "retry requested: sending again", "lease_owner": None, "lease_expires_at": None}
    else:
        values = {"state": JobState.QUEUED, "reason": "retry requested: analysing again", "outbox": None,
                  "delivered": "[]", "send_attempts": 0, "next_attempt_at": None, "lease_owner": None,
                  "lease_expires_at": None, "result": None}
    return _change(store, job_id, allowed, values, "admin-retry", "sending again" if resend else "analysing again",
                   by)


def cancel(store: Store, job_id: int, *, by: str | None = None) -> dict:
    """A queued, running or sending job stops (a running worker's outcome is then discarded)."""
    return _change(store, job_id, (JobState.QUEUED, JobState.RUNNING, JobState.SENDING),
                   {"state": JobState.CANCELLED, "reason": f"cancelled by {by or operator()}", "lease_owner": None,
                    "lease_expires_at": None}, "admin-cancel", "cancelled", by)


def set_priority(store: Store, job_id: int, priority: int, *, by: str | None = None) -> dict:
    job = get_job(store, job_id)
    return _change(store, job_id, tuple(JobState), {"priority": priority}, "admin-priority",
                   f"priority {job['priority']} -> {priority}", by)


def requeue(store: Store, state: JobState = JobState.FAILED, *, by: str | None = None) -> list[int]:
    """``retry`` every job in ``state`` (failed: run again; sending: send now)."""
    with store.engine.connect() as conn:
        ids = [r[0] for r in conn.execute(select(jobs.c.id).where(jobs.c.state == state)
                                          .order_by(jobs.c.priority.desc(), jobs.c.id)).all()]
    done = []
    for job_id in ids:
        try:
            retry(store, job_id, by=by)
            done.append(job_id)
        except AdminError:  # changed state meanwhile (a worker or another admin)
            continue
    return done


@dataclass
class PurgeResult:
    studies: list[str]
    jobs: int
    instances: int
    bytes: int
    dry_run: bool


def purge(store: Store, storage_root: Path, older_than: dt.timedelta, *, dry_run: bool = False,
          now: dt.datetime | None = None) -> PurgeResult:
    """Delete studies whose every job is final (failed ones too) and whose last job changed before
    ``now - older_than``: their spool files, outbox folders, instance, study and job rows. Events stay
    (the audit trail). The removal itself is housekeeping's (node.housekeeping.remove_study)."""
    from node.housekeeping import removable, remove_study

    now = now or utcnow()
    cutoff = naive_utc(now - older_than)
    uids = [uid for uid, last in removable(store, settled_only=False) if naive_utc(last) < cutoff]
    result = PurgeResult([], 0, 0, 0, dry_run)
    for uid in uids:
        if dry_run:
            with store.engine.connect() as conn:
                files = conn.execute(select(instances.c.bytes).where(instances.c.study_instance_uid == uid)).all()
                n_jobs = conn.execute(select(func.count()).select_from(jobs).where(
                    jobs.c.study_instance_uid == uid)).scalar_one()
            result.studies.append(uid)
            result.jobs, result.instances = result.jobs + n_jobs, result.instances + len(files)
            result.bytes += sum(int(b) for (b,) in files)
            continue
        removed = remove_study(store, storage_root, uid, now, "admin-purge", f"by {operator()}", settled_only=False)
        if removed:
            result.studies.append(uid)
            result.jobs, result.instances = result.jobs + removed.jobs, result.instances + removed.instances
            result.bytes += removed.bytes
    return result


def worklist(store: Store, now: dt.datetime | None = None, limit: int = 200) -> list[dict]:
    """One row per study, by triage priority: its latest job's state, decision, probability and ages."""
    now = now or utcnow()
    with store.engine.connect() as conn:
        latest = select(func.max(jobs.c.id).label("id")).group_by(jobs.c.study_instance_uid).subquery()
        rows = conn.execute(select(jobs, studies.c.last_received_at, studies.c.instances, studies.c.urgent)
                            .join(latest, latest.c.id == jobs.c.id)
                            .join(studies, studies.c.study_instance_uid == jobs.c.study_instance_uid)
                            .where(jobs.c.state != JobState.CANCELLED)
                            .order_by(jobs.c.priority.desc(), jobs.c.created_at).limit(limit)).all()
    out = []
    for r in rows:
        d = _job_row(r, now)
        d["received_age_seconds"] = _age_seconds(r.last_received_at, now)
        d["result_age_seconds"] = _age_seconds(r.updated_at, now) if d["probability"] is not None else None
        out.append(d)
    return out


def audit_trail(store: Store, limit: int = 100) -> list[dict]:
    """The newest logins, failed logins, refusals and admin actions (console and CLI), newest first."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(events).where(events.c.kind.like("web-%") | events.c.kind.like("admin-%"))
                            .order_by(events.c.id.desc()).limit(limit)).all()
    return [dict(r._mapping) for r in rows]


def triage_label(row: dict) -> str:
    """What a worklist row says: PE suspected, PE not suspected, pending, or why it was not analysed."""
    if row["probability"] is None:
        return {"failed": "not analysed: failed", "skipped": "not analysed: skipped"}.get(row["state"], "pending")
    return "PE suspected" if row["positive"] else "PE not suspected"


def timeline(store: Store, study_instance_uid: str) -> list[dict]:
    return store.events_of(study_instance_uid)
