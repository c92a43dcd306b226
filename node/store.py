"""The node's store: SQLAlchemy Core tables for instances, studies and an append-only event log.

SQLite (WAL) by default, under ``<storage.root>/petriage.db``; no SQLite-only SQL, so the same code
runs on PostgreSQL. Every change that belongs together happens in one transaction. Jobs, leases and
the worklist come with the worker (issue 5, later steps).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from node.errors import NodeError


class StoreError(NodeError):
    """The database could not be read or written; the message says what was being done."""


class StudyState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


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


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a committed instance row survives a power cut
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def database_url(storage_root: Path) -> str:
    return f"sqlite:///{Path(storage_root) / 'petriage.db'}"


class Store:
    """Access to the node's tables; one per process, thread-safe through SQLAlchemy's pool."""

    def __init__(self, url: str):
        self.url = url
        try:
            self.engine: Engine = create_engine(url, future=True)
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the store at {url}: {exc}") from exc

    def record_instance(self, item: Received, now: dt.datetime | None = None) -> bool:
        """Record a stored instance; returns False for a duplicate (already recorded, nothing counted twice).

        A study that was already complete is reopened, so it is analysed again once it is quiet.
        """
        now = now or utcnow()
        try:
            with self.engine.begin() as conn:
                known = conn.execute(select(instances.c.sop_instance_uid).where(
                    instances.c.sop_instance_uid == item.sop_instance_uid)).first()
                if known:
                    conn.execute(update(instances).where(instances.c.sop_instance_uid == item.sop_instance_uid)
                                 .values(path=str(item.path), bytes=item.bytes, received_at=now))
                    conn.execute(insert(events).values(at=now, study_instance_uid=item.study_instance_uid,
                                                       kind="duplicate", detail=item.sop_instance_uid))
                    return False
                conn.execute(insert(instances).values(
                    sop_instance_uid=item.sop_instance_uid, study_instance_uid=item.study_instance_uid,
                    series_instance_uid=item.series_instance_uid, sop_class_uid=item.sop_class_uid,
                    transfer_syntax_uid=item.transfer_syntax_uid, path=str(item.path), bytes=item.bytes,
                    calling_ae_title=item.calling_ae_title, received_at=now))
                study = conn.execute(select(studies.c.state).where(
                    studies.c.study_instance_uid == item.study_instance_uid)).first()
                if study is None:
                    conn.execute(insert(studies).values(
                        study_instance_uid=item.study_instance_uid, state=StudyState.RECEIVING, instances=1,
                        first_received_at=now, last_received_at=now))
                    conn.execute(insert(events).values(at=now, study_instance_uid=item.study_instance_uid,
                                                       kind="study-started", detail=item.calling_ae_title))
                else:
                    values: dict = {"instances": studies.c.instances + 1, "last_received_at": now}
                    if study.state != StudyState.RECEIVING:
                        values |= {"state": StudyState.RECEIVING, "completed_at": None}
                        conn.execute(insert(events).values(at=now, study_instance_uid=item.study_instance_uid,
                                                           kind="study-reopened", detail=item.sop_instance_uid))
                    conn.execute(update(studies).where(studies.c.study_instance_uid == item.study_instance_uid)
                                 .values(**values))
                return True
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot record instance of study ...{item.study_instance_uid[-8:]}: {exc}") from exc

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
