"""Housekeeping against a real store and real files: what goes after retention, what goes first under
disk pressure, and what is never touched (queued, receiving, undelivered)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
from pathlib import Path

import pytest

from node.config import RetentionSettings
from node.housekeeping import Housekeeper, remove_study
from node.store import JobState, Received, Store

NOW = dt.datetime(2026, 12, 4, 9, 0, tzinfo=dt.UTC)
MIB = 2**20


def _study(store: Store, root: Path, uid: str, days_ago: float, final: JobState | None, size: int = MIB) -> Path:
    """A received study with one job that ended in ``final`` (None: still queued) ``days_ago`` days ago."""
    at = NOW - dt.timedelta(days=days_ago)
    folder = root / "spool" / uid / f"{uid}.9"
    folder.mkdir(parents=True)
    for k in range(2):
        path = folder / f"{uid}.{k}.dcm"
        path.write_bytes(b"\0" * size)
        store.record_instance(Received(f"{uid}.{k}", uid, f"{uid}.9", "1.2.840.10008.5.1.4.1.1.2",
                                       "1.2.840.10008.1.2.1", path, size, "CT1"), at)
    store.complete_quiet_studies(at + dt.timedelta(seconds=30), 20, 900)
    if final is not None:
        job = store.claim_job("w", 60, at + dt.timedelta(seconds=31))
        assert job is not None
        outbox = root / "outbox" / uid / str(job["id"])
        outbox.mkdir(parents=True)
        (outbox / "sr.dcm").write_bytes(b"\0" * 100)
        store.set_outputs(job["id"], "w", str(outbox), "{}", at + dt.timedelta(seconds=40))
        store.finish_job(job["id"], "w", final, f"{final}", at + dt.timedelta(seconds=50))
    return root / "spool" / uid


def _quota(root: Path, quota: int):
    """Free space of a file system holding ``quota`` bytes: what the spool and outbox leave of it. Files
    that another node's housekeeper removes while this one counts are simply not counted."""
    def free(_path: Path) -> int:
        used = 0
        for folder, _, files in os.walk(root):  # os.walk skips folders that vanish under it
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    used += os.stat(os.path.join(folder, name)).st_size
        return quota - used
    return free


@pytest.fixture
def node(tmp_path) -> tuple[Store, Path]:
    root = tmp_path / "var"
    root.mkdir()
    return Store(f"sqlite:///{tmp_path / 'db.sqlite'}"), root


def test_delivered_studies_go_after_retention_and_nothing_queued_receiving_or_undelivered_is_touched(node):
    store, root = node
    old = _study(store, root, "1.2.1", 20, JobState.DONE)
    skipped = _study(store, root, "1.2.2", 20, JobState.SKIPPED)
    young = _study(store, root, "1.2.3", 2, JobState.DONE)
    failed = _study(store, root, "1.2.4", 30, JobState.FAILED)  # results never delivered: kept
    queued = _study(store, root, "1.2.5", 30, None)
    store.record_instance(Received("1.2.6.0", "1.2.6", "1.2.6.9", "1.2", "1.2", root / "x", 1, "CT1"),
                          NOW - dt.timedelta(days=40))  # receiving still
    keeper = Housekeeper(store, root, RetentionSettings(days=14, headroom_mb=0), 0, clock=lambda: NOW,
                         free_bytes=_quota(root, 10**12))
    result = keeper.run_once()
    assert sorted(r.study_instance_uid for r in result.retention) == ["1.2.1", "1.2.2"] and not result.pressure
    assert not old.exists() and not skipped.exists() and not (root / "outbox" / "1.2.1").exists()
    assert store.study("1.2.1") is None and store.jobs_of("1.2.1") == []
    assert [e["kind"] for e in store.events_of("1.2.1")][-1] == "retention"  # the audit trail stays
    assert young.exists() and failed.exists() and queued.exists() and store.study("1.2.6") is not None
    assert (root / "outbox" / "1.2.4").exists() and store.jobs_of("1.2.4")[0]["state"] == JobState.FAILED
    assert keeper.run_once().summary()["removed_for_retention"] == 0  # nothing twice


def test_under_disk_pressure_the_oldest_delivered_studies_go_first_until_the_headroom_is_back(node):
    store, root = node
    studies = {uid: _study(store, root, uid, days, JobState.DONE) for uid, days in
               (("1.3.1", 5), ("1.3.2", 4), ("1.3.3", 3), ("1.3.4", 2))}
    _study(store, root, "1.3.9", 9, JobState.FAILED)  # oldest of all, but undelivered
    # 10 MiB of space, 2 MiB per study: 0 MiB free; the node keeps 1 MiB floor + 2 MiB headroom
    keeper = Housekeeper(store, root, RetentionSettings(days=None, headroom_mb=2), 1, clock=lambda: NOW,
                         free_bytes=_quota(root, 10 * MIB + 500))
    result = keeper.run_once()
    assert [r.study_instance_uid for r in result.pressure] == ["1.3.1", "1.3.2"]  # oldest first, only as needed
    assert not studies["1.3.1"].exists() and studies["1.3.3"].exists() and (root / "spool" / "1.3.9").exists()
    assert result.free_mib_after >= 3
    assert [e["kind"] for e in store.events_of("1.3.2")][-1] == "disk-pressure"


def test_a_study_reopened_by_a_late_instance_is_not_removed(node):
    store, root = node
    spool = _study(store, root, "1.4.1", 20, JobState.DONE)
    late = spool / "1.4.1.9" / "1.4.1.late.dcm"
    late.write_bytes(b"\0")
    store.record_instance(Received("1.4.1.late", "1.4.1", "1.4.1.9", "1.2", "1.2", late, 1, "CT1"), NOW)
    assert remove_study(store, root, "1.4.1", NOW, "retention", "test") is None
    assert late.exists() and store.study("1.4.1")["instances"] == 3


def test_housekeepers_of_several_nodes_remove_each_study_once(postgres, tmp_path):
    store = Store(postgres.database("housekeeping"))
    root = tmp_path / "shared"
    root.mkdir()
    for i in range(8):
        _study(store, root, f"1.5.{i}", 20 + i, JobState.DONE, size=1000)
    keepers = [Housekeeper(Store(store.url), root, RetentionSettings(days=14), 0, clock=lambda: NOW,
                           free_bytes=_quota(root, 10**12)) for _ in range(3)]
    results: list = []
    threads = [threading.Thread(target=lambda k=k: results.append(k.run_once())) for k in keepers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    removed = [r.study_instance_uid for res in results for r in res.retention]
    assert sorted(removed) == sorted(f"1.5.{i}" for i in range(8))  # each once, by one node or another
    assert all([e["kind"] for e in store.events_of(f"1.5.{i}")].count("retention") == 1 for i in range(8))
    assert not any((root / "spool").iterdir())
