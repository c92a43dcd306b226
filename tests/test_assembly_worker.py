"""Study completion with a supplied clock, job leases, and the worker on real phantom files."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pydicom
import pytest

from conftest import SMALL
from node.assembly import Assembler
from node.config import StudySettings
from node.inference import Engine
from node.phantom import PhantomOptions, generate_study, write_study
from node.store import JobState, Received, Store, StudyState

T0 = dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC)
ROOT = Path(__file__).resolve().parents[1]
SETTINGS = StudySettings(quiet_seconds=20, max_wait_seconds=300)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def _item(study: str, sop: str, path: Path | None = None) -> Received:
    return Received(sop, study, study + ".1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                    path or Path("/nowhere"), 10, "MODALITY")


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'db.sqlite'}")


def test_a_study_completes_only_after_the_quiet_period_and_is_queued_once(store):
    clock = Clock()
    assembler = Assembler(store, SETTINGS, clock)
    store.record_instance(_item("1.2.3", "1.2.3.1"), clock())
    clock.advance(19)
    assert assembler.sweep() == []
    clock.advance(2)
    assert assembler.sweep() == ["1.2.3"] and assembler.sweep() == []
    assert store.study("1.2.3")["state"] == StudyState.COMPLETE
    assert [j["state"] for j in store.jobs_of("1.2.3")] == [JobState.QUEUED]


def test_late_instances_reopen_a_complete_study_and_it_is_analysed_again_once(store):
    clock = Clock()
    assembler = Assembler(store, SETTINGS, clock)
    store.record_instance(_item("1.2.3", "1.2.3.1"), clock())
    clock.advance(30)
    assembler.sweep()
    job = store.claim_job("w", 60, clock())
    store.finish_job(job["id"], "w", JobState.DONE, "ok", clock())
    for k in range(2, 6):  # four late instances
        clock.advance(5)
        store.record_instance(_item("1.2.3", f"1.2.3.{k}"), clock())
        assert assembler.sweep() == []
    assert store.study("1.2.3")["state"] == StudyState.RECEIVING
    clock.advance(21)
    assert assembler.sweep() == ["1.2.3"]
    assert [j["state"] for j in store.jobs_of("1.2.3")] == [JobState.DONE, JobState.QUEUED]
    assert [e["kind"] for e in store.events_of("1.2.3")].count("study-reopened") == 1


def test_a_study_that_never_goes_quiet_completes_at_max_wait(store):
    clock = Clock()
    assembler = Assembler(store, SETTINGS, clock)
    for k in range(1, 40):
        store.record_instance(_item("1.2.4", f"1.2.4.{k}"), clock())
        if assembler.sweep():
            break
        clock.advance(10)
    assert clock.now - T0 == dt.timedelta(seconds=300)
    assert store.events_of("1.2.4")[-2]["detail"] == "max-wait"


def test_a_study_that_keeps_receiving_is_analysed_once_per_max_wait_and_once_more_when_quiet(store):
    clock = Clock()
    assembler = Assembler(store, StudySettings(quiet_seconds=5, max_wait_seconds=20), clock)
    analysed_at = []  # each job is analysed at once, as an idle worker would
    for second in range(90):
        if second < 60:  # one slice a second for a minute
            store.record_instance(_item("1.2.6", f"1.2.6.{second}"), clock())
        assembler.sweep()
        job = store.claim_job("w", 60, clock())
        if job is not None:
            analysed_at.append(second)
            store.finish_job(job["id"], "w", JobState.DONE, "ok", clock())
        clock.advance(1)
    assert analysed_at == [20, 41, 62]  # at max-wait, max-wait again, then the whole study
    triggers = [j["trigger"] for j in store.jobs_of("1.2.6")]
    assert triggers[0].startswith("max-wait: still receiving after 20 s, 21 instances")
    assert triggers[-1] == "quiet: no new instance for 5 s, 60 instances" or triggers[-1].startswith("max-wait")
    assert store.study("1.2.6")["instances"] == 60


def test_a_store_made_before_the_max_wait_window_is_upgraded_in_place(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the studies and jobs tables as the previous version made them
        db.execute("CREATE TABLE studies (study_instance_uid VARCHAR(64) PRIMARY KEY, state VARCHAR(16) NOT NULL, "
                   "reason TEXT, instances INTEGER NOT NULL, first_received_at DATETIME NOT NULL, "
                   "last_received_at DATETIME NOT NULL, completed_at DATETIME, urgent BOOLEAN NOT NULL)")
        db.execute("INSERT INTO studies VALUES ('1.2.7', 'receiving', NULL, 3, '2026-11-26 12:00:00.000000', "
                   "'2026-11-26 12:00:30.000000', NULL, 0)")
        db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, study_instance_uid VARCHAR(64) NOT NULL, "
                   "state VARCHAR(16) NOT NULL, priority INTEGER NOT NULL, reason TEXT, attempts INTEGER NOT NULL, "
                   "lease_owner VARCHAR(64), lease_expires_at DATETIME, created_at DATETIME NOT NULL, "
                   "updated_at DATETIME NOT NULL, result TEXT, outbox TEXT, delivered TEXT NOT NULL, "
                   "send_attempts INTEGER NOT NULL, next_attempt_at DATETIME)")
    store = Store(f"sqlite:///{path}")
    clock = Clock()
    clock.advance(300)  # the old row has no window of its own: max-wait counts from its first instance
    assert Assembler(store, StudySettings(quiet_seconds=280, max_wait_seconds=300), clock).sweep() == ["1.2.7"]
    assert store.study("1.2.7")["instances"] == 3
    assert store.jobs_of("1.2.7")[0]["trigger"].startswith("max-wait")


def test_a_half_received_study_survives_a_restart(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    first = Store(url)
    first.record_instance(_item("1.2.5", "1.2.5.1"), T0)
    first.engine.dispose()
    clock = Clock()
    clock.advance(60)
    again = Store(url)
    assert Assembler(again, SETTINGS, clock).sweep() == ["1.2.5"]


def test_a_job_is_leased_to_one_worker_and_taken_up_again_when_its_lease_runs_out(store):
    clock = Clock()
    store.record_instance(_item("1.2.6", "1.2.6.1"), clock())
    clock.advance(30)
    Assembler(store, SETTINGS, clock).sweep()
    job = store.claim_job("a", 60, clock())
    assert job is not None and store.claim_job("b", 60, clock()) is None
    clock.advance(61)  # worker a died: no heartbeat
    again = store.claim_job("b", 60, clock())
    assert again["id"] == job["id"] and again["attempts"] == 2
    assert not store.finish_job(job["id"], "a", JobState.DONE, "late", clock())  # a lost its lease
    assert store.finish_job(job["id"], "b", JobState.DONE, "ok", clock())
    assert store.jobs_of("1.2.6")[0]["reason"] == "ok"


def _spool(store: Store, paths: list[Path]) -> str:
    uid = ""
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        uid = ds.StudyInstanceUID
        store.record_instance(Received(ds.SOPInstanceUID, uid, ds.SeriesInstanceUID, ds.SOPClassUID,
                                       "1.2.840.10008.1.2.1", p, p.stat().st_size, "MODALITY"), T0)
    return uid


def test_the_worker_analyses_a_complete_study_skips_one_without_ctpa_and_fails_one_with_lost_files(store, tmp_path):
    engine = Engine(ROOT / "models" / "demo", device="cpu")
    opts = PhantomOptions(**{**SMALL.__dict__, "companions": ("localizer",)})
    written = write_study(generate_study(71, pe=True, options=opts), tmp_path / "a")
    good = _spool(store, written["ctpa"] + written["localizer"])
    only_scout = _spool(store, write_study(generate_study(72, pe=False, options=opts), tmp_path / "b")["localizer"])
    lost_files = write_study(generate_study(73, pe=False, options=SMALL), tmp_path / "c")["ctpa"]
    lost = _spool(store, lost_files)
    for p in lost_files:
        p.unlink()
    clock = Clock()
    clock.advance(30)
    Assembler(store, SETTINGS, clock).sweep()
    from node.worker import Worker

    worker = Worker(store, engine, owner="test", clock=clock)
    outcomes = {}
    while (done := worker.run_once()) is not None:
        outcomes[done["study_instance_uid"]] = done
    assert outcomes[good]["state"] == JobState.DONE
    summary = json.loads(store.jobs_of(good)[0]["result"])
    assert summary["series"]["description"].startswith("CTPA") and 0 <= summary["probability"] <= 1
    assert outcomes[only_scout]["state"] == JobState.SKIPPED
    assert "no series qualifies" in outcomes[only_scout]["reason"] and "localizer" in outcomes[only_scout]["reason"]
    assert outcomes[lost]["state"] == JobState.FAILED
    assert outcomes[lost]["reason"].startswith(f"{SMALL.slices} of {SMALL.slices} spooled files are missing")
    assert worker.run_once() is None


def test_results_wait_in_the_outbox_and_are_sent_with_backoff_once_the_pacs_answers(store, tmp_path):
    from conftest import free_port
    from node.config import load_config
    from node.scp import start_scp
    from node.worker import Worker, backoff_seconds

    assert [backoff_seconds(n) for n in (1, 2, 3, 11, 12)] == [5, 10, 20, 3600, 3600]
    port = free_port()
    pacs_cfg = load_config(None, environ={}, overrides=[f"storage.root={tmp_path / 'pacs'}", "node.host=127.0.0.1",
                                                        f"node.port={port}", "node.ae_title=PACS"])
    dest = load_config(None, environ={}, overrides=[
        f"destinations=[{{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {port}}}]"]).destinations
    written = write_study(generate_study(74, pe=True, options=SMALL), tmp_path / "a")["ctpa"]
    uid = _spool(store, written)
    clock = Clock()
    clock.advance(30)
    Assembler(store, SETTINGS, clock).sweep()
    worker = Worker(store, Engine(ROOT / "models" / "demo", device="cpu"), owner="w", clock=clock,
                    outbox_root=tmp_path / "outbox", destinations=dest)
    first = worker.run_once()  # nobody listens on the PACS port yet
    assert first["state"] == JobState.SENDING and "association failed" in first["reason"]
    assert worker.run_once() is None  # not due for 5 s
    (tmp_path / "pacs").mkdir()
    pacs_store = Store(f"sqlite:///{tmp_path / 'pacs' / 'db.sqlite'}")
    server = start_scp(pacs_cfg, pacs_store)
    try:
        clock.advance(6)
        done = worker.run_once()
    finally:
        server.shutdown()
    assert done["state"] == JobState.DONE and done["reason"].endswith("sent to pacs")
    assert pacs_store.study(uid)["instances"] == 7  # SEG, SR, 3 key images + summary, KOS: same study
    assert len(list((tmp_path / "outbox").rglob("*.dcm"))) == 7
