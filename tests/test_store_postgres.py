"""The store on a real PostgreSQL cluster (started by the test session) and its schema migrations."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text

from node.store import JobState, Received, Store, StoreError, head_revision, jobs, metadata, migrate

T0 = dt.datetime(2026, 12, 4, 8, 0, tzinfo=dt.UTC)


def _item(study: str, sop: str) -> Received:
    return Received(sop, study, study + ".1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                    Path(f"/spool/{sop}.dcm"), 1000, "SCANNER")


def _queue(store: Store, n: int) -> None:
    for i in range(n):
        store.record_instance(_item(f"1.2.{i}", f"1.2.{i}.1.1"), T0)
    store.complete_quiet_studies(T0 + dt.timedelta(seconds=60), quiet_seconds=20, max_wait_seconds=900)


def test_a_new_postgresql_store_is_made_by_the_migrations_and_matches_the_tables_the_code_uses(postgres):
    store = Store(postgres.database("fresh"))
    assert store.revision == head_revision()
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    again = Store(store.url)  # a second node starting on the same store changes nothing
    assert again.revision == head_revision()


def test_two_workers_on_postgresql_never_claim_the_same_job(postgres):
    url = postgres.database("claims")
    _queue(Store(url), 40)
    claimed: dict[str, list[int]] = {"a": [], "b": [], "c": []}

    def work(owner: str) -> None:
        store = Store(url)  # a process of its own in production: here its own engine and pool
        while (job := store.claim_job(owner, 60, T0 + dt.timedelta(seconds=61))) is not None:
            claimed[owner].append(job["id"])

    threads = [threading.Thread(target=work, args=(o,)) for o in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = sum(claimed.values(), [])
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 40
    with Store(url).engine.connect() as conn:
        states = conn.execute(select(jobs.c.state, jobs.c.attempts)).all()
    assert {(s, a) for s, a in states} == {(JobState.RUNNING, 1)}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_instance_sent_twice_is_recorded_and_counted_once_with_a_duplicate_event(backend, postgres, tmp_path):
    url = postgres.database("twice") if backend == "postgresql" else f"sqlite:///{tmp_path / 'twice.db'}"
    store = Store(url)
    assert store.record_instance(_item("1.2.7", "1.2.7.1.1"), T0) is True
    assert store.record_instances([_item("1.2.7", "1.2.7.1.2"), _item("1.2.7", "1.2.7.1.1")], T0) == [True, False]
    study = store.study("1.2.7")
    assert study is not None and study["instances"] == 2
    kinds = [e["kind"] for e in store.events_of("1.2.7")]
    assert kinds.count("duplicate") == 1 and kinds.count("study-started") == 1


def test_a_sqlite_store_made_before_migrations_keeps_its_rows_and_gains_what_it_lacked(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the studies and jobs tables of an early version, nothing else
        db.execute("CREATE TABLE studies (study_instance_uid VARCHAR(64) PRIMARY KEY, state VARCHAR(16) NOT NULL, "
                   "reason TEXT, instances INTEGER NOT NULL, first_received_at DATETIME NOT NULL, "
                   "last_received_at DATETIME NOT NULL, completed_at DATETIME, urgent BOOLEAN NOT NULL)")
        db.execute("INSERT INTO studies VALUES ('1.2.9', 'complete', NULL, 7, '2026-11-26 12:00:00.000000', "
                   "'2026-11-26 12:00:30.000000', '2026-11-26 12:01:00.000000', 0)")
    store = Store(f"sqlite:///{path}")
    assert store.revision == head_revision()
    assert store.study("1.2.9")["instances"] == 7 and store.study("1.2.9")["wait_started_at"] is None
    have = inspect(store.engine)
    for table in metadata.sorted_tables:  # every table and column the code uses is there now
        assert {c.name for c in table.columns} <= {c["name"] for c in have.get_columns(table.name)}
    store.record_instance(_item("1.2.9", "1.2.9.1.8"), T0)  # and it takes new instances
    assert store.study("1.2.9")["instances"] == 8 and store.study("1.2.9")["state"] == "receiving"


def test_a_store_that_cannot_be_reached_is_named_without_its_password(postgres):
    url = f"postgresql+psycopg://petriage:s3cret@127.0.0.1:{postgres.port}/no_such_database"
    with pytest.raises(StoreError) as exc:
        Store(url)
    assert "no_such_database" in str(exc.value) and "s3cret" not in str(exc.value) and "***" in str(exc.value)


def test_a_postgresql_restart_between_two_instances_loses_nothing_and_the_store_carries_on(postgres):
    store = Store(postgres.database("restart"))
    assert store.record_instance(_item("1.2.50", "1.2.50.1.1"), T0)
    postgres.restart()  # every pooled connection is closed under the store
    assert store.record_instance(_item("1.2.50", "1.2.50.1.2"), T0 + dt.timedelta(seconds=1))
    assert store.study("1.2.50")["instances"] == 2
    assert [e["kind"] for e in store.events_of("1.2.50")] == ["study-started"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_store_of_the_previous_schema_is_upgraded_at_start_and_keeps_its_heartbeats(backend, postgres, tmp_path):
    url = postgres.database("previous") if backend == "postgresql" else f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = create_engine(url)
    assert migrate(engine, to="0001") == "0001"  # the store as the previous version of the node left it
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO heartbeats (component, host, pid, at, detail) "
                          "VALUES ('worker', 'ct-node-1', 4242, '2026-12-04 07:00:00', '{}')"))
    engine.dispose()
    store = Store(url)
    assert store.revision == head_revision() != "0001"
    assert [(b["node"], b["component"], b["pid"]) for b in store.node_heartbeats()] == [("ct-node-1", "worker", 4242)]
    store.beat("worker", "ct-node-2", 7, T0, node="ct-node-2")  # a second node beats beside the first
    assert [b["node"] for b in store.node_heartbeats()] == ["ct-node-1", "ct-node-2"]
    assert store.heartbeats()["worker"]["node"] == "ct-node-2"  # the newest beat of each component
