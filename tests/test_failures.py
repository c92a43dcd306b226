"""Failure behaviour: a PACS that is down, a disk that is nearly full, eight senders at once, SIGTERM.

Each fault is real: a port nobody listens on, a free-space floor above what the disk has, eight
DCMTK storescu processes at the same time, a signal to a ``petriage serve`` process.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from conftest import free_port, require_tool
from loopback import RecordingPacs, start_listener, storescu, wait_for, write_config
from node.commands.serve import Node
from node.config import load_config
from node.phantom import PhantomOptions, generate_study, write_study
from node.scp import OUT_OF_RESOURCES
from node.store import JobState, Store, database_url

SMALL = PhantomOptions(matrix=256, slices=64, slice_spacing_mm=4.5, min_embolus_mm=10.0,
                       embolus_levels=("central", "lobar"))


def test_results_wait_while_the_pacs_is_down_and_arrive_once_each_in_order_when_it_is_back(tmp_path):
    pacs_port = free_port()  # nothing listens here yet: the PACS is down
    path = write_config(tmp_path, destinations=[{"name": "pacs", "ae_title": "RECPACS", "host": "127.0.0.1",
                                                 "port": pacs_port}])
    cfg = load_config(path, environ={})
    uids = []
    for seed in (940003, 940007):
        study = generate_study(seed, pe=False, options=SMALL)
        write_study(study, tmp_path / f"in-{seed}")
        uids.append(study.identity.study_instance_uid)
    node = Node(cfg, sweep_seconds=0.2, stop_timeout=60)
    pacs = RecordingPacs()
    try:
        for seed in (940003, 940007):
            storescu(cfg, tmp_path / f"in-{seed}")
        jobs = wait_for(node, uids, states=(JobState.SENDING,))
        assert all("association failed" in j[-1]["reason"] for j in jobs.values()), jobs
        pacs.start(pacs_port)  # back before the first retry (5 s after the first failure)
        jobs = wait_for(node, uids)
    finally:
        node.stop()
        pacs.stop()
    assert [j[-1]["state"] for j in jobs.values()] == [JobState.DONE, JobState.DONE]
    copies = Counter(s.sop_instance_uid for s in pacs.received)
    written = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
               for f in (Path(cfg.storage.root) / "outbox").rglob("*.dcm")}
    assert set(copies) == written and set(copies.values()) == {1}  # every result the worker wrote, none twice
    for uid in uids:  # SR, KOS, 3 key images + summary; a SEG only where attention reached its floor
        kinds = Counter(s.modality for s in pacs.of_study(uid))
        assert {k: kinds[k] for k in ("SR", "KO", "OT")} == {"SR": 1, "KO": 1, "OT": 4} and kinds["SEG"] <= 1, kinds
    first_failure = {u: min(e["at"] for e in node.store.events_of(u) if e["kind"] == "send-retry") for u in uids}
    arrival = sorted(uids, key=lambda u: min(s.at for s in pacs.of_study(u)))
    assert arrival == sorted(uids, key=first_failure.__getitem__)  # the backlog leaves in the order it formed
    for uid in uids:  # each study's results arrive together, not interleaved with the other's
        times = sorted(s.at for s in pacs.of_study(uid))
        other = [s.at for s in pacs.received if s.study_instance_uid != uid]
        assert not [t for t in other if times[0] < t < times[-1]]


def _send(port: int, ae_title: str, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        echo = assoc.send_c_echo()
    finally:
        assoc.release()
    assert echo.Status == 0x0000  # the node keeps serving
    return int(status.Status)


def test_below_the_free_space_floor_c_store_answers_out_of_resources_and_writes_nothing(tmp_path):
    free_mib = shutil.disk_usage(tmp_path).free // 2**20
    cfg, store, server = start_listener(tmp_path / "var", f"storage.min_free_mb={free_mib + 1}")
    try:
        path = write_study(generate_study(5, pe=False, options=SMALL), tmp_path / "in")["ctpa"][0]
        ds = pydicom.dcmread(path)
        assert _send(cfg.node.port, cfg.node.ae_title, ds) == OUT_OF_RESOURCES
    finally:
        server.shutdown()
    assert store.study(ds.StudyInstanceUID) is None
    assert not [p for p in (tmp_path / "var").rglob("*") if p.is_file() and p.suffix in (".dcm", ".tmp")]


def test_eight_associations_sending_at_once_lose_nothing(tmp_path):
    options = PhantomOptions(matrix=128, slices=32, slice_spacing_mm=4.5)
    cfg, store, server = start_listener(tmp_path / "var", "node.max_associations=10")
    folders, uids = [], []
    for k in range(8):
        study = generate_study(950000 + k, pe=bool(k % 2), options=options)
        write_study(study, tmp_path / f"in{k}")
        folders.append(tmp_path / f"in{k}")
        uids.append(study.identity.study_instance_uid)
    sent = {uid: sum(1 for _ in f.rglob("*.dcm")) for uid, f in zip(uids, folders, strict=True)}
    results: list[int] = []
    start = threading.Barrier(8)

    def send(folder: Path) -> None:
        start.wait()
        proc = subprocess.run([require_tool("storescu"), "-aec", cfg.node.ae_title, "+sd", "+r", "127.0.0.1",
                               str(cfg.node.port), str(folder)], timeout=300, env={"TCP_NODELAY": "1"},
                              capture_output=True)
        results.append(proc.returncode)

    threads = [threading.Thread(target=send, args=(f,)) for f in folders]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.shutdown()
    assert results == [0] * 8
    assert {uid: store.study(uid)["instances"] for uid in uids} == sent
    spooled = [p for p in (tmp_path / "var" / "spool").rglob("*") if p.is_file()]
    assert len(spooled) == sum(sent.values()) and not [p for p in spooled if p.suffix == ".tmp"]


def _serve(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "node.cli", "--config", str(config), "serve", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_state(store: Store, uid: str, state: JobState, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not any(j["state"] == state for j in store.jobs_of(uid)):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, store.jobs_of(uid)
        time.sleep(0.01)


def test_sigterm_requeues_the_running_job_when_it_cannot_finish_in_time_and_finishes_it_otherwise(tmp_path):
    pacs = RecordingPacs().start(free_port())
    path = write_config(tmp_path, destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                                                 "port": pacs.port}])
    cfg = load_config(path, environ={})
    study = generate_study(960001, pe=True, options=PhantomOptions(**{**SMALL.__dict__, "slices": 192,
                                                                       "slice_spacing_mm": 1.5}))
    write_study(study, tmp_path / "in")
    uid = study.identity.study_instance_uid
    try:
        proc = _serve(path, "--stop-timeout", "0.1")
        deadline = time.monotonic() + 60
        while not (cfg.storage.root / "petriage.db").exists() or not _accepts(cfg.node.port):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        store = Store(database_url(cfg.storage.root))
        storescu(cfg, tmp_path / "in")
        _wait_state(store, uid, JobState.RUNNING, proc)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stdout.read() if proc.stdout else ""
        [job] = store.jobs_of(uid)
        assert job["state"] == JobState.QUEUED and "re-queued" in job["reason"], job  # not lost, not half-done

        proc = _serve(path)  # default stop timeout: the worker finishes the job before the node exits
        _wait_state(store, uid, JobState.RUNNING, proc)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(120) == 0
        [job] = store.jobs_of(uid)
        assert job["state"] == JobState.DONE and job["attempts"] == 2, job
    finally:
        pacs.stop()
    assert len(pacs.of_study(uid)) == 7 and len({s.sop_instance_uid for s in pacs.received}) == 7


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
