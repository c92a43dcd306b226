"""The admin CLI against a real store (SQLite under tmp_path): what a PACS administrator does at 3 a.m."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import yaml

from node.cli import main
from node.store import JobState, Received, Store, database_url, utcnow


@pytest.fixture
def node_store(tmp_path) -> tuple[Path, Store, Path]:
    """(config file, store, storage root)."""
    root = tmp_path / "var"
    root.mkdir()
    config = tmp_path / "petriage.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(root)}, "metrics": {"port": 0}}))
    return config, Store(database_url(root)), root


def _study(store: Store, root: Path, uid: str, n: int = 3, at: dt.datetime | None = None) -> list[Path]:
    at = at or utcnow()
    paths = []
    for k in range(n):
        path = root / "spool" / uid / "1.9" / f"{uid}.{k}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 100)
        store.record_instance(Received(f"{uid}.{k}", uid, "1.9", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                       path, 100, "MODALITY"), at)
        paths.append(path)
    return paths


def _job(store: Store, uid: str, state: JobState, reason: str, at: dt.datetime, result: dict | None = None,
         priority: int | None = None) -> int:
    store.complete_quiet_studies(at + dt.timedelta(seconds=60), 1, 900)
    job = store.claim_job("test-worker", 60, at + dt.timedelta(seconds=61))
    assert job and job["study_instance_uid"] == uid
    store.finish_job(job["id"], "test-worker", state, reason, at + dt.timedelta(seconds=62),
                     json.dumps(result) if result else None, priority)
    return job["id"]


def _run(capsys, config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(config), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _result(p: float) -> dict:
    return {"probability": p, "decision": "PE suspected" if p > 0.5 else "PE not suspected", "positive": p > 0.5,
            "threshold": 0.5, "series": {"description": "CTPA", "reason": "64 axial CT slices"}}


def test_an_admin_finds_why_a_study_failed_retries_it_and_sees_it_queued_again(node_store, capsys):
    config, store, root = node_store
    now = utcnow()
    _study(store, root, "1.2.3.100", at=now)
    failed = _job(store, "1.2.3.100", JobState.FAILED, "2 of 3 spooled files are missing (e.g. 1.dcm)", now)

    code, out, _ = _run(capsys, config, "queue", "list", "--state", "failed", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["id"] for r in rows] == [failed] and "spooled files are missing" in rows[0]["reason"]

    code, out, _ = _run(capsys, config, "queue", "show", str(failed))
    assert code == 0 and "spooled files are missing" in out and "job-failed" in out
    assert "analysed because quiet: no new instance for 1 s, 3 instances" in out

    code, out, _ = _run(capsys, config, "queue", "retry", str(failed))
    assert code == 0 and "queued" in out
    assert store.jobs_of("1.2.3.100")[-1]["state"] == JobState.QUEUED

    code, _, err = _run(capsys, config, "queue", "retry", str(failed))  # already queued: refused, says why
    assert code == 1 and "is queued" in err

    events = [e["kind"] for e in store.events_of("1.2.3.100")]
    assert "admin-retry" in events


def test_cancel_priority_and_requeue_change_only_jobs_in_states_that_allow_it(node_store, capsys):
    config, store, root = node_store
    now = utcnow()
    _study(store, root, "1.2.3.200", at=now)
    store.complete_quiet_studies(now + dt.timedelta(seconds=60), 1, 900)
    queued = store.jobs_of("1.2.3.200")[0]["id"]

    assert _run(capsys, config, "queue", "priority", str(queued), "900")[0] == 0
    assert store.jobs_of("1.2.3.200")[0]["priority"] == 900
    assert _run(capsys, config, "queue", "cancel", str(queued))[0] == 0
    assert store.jobs_of("1.2.3.200")[0]["state"] == JobState.CANCELLED
    code, _, err = _run(capsys, config, "queue", "cancel", str(queued))
    assert code == 1 and "cancelled" in err

    for uid in ("1.2.3.301", "1.2.3.302"):
        _study(store, root, uid, at=now)
        _job(store, uid, JobState.FAILED, "association rejected", now)
    code, out, _ = _run(capsys, config, "queue", "requeue", "--failed")
    assert code == 0 and "re-queued: 2" in out
    assert all(store.jobs_of(u)[-1]["state"] == JobState.QUEUED for u in ("1.2.3.301", "1.2.3.302"))

    assert _run(capsys, config, "queue", "show", "999")[0] == 1  # no such job: exit 1 with a message
    _study(store, root, "1.2.3.400", at=now)  # still being received: no job yet, but it can be looked at
    code, out, _ = _run(capsys, config, "queue", "show", "1.2.3.400")
    assert code == 0 and "receiving" in out and "no job yet" in out and "study-started" in out
    assert _run(capsys, config, "queue", "list", "--state", "exploded")[0] == 2  # bad usage: exit 2


def test_the_worklist_lists_pe_positive_first_by_probability_then_pending_then_negative(node_store, capsys):
    config, store, root = node_store
    now = utcnow()
    for uid, p, priority in (("1.2.4.1", 0.02, 2), ("1.2.4.2", 0.91, 1091), ("1.2.4.3", 0.97, 1097)):
        _study(store, root, uid, at=now)
        _job(store, uid, JobState.DONE, "analysed", now, _result(p), priority)
    _study(store, root, "1.2.4.4", at=now)
    store.complete_quiet_studies(now + dt.timedelta(seconds=60), 1, 900, priority_of=lambda urgent: 500)

    code, out, _ = _run(capsys, config, "worklist", "--json")
    order = [r["study_instance_uid"] for r in json.loads(out)]
    assert code == 0 and order == ["1.2.4.3", "1.2.4.2", "1.2.4.4", "1.2.4.1"]
    code, out, _ = _run(capsys, config, "worklist")
    assert code == 0 and out.index("PE suspected") < out.index("pending") < out.index("PE not suspected")


def test_purge_deletes_old_finished_studies_with_their_files_and_keeps_the_audit_trail(node_store, capsys):
    config, store, root = node_store
    old = utcnow() - dt.timedelta(days=40)
    old_files = _study(store, root, "1.2.5.1", at=old)
    _job(store, "1.2.5.1", JobState.DONE, "analysed", old, _result(0.1))
    new_files = _study(store, root, "1.2.5.2")
    _job(store, "1.2.5.2", JobState.DONE, "analysed", utcnow(), _result(0.1))

    code, out, _ = _run(capsys, config, "queue", "purge", "--older-than", "30d", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["studies"] == ["1.2.5.1"] and all(p.exists() for p in old_files)
    code, out, _ = _run(capsys, config, "queue", "purge", "--older-than", "30d")
    assert code == 0 and "deleted 1 study" in out
    assert not any(p.exists() for p in old_files) and all(p.exists() for p in new_files)
    assert store.study("1.2.5.1") is None and store.jobs_of("1.2.5.1") == []
    assert "admin-purge" in [e["kind"] for e in store.events_of("1.2.5.1")]
    assert _run(capsys, config, "queue", "purge", "--older-than", "soon")[0] == 2


def test_admin_commands_on_a_missing_store_say_so_with_exit_code_1(tmp_path, capsys):
    config = tmp_path / "petriage.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "nowhere")}}))
    code, _, err = _run(capsys, config, "queue", "list")
    assert code == 1 and "no node store" in err


def test_results_waiting_to_resend_can_be_sent_now_when_the_pacs_is_back(node_store, capsys):
    config, store, root = node_store
    now = utcnow()
    _study(store, root, "1.2.6.1", at=now)
    store.complete_quiet_studies(now + dt.timedelta(seconds=60), 1, 900)
    job = store.claim_job("w", 60, now + dt.timedelta(seconds=61))
    assert job is not None
    later = utcnow() + dt.timedelta(hours=1)
    store.retry_later(job["id"], "w", later, "send attempt 9 failed", now + dt.timedelta(seconds=62))
    assert store.claim_job("w2", 60, utcnow()) is None  # not due for an hour

    code, out, _ = _run(capsys, config, "queue", "requeue", "--sending")
    assert code == 0 and f"sending now: 1 job(s) ({job['id']})" in out
    assert store.claim_job("w2", 60, utcnow() + dt.timedelta(seconds=1))["id"] == job["id"]  # due now
    assert _run(capsys, config, "queue", "requeue")[0] == 2  # which jobs? says so, exit 2


def test_echo_and_send_reach_a_destination_and_say_so_when_they_cannot(tmp_path, capsys):
    from conftest import free_port
    from loopback import RecordingPacs
    from node.phantom import PhantomOptions, generate_study, write_study

    pacs = RecordingPacs().start(free_port())
    dead = free_port()
    config = tmp_path / "petriage.yaml"
    config.write_text(yaml.safe_dump({"destinations": [
        {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port},
        {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": dead}]}))
    files = write_study(generate_study(5, pe=False, options=PhantomOptions(matrix=64, slices=4)), tmp_path / "in")
    try:
        code, out, _ = _run(capsys, config, "echo", "pacs")
        assert code == 0 and "C-ECHO success" in out
        code, _, err = _run(capsys, config, "echo", "down")
        assert code == 1 and "association failed" in err
        code, _, err = _run(capsys, config, "echo", "nowhere")
        assert code == 1 and "no destination 'nowhere'" in err
        adhoc = f"{pacs.ae_title}@127.0.0.1:{pacs.port}"  # a peer not in the config
        code, out, _ = _run(capsys, config, "send", str(tmp_path / "in"), "--to", adhoc)
        n = sum(len(v) for v in files.values())
        assert code == 0 and f"{n} of {n} instance(s) stored" in out
        (tmp_path / "notes.txt").write_text("not DICOM")
        code, _, err = _run(capsys, config, "send", str(tmp_path / "notes.txt"), "--to", "pacs")
        assert code == 1 and "not a readable DICOM file" in err
    finally:
        pacs.stop()
    assert len({s.sop_instance_uid for s in pacs.received}) == n


def test_status_lists_every_node_sharing_the_store_and_judges_this_one_by_its_own_heartbeats(tmp_path, capsys):
    root = tmp_path / "var"
    root.mkdir()
    config = tmp_path / "petriage.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(root)}, "metrics": {"port": 0},
                                      "node": {"name": "gpu-1", "port": 1}}))  # nothing listens on port 1
    store = Store(database_url(root))
    now = utcnow()
    store.beat("listener", "rx-host", 11, now, node="rx-1")
    store.beat("worker", "gpu-host", 12, now, {"name": "petriage-pe-demo", "owner": "gpu-host:12"}, node="gpu-1")
    store.beat("worker", "gpu-host-2", 13, now - dt.timedelta(minutes=10), node="gpu-2")  # silent for 10 min
    code, out, _ = _run(capsys, config, "status", "--json")
    report = json.loads(out)
    assert report["node"] == "gpu-1" and report["worker"]["ok"] and report["worker"]["owner"] == "gpu-host:12"
    assert not report["listener"]["ok"] and code == 1  # this node's own listener never beat: judged on its own
    assert [(n["node"], n["component"], n["ok"]) for n in report["nodes"]] == [
        ("gpu-1", "worker", True), ("gpu-2", "worker", False), ("rx-1", "listener", True)]
    code, out, _ = _run(capsys, config, "status")
    assert "gpu-1 (this node) worker on gpu-host pid 12" in out and "gpu-2 worker on gpu-host-2" in out


def test_a_receiver_node_is_judged_on_its_listener_and_a_worker_node_on_its_worker(tmp_path, capsys):
    root = tmp_path / "var"
    root.mkdir()
    store = Store(database_url(root))
    store.beat("worker", "gpu-host", 12, utcnow(), {"owner": "gpu-host:12"}, node="gpu-1")
    for name, role, healthy in (("gpu-1", "worker", True), ("rx-1", "receiver", False)):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"storage": {"root": str(root)}, "metrics": {"port": 0},
                                          "node": {"name": name, "role": role, "port": 1}}))
        code, out, _ = _run(capsys, config, "status")
        assert (code == 0) == healthy, out
        assert ("listener" in out.splitlines()[0]) == (role == "receiver")  # a worker node has no listener line
