"""The node's store: SQLAlchemy Core tables for instances, studies, jobs, notifications, heartbeats
and an append-only event log (the audit trail).

SQLite (WAL) by default, under ``<storage.root>/petriage.db``; no SQLite-only SQL, so the same code
runs on PostgreSQL. Every change that belongs together happens in one transaction. The admin CLI
(``node/admin.py``) works on the same tables while the node runs.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import SimpleNamespace

from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError as AlembicError
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from node.errors import NodeError


class StoreError(NodeError):
    """The database could not be read or written; the message says what was being done."""


class StudyState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = (JobState.DONE, JobState.SKIPPED, JobState.FAILED, JobState.CANCELLED)


metadata = MetaData()

instances = Table(
    "instances", metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("study_instance_uid", String(64), nullable=False, index=True),
    Column("series_instance_uid", String(64), nullable=False),
    Column("sop_class_uid", String(64), nullable=False),
    Column("transfer_syntax_uid", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("bytes", Integer, nullable=False),
    Column("calling_ae_title", String(16), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
)

studies = Table(
    "studies", metadata,
    Column("study_instance_uid", String(64), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("reason", Text),
    Column("instances", Integer, nullable=False),
    Column("first_received_at", DateTime(timezone=True), nullable=False),
    Column("last_received_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True)),
    Column("urgent", Boolean, nullable=False, default=False),  # the source asked for priority
    # Start of the current max-wait window: the first instance, or the first one after a completion.
    Column("wait_started_at", DateTime(timezone=True)),
)

jobs = Table(
    "jobs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_instance_uid", String(64), nullable=False, index=True),
    Column("state", String(16), nullable=False, index=True),
    Column("priority", Integer, nullable=False, default=0),
    Column("reason", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(64)),
    Column("lease_expires_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("result", Text),  # JSON summary of the analysis (no patient data)
    Column("outbox", Text),  # folder of the result objects, once made
    Column("delivered", Text, nullable=False, default="[]"),  # JSON list of destinations that took everything
    Column("send_attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("trigger", Text),  # why the study was analysed: quiet, or max-wait while it was still receiving
)

notifications = Table(
    "notifications", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, nullable=False, index=True),
    Column("study_instance_uid", String(64), nullable=False),
    Column("channel", String(16), nullable=False),  # hl7 | webhook
    Column("state", String(16), nullable=False, index=True),  # pending | sent | failed
    Column("payload", Text, nullable=False),  # the message as it goes out (an HL7 message may hold patient data)
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("reason", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

heartbeats = Table(
    "heartbeats", metadata,
    Column("node", String(128), primary_key=True),  # node.name: several nodes share one store
    Column("component", String(32), primary_key=True),  # listener | worker
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("detail", Text, nullable=False, default="{}"),  # JSON: port, model, providers ...
)

settings = Table(  # the store as a whole (revision 0003): storage-mark -> the storage root's identity
    "settings", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

web_users = Table(  # the web console's users (revision 0004): name, role, argon2 hash (node/web/users.py)
    "web_users", metadata,
    Column("name", String(64), primary_key=True),
    Column("role", String(16), nullable=False),  # viewer | admin
    Column("password_hash", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("password_changed_at", DateTime(timezone=True), nullable=False),
)

events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("study_instance_uid", String(64), index=True),
    Column("kind", String(32), nullable=False),
    Column("detail", Text, nullable=False, default=""),
)


@dataclass(frozen=True)
class Received:
    """One stored instance, as the SCP records it."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    bytes: int
    calling_ae_title: str
    urgent: bool = False
    address: str = ""  # the sender's IP address (audit trail)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def naive_utc(value: dt.datetime) -> dt.datetime:
    """UTC without tzinfo: SQLite hands datetimes back naive, PostgreSQL aware; compare them like this."""
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a committed instance row survives a power cut
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def database_url(storage_root: Path, url: str | None = None) -> str:
    """The store's URL: ``store.url`` when set, else SQLite under the storage root."""
    return url or f"sqlite:///{Path(storage_root) / 'petriage.db'}"


def shown(url: str) -> str:
    """A database URL fit for messages and logs: its password, if any, masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unreadable database URL)"


MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 7_345_201  # PostgreSQL advisory lock: one node migrates at a time


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    """The newest schema revision this code knows (node/migrations/versions)."""
    return str(ScriptDirectory.from_config(_alembic_config()).get_current_head())


def migrate(engine: Engine, to: str = "head") -> str:
    """Upgrade the store's schema to the newest revision (or ``to``), keeping its rows; returns the revision.

    A new store is created by the migrations; a store made before migrations existed (our tables, no
    ``alembic_version``) is adopted by the baseline revision, which adds what it lacks. On PostgreSQL
    several nodes starting together wait for one another on an advisory lock.
    """
    config = _alembic_config()
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines ("Context impl ...") at every start
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})"))
        config.attributes["connection"] = conn
        alembic_command.upgrade(config, to)
        return str(MigrationContext.configure(conn).get_current_revision())


@functools.cache
def _record_statements(dialect: str) -> SimpleNamespace:
    """The statements every received instance runs, built once per dialect (bound parameters, no values):
    an INSERT ... ON CONFLICT DO NOTHING RETURNING (a row back says the instance is new: one round trip
    instead of a look-up and an insert) and the receiving study's count and time, urgent or not."""
    make = postgresql_insert if dialect == "postgresql" else sqlite_insert
    receiving = update(studies).where(studies.c.study_instance_uid == bindparam("b_uid"),
                                      studies.c.state == StudyState.RECEIVING)
    bumped = {"instances": studies.c.instances + 1, "last_received_at": bindparam("b_now")}
    return SimpleNamespace(
        new_instance=(make(instances).on_conflict_do_nothing(index_elements=["sop_instance_uid"])
                      .returning(instances.c.sop_instance_uid)),
        bump=receiving.values(**bumped), bump_urgent=receiving.values(**bumped, urgent=True))


class Store:
    """Access to the node's tables; one per process, thread-safe through SQLAlchemy's pool."""

    def __init__(self, url: str):
        self.url = url
        try:
            # pre-ping: a pooled connection that a PostgreSQL restart closed is replaced, not handed out
            self.engine: Engine = create_engine(url, future=True, pool_pre_ping=not url.startswith("sqlite"))
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            self.revision = migrate(self.engine)
        except (SQLAlchemyError, AlembicError, RuntimeError) as exc:
            raise StoreError(f"cannot open the store at {shown(url)}: {exc}") from exc

    def record_instance(self, item: Received, now: dt.datetime | None = None) -> bool:
        """Record a stored instance; returns False for a duplicate (already recorded, nothing counted twice).

        A study that was already complete is reopened, so it is analysed again once it is quiet.
        """
        return self.record_instances([item], now)[0]

    def record_instances(self, items: Sequence[Received], now: dt.datetime | None = None) -> list[bool]:
        """Record several stored instances in one transaction (group commit: one fsync for all of them);
        returns, for each, False where it was a duplicate. All are recorded or none (StoreError)."""
        now = now or utcnow()
        try:
            with self.engine.begin() as conn:
                return [self._record(conn, item, now) for item in items]
        except SQLAlchemyError as exc:
            which = items[0].study_instance_uid[-8:] if len(items) == 1 else f"{len(items)} instances"
            raise StoreError(f"cannot record instance of study ...{which}: {exc}") from exc

    @staticmethod
    def _record(conn, item: Received, now: dt.datetime) -> bool:
        # Two statements for the usual instance (a new one of a study that is receiving), each built once
        # (_record_statements), so SQLAlchemy neither rebuilds nor re-compiles them per instance.
        st = _record_statements(conn.dialect.name)
        row = {"sop_instance_uid": item.sop_instance_uid, "study_instance_uid": item.study_instance_uid,
               "series_instance_uid": item.series_instance_uid, "sop_class_uid": item.sop_class_uid,
               "transfer_syntax_uid": item.transfer_syntax_uid, "path": str(item.path), "bytes": item.bytes,
               "calling_ae_title": item.calling_ae_title, "received_at": now}
        if conn.execute(st.new_instance, row).first() is None:  # already recorded: a duplicate
            conn.execute(update(instances).where(instances.c.sop_instance_uid == item.sop_instance_uid)
                         .values(path=str(item.path), bytes=item.bytes, received_at=now))
            conn.execute(insert(events).values(at=now, study_instance_uid=item.study_instance_uid,
                                               kind="duplicate", detail=item.sop_instance_uid))
            return False
        bump = st.bump_urgent if item.urgent else st.bump
        if conn.execute(bump, {"b_uid": item.study_instance_uid, "b_now": now}).rowcount == 1:
            return True  # one more instance of a study that is receiving
        study = conn.execute(select(studies.c.state).where(
            studies.c.study_instance_uid == item.study_instance_uid)).first()
        if study is None:
            conn.execute(insert(studies).values(
                study_instance_uid=item.study_instance_uid, state=StudyState.RECEIVING, instances=1,
                first_received_at=now, last_received_at=now, wait_started_at=now, urgent=item.urgent))
            conn.execute(insert(events).values(at=now, study_instance_uid=item.study_instance_uid,
                                               kind="study-started",
                                               detail=f"from {item.calling_ae_title}"
                                               + (f" at {item.address}" if item.address else "")))
            return True
        values: dict = {"instances": studies.c.instances + 1, "last_received_at": now}
        if item.urgent:
            values["urgent"] = True
        if study.state != StudyState.RECEIVING:  # receiving here only if another node made it since the bump
            values |= {"state": StudyState.RECEIVING, "completed_at": None, "wait_started_at": now}
            conn.execute(insert(events).values(at=now, study_instance_uid=item.study_instance_uid,
                                               kind="study-reopened", detail=item.sop_instance_uid))
        conn.execute(update(studies).where(studies.c.study_instance_uid == item.study_instance_uid)
                     .values(**values))
        return True

    def complete_quiet_studies(self, now: dt.datetime, quiet_seconds: float, max_wait_seconds: float,
                               priority_of: Callable[[bool], int] = lambda urgent: 0) -> list[str]:
        """Mark receiving studies complete (quiet long enough, or waiting too long) and queue a job for each.

        ``max_wait_seconds`` bounds how long a study that keeps receiving waits for its analysis, and it
        counts from the first instance or from the first one after the last completion: a study that
        never falls quiet is analysed once per max-wait while it arrives, then once more when it is quiet,
        never at every sweep. A study reopened by late instances is queued again once, however many
        arrived. A study that already has a queued job gets no second one. A new job's priority is
        ``priority_of(urgent)`` (the pending triage priority); its ``trigger`` says why it was queued.
        """
        quiet_before = now - dt.timedelta(seconds=quiet_seconds)
        started_before = now - dt.timedelta(seconds=max_wait_seconds)
        window = func.coalesce(studies.c.wait_started_at, studies.c.first_received_at)
        done: list[str] = []
        try:
            with self.engine.begin() as conn:
                rows = conn.execute(select(studies.c.study_instance_uid, studies.c.last_received_at,
                                           studies.c.urgent, studies.c.instances).where(
                    studies.c.state == StudyState.RECEIVING,
                    (studies.c.last_received_at <= quiet_before) | (window <= started_before),
                )).all()
                for row in rows:
                    uid = row.study_instance_uid
                    key = "quiet" if naive_utc(row.last_received_at) <= naive_utc(quiet_before) else "max-wait"
                    if key == "quiet":
                        why = f"quiet: no new instance for {quiet_seconds:g} s, {row.instances} instances"
                    else:
                        why = (f"max-wait: still receiving after {max_wait_seconds:g} s, {row.instances} instances "
                               "so far; analysed again once quiet")
                    changed = conn.execute(update(studies).where(studies.c.study_instance_uid == uid,
                                                                 studies.c.state == StudyState.RECEIVING)
                                           .values(state=StudyState.COMPLETE, completed_at=now)).rowcount
                    if changed != 1:
                        continue
                    conn.execute(insert(events).values(at=now, study_instance_uid=uid, kind="study-complete",
                                                       detail=key))
                    queued = conn.execute(select(jobs.c.id).where(jobs.c.study_instance_uid == uid,
                                                                  jobs.c.state == JobState.QUEUED)).first()
                    if queued is None:
                        job = conn.execute(insert(jobs).values(study_instance_uid=uid, state=JobState.QUEUED,
                                                               priority=priority_of(bool(row.urgent)),
                                                               attempts=0, created_at=now, updated_at=now,
                                                               trigger=why)).inserted_primary_key
                        conn.execute(insert(events).values(at=now, study_instance_uid=uid, kind="job-queued",
                                                           detail=f"job {job[0] if job else '?'}: {why}"))
                    done.append(uid)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot complete studies: {exc}") from exc
        return done

    def claim_job(self, owner: str, lease_seconds: float, now: dt.datetime) -> dict | None:
        """Lease the most urgent queued job (or one whose lease ran out: its worker died); None if none.

        The claim is a conditional UPDATE checked by its row count, so two workers never get the same
        job on SQLite or PostgreSQL alike; on PostgreSQL the candidates are read FOR UPDATE SKIP LOCKED,
        so workers of several nodes pass over each other's rows instead of queueing behind them.
        """
        expires = now + dt.timedelta(seconds=lease_seconds)
        try:
            with self.engine.begin() as conn:
                candidates = conn.execute(select(jobs.c.id).where(
                    (jobs.c.state == JobState.QUEUED)
                    | ((jobs.c.state == JobState.RUNNING) & (jobs.c.lease_expires_at < now))
                    | ((jobs.c.state == JobState.SENDING) & (jobs.c.next_attempt_at <= now))
                ).order_by(jobs.c.priority.desc(), jobs.c.id).limit(5)
                    .with_for_update(skip_locked=True)).all()  # PostgreSQL: rows another node holds are passed over
                for (job_id,) in candidates:
                    taken = conn.execute(update(jobs).where(
                        jobs.c.id == job_id,
                        (jobs.c.state == JobState.QUEUED)
                        | ((jobs.c.state == JobState.RUNNING) & (jobs.c.lease_expires_at < now))
                        | ((jobs.c.state == JobState.SENDING) & (jobs.c.next_attempt_at <= now)),
                    ).values(state=JobState.RUNNING, lease_owner=owner, lease_expires_at=expires,
                             attempts=jobs.c.attempts + 1, updated_at=now)).rowcount
                    if taken == 1:
                        row = conn.execute(select(jobs).where(jobs.c.id == job_id)).one()
                        conn.execute(insert(events).values(at=now, study_instance_uid=row.study_instance_uid,
                                                           kind="job-claimed", detail=f"job {job_id} by {owner}, "
                                                           f"attempt {row.attempts}"))
                        return dict(row._mapping)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot claim a job: {exc}") from exc
        return None

    def heartbeat(self, job_id: int, owner: str, lease_seconds: float, now: dt.datetime) -> bool:
        """Extend a held lease; False if the lease was lost (another worker took the job)."""
        with self.engine.begin() as conn:
            return conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.lease_owner == owner,
                                                   jobs.c.state == JobState.RUNNING)
                                .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                                        updated_at=now)).rowcount == 1

    def finish_job(self, job_id: int, owner: str, state: JobState, reason: str, now: dt.datetime,
                   result: str | None = None, priority: int | None = None) -> bool:
        """Record a job's outcome, only if ``owner`` still holds it; False otherwise (nothing changed)."""
        values: dict = {"state": state, "reason": reason, "result": result, "lease_expires_at": None,
                        "updated_at": now}
        if priority is not None:
            values["priority"] = priority
        try:
            with self.engine.begin() as conn:
                changed = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.lease_owner == owner,
                                                          jobs.c.state == JobState.RUNNING)
                                       .values(**values)).rowcount
                if changed == 1:
                    uid = conn.execute(select(jobs.c.study_instance_uid).where(jobs.c.id == job_id)).scalar_one()
                    conn.execute(insert(events).values(at=now, study_instance_uid=uid, kind=f"job-{state}",
                                                       detail=f"job {job_id}: {reason}"))
                return changed == 1
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot finish job {job_id}: {exc}") from exc

    def set_outputs(self, job_id: int, owner: str, outbox: str | None, result: str, now: dt.datetime,
                    priority: int | None = None, notify: Sequence[tuple[str, str]] = ()) -> bool:
        """Record the analysis: its result, the outbox of its objects (it stays leased, now sending), its
        triage priority, and the notifications to send (channel, payload), once per channel and job."""
        values: dict = {"outbox": outbox, "result": result, "updated_at": now}
        if priority is not None:
            values["priority"] = priority
        with self.engine.begin() as conn:
            changed = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.lease_owner == owner,
                                                      jobs.c.state == JobState.RUNNING).values(**values)).rowcount
            if changed != 1:
                return False
            uid = conn.execute(select(jobs.c.study_instance_uid).where(jobs.c.id == job_id)).scalar_one()
            have = {r.channel for r in conn.execute(select(notifications.c.channel).where(
                notifications.c.job_id == job_id)).all()}
            for channel, payload in notify:
                if channel in have:
                    continue
                conn.execute(insert(notifications).values(
                    job_id=job_id, study_instance_uid=uid, channel=channel, state="pending", payload=payload,
                    attempts=0, next_attempt_at=now, created_at=now, updated_at=now))
                conn.execute(insert(events).values(at=now, study_instance_uid=uid, kind="notify-queued",
                                                   detail=f"job {job_id}: {channel}"))
            return True

    def mark_delivered(self, job_id: int, destination: str, now: dt.datetime, what: str = "") -> None:
        """Record that ``destination`` took every result object of the job (``what``: which, for the audit trail)."""
        with self.engine.begin() as conn:
            row = conn.execute(select(jobs.c.delivered, jobs.c.study_instance_uid).where(jobs.c.id == job_id)).one()
            delivered = sorted(set(json.loads(row.delivered or "[]")) | {destination})
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(delivered=json.dumps(delivered),
                                                                         updated_at=now))
            conn.execute(insert(events).values(at=now, study_instance_uid=row.study_instance_uid, kind="delivered",
                                               detail=f"job {job_id} to {destination}" + (f": {what}" if what else "")))

    def retry_later(self, job_id: int, owner: str, when: dt.datetime, reason: str, now: dt.datetime) -> bool:
        """Give the lease back; the job is claimable again (state sending) from ``when``."""
        with self.engine.begin() as conn:
            changed = conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.lease_owner == owner,
                                                      jobs.c.state == JobState.RUNNING)
                                   .values(state=JobState.SENDING, reason=reason, next_attempt_at=when,
                                           send_attempts=jobs.c.send_attempts + 1, lease_owner=None,
                                           lease_expires_at=None, updated_at=now)).rowcount
            if changed == 1:
                uid = conn.execute(select(jobs.c.study_instance_uid).where(jobs.c.id == job_id)).scalar_one()
                conn.execute(insert(events).values(at=now, study_instance_uid=uid, kind="send-retry",
                                                   detail=f"job {job_id} at {when.isoformat()}: {reason}"))
            return changed == 1

    def release_leases(self, owner: str, now: dt.datetime, reason: str) -> list[int]:
        """Jobs ``owner`` held (it stopped): back to queued, or to sending when their results exist."""
        released = []
        with self.engine.begin() as conn:
            rows = conn.execute(select(jobs.c.id, jobs.c.outbox, jobs.c.study_instance_uid).where(
                jobs.c.lease_owner == owner, jobs.c.state == JobState.RUNNING)).all()
            for row in rows:
                state = JobState.SENDING if row.outbox else JobState.QUEUED
                conn.execute(update(jobs).where(jobs.c.id == row.id, jobs.c.lease_owner == owner,
                                                jobs.c.state == JobState.RUNNING)
                             .values(state=state, lease_owner=None, lease_expires_at=None, next_attempt_at=now,
                                     reason=reason, updated_at=now))
                conn.execute(insert(events).values(at=now, study_instance_uid=row.study_instance_uid,
                                                   kind="job-released", detail=f"job {row.id}: {reason}"))
                released.append(row.id)
        return released

    def running_owners(self, prefix: str) -> set[str]:
        """Lease owners whose name starts with ``prefix`` (e.g. this host's "host:") holding running jobs."""
        with self.engine.connect() as conn:
            return {r[0] for r in conn.execute(select(jobs.c.lease_owner).where(
                jobs.c.state == JobState.RUNNING, jobs.c.lease_owner.startswith(prefix, autoescape=True))).all()}

    def jobs_of(self, study_instance_uid: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.study_instance_uid == study_instance_uid)
                                .order_by(jobs.c.id)).all()
        return [dict(r._mapping) for r in rows]

    def study(self, study_instance_uid: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(studies).where(studies.c.study_instance_uid == study_instance_uid)).first()
        return dict(row._mapping) if row else None

    def study_files(self, study_instance_uid: str) -> list[Path]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(instances.c.path).where(
                instances.c.study_instance_uid == study_instance_uid)).all()
        return [Path(r.path) for r in rows]

    def events_of(self, study_instance_uid: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(events).where(events.c.study_instance_uid == study_instance_uid)
                                .order_by(events.c.id)).all()
        return [dict(r._mapping) for r in rows]

    # ------------------------------------------------------------------ notifications
    def due_notifications(self, now: dt.datetime, limit: int = 50) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(notifications).where(
                notifications.c.state == "pending", notifications.c.next_attempt_at <= now)
                .order_by(notifications.c.id).limit(limit)).all()
        return [dict(r._mapping) for r in rows]

    def claim_notification(self, notification_id: int, now: dt.datetime, lease_seconds: float) -> bool:
        """Take a due notification for ``lease_seconds``; False when another node took it first.

        The lease is the notification's next due time moved past the send: a conditional UPDATE that
        only one node's notifier wins, and a node that dies while sending leaves it due again when the
        lease runs out (so a message is sent twice only if a send outlasts its lease).
        """
        with self.engine.begin() as conn:
            return conn.execute(update(notifications).where(
                notifications.c.id == notification_id, notifications.c.state == "pending",
                notifications.c.next_attempt_at <= now,
            ).values(next_attempt_at=now + dt.timedelta(seconds=lease_seconds), updated_at=now)).rowcount == 1

    def notification_retry(self, notification_id: int, when: dt.datetime, reason: str, now: dt.datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(notifications).where(notifications.c.id == notification_id).values(
                attempts=notifications.c.attempts + 1, next_attempt_at=when, reason=reason, updated_at=now))

    def notification_done(self, notification_id: int, sent: bool, reason: str, now: dt.datetime) -> None:
        state = "sent" if sent else "failed"
        with self.engine.begin() as conn:
            conn.execute(update(notifications).where(notifications.c.id == notification_id).values(
                attempts=notifications.c.attempts + 1, state=state, reason=reason, updated_at=now))
            row = conn.execute(select(notifications.c.study_instance_uid, notifications.c.channel,
                                      notifications.c.job_id).where(notifications.c.id == notification_id)).one()
            conn.execute(insert(events).values(at=now, study_instance_uid=row.study_instance_uid,
                                               kind=f"notify-{state}",
                                               detail=f"job {row.job_id}: {row.channel}: {reason}"))

    def notifications_of(self, study_instance_uid: str) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(notifications).where(
                notifications.c.study_instance_uid == study_instance_uid).order_by(notifications.c.id)).all()
        return [dict(r._mapping) for r in rows]

    def queue_summary(self, now: dt.datetime) -> dict:
        """Jobs by state (every state, 0 when none), the oldest queued job's age in seconds (None when none)
        and notifications by (channel, state): what ``petriage status`` and the metrics report."""
        with self.engine.connect() as conn:
            depth: dict[str, int] = {str(s): int(n) for s, n in conn.execute(
                select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()}
            oldest = conn.execute(select(func.min(jobs.c.created_at)).where(jobs.c.state == JobState.QUEUED)).scalar()
            notes = conn.execute(select(notifications.c.channel, notifications.c.state, func.count())
                                 .group_by(notifications.c.channel, notifications.c.state)).all()
        return {"jobs": {str(state): int(depth.get(str(state), 0)) for state in JobState},
                "oldest_queued_age_seconds": (naive_utc(now) - naive_utc(oldest)).total_seconds() if oldest else None,
                "notifications": {(channel, state): int(count) for channel, state, count in notes}}

    # ------------------------------------------------------------------ heartbeats and audit
    def beat(self, component: str, host: str, pid: int, now: dt.datetime, detail: dict | None = None,
             node: str | None = None) -> None:
        """Record that ``component`` of node ``node`` (default: the host name) is alive (``status`` reads it)."""
        node = node or host
        values = {"host": host, "pid": pid, "at": now, "detail": json.dumps(detail or {})}
        with self.engine.begin() as conn:
            if conn.execute(update(heartbeats).where(heartbeats.c.node == node, heartbeats.c.component == component)
                            .values(**values)).rowcount == 0:
                conn.execute(insert(heartbeats).values(node=node, component=component, **values))

    def node_heartbeats(self) -> list[dict]:
        """Every node's components and their last heartbeat, by node and component."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(heartbeats).order_by(heartbeats.c.node, heartbeats.c.component)).all()
        return [dict(r._mapping) | {"detail": json.loads(r.detail or "{}")} for r in rows]

    def heartbeats(self, node: str | None = None) -> dict[str, dict]:
        """The newest heartbeat of each component: of one node, or of whichever node beat last."""
        newest: dict[str, dict] = {}
        for row in self.node_heartbeats():
            if node is not None and row["node"] != node:
                continue
            if row["component"] not in newest or naive_utc(row["at"]) > naive_utc(newest[row["component"]]["at"]):
                newest[row["component"]] = row
        return newest

    def setting_once(self, key: str, value: str) -> str:
        """The store's setting ``key``: set to ``value`` if it has none (the first node wins a race)."""
        try:
            with self.engine.begin() as conn:
                known = conn.execute(select(settings.c.value).where(settings.c.key == key)).scalar()
                if known is not None:
                    return str(known)
                conn.execute(insert(settings).values(key=key, value=value))
            return value
        except SQLAlchemyError:  # another node inserted it between our read and our insert
            with self.engine.begin() as conn:
                known = conn.execute(select(settings.c.value).where(settings.c.key == key)).scalar()
            if known is None:
                raise StoreError(f"cannot record the store setting {key}") from None
            return str(known)

    def record_event(self, study_instance_uid: str | None, kind: str, detail: str,
                     now: dt.datetime | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(events).values(at=now or utcnow(), study_instance_uid=study_instance_uid,
                                               kind=kind, detail=detail))
