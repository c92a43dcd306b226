"""The DICOM listener: DCMTK echoscu/storescu as the modality, the spool and the store checked after."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from conftest import SMALL, free_port, require_tool
from node import reactor
from node.config import Config, load_config
from node.file_meta import part10_header
from node.pdu_reader import read_exactly
from node.phantom import PhantomOptions, generate_study, write_study
from node.scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS, start_scp
from node.spool import instance_path, sweep_partials, write_atomic
from node.store import Store, StudyState, database_url

OPTS = PhantomOptions(**{**SMALL.__dict__, "slices": 24, "slice_spacing_mm": 12.0})


@pytest.fixture
def node(tmp_path) -> Iterator[tuple[Config, Store]]:
    cfg = load_config(None, environ={}, overrides=[f"storage.root={tmp_path / 'var'}", "node.host=127.0.0.1",
                                                   f"node.port={free_port()}", "node.allowed_calling_aets=[MODALITY]"])
    (tmp_path / "var").mkdir()
    store = Store(database_url(cfg.storage.root))
    server = start_scp(cfg, store)
    try:
        yield cfg, store
    finally:
        server.shutdown()


def _storescu(cfg: Config, folder: Path, *extra: str, aet: str = "MODALITY") -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("storescu"), "-aet", aet, "-aec", cfg.node.ae_title, "+sd", "+r", *extra,
                           "127.0.0.1", str(cfg.node.port), str(folder)], capture_output=True, text=True,
                          timeout=120, env={"TCP_NODELAY": "1"})


def test_echo_answers_success_to_an_allowed_caller(node):
    cfg, _ = node
    proc = subprocess.run([require_tool("echoscu"), "-aet", "MODALITY", "-aec", cfg.node.ae_title, "127.0.0.1",
                           str(cfg.node.port)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_an_open_association_waits_for_work_instead_of_polling_reads_pdus_whole_and_answers_at_once(tmp_path):
    cfg = load_config(None, environ={}, overrides=[f"storage.root={tmp_path / 'var'}", "node.host=127.0.0.1",
                                                   f"node.port={free_port()}"])
    (tmp_path / "var").mkdir()
    server = start_scp(cfg, Store(database_url(cfg.storage.root)))
    loops = {"dul": 0, "association": 0}
    dul_sleep, assoc_sleep = reactor._DulTime.sleep, reactor._AssociationTime.sleep

    def count(name, sleep):
        def counted(seconds):
            if hasattr(threading.current_thread(), "_petriage_waker"):  # the listener's side, not this SCU's
                loops[name] += 1
            sleep(seconds)
        return staticmethod(counted)

    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title=cfg.node.ae_title)
        assert assoc.is_established
        (ours,) = server.active_associations
        waker = ours.dul._petriage_waker
        assert waker is ours._petriage_waker and not waker.closed
        assert ours.dul.socket.recv.__func__ is read_exactly  # node/pdu_reader.py, not pynetdicom's 4 KB reads
        reactor._DulTime.sleep, reactor._AssociationTime.sleep = count("dul", dul_sleep), count("association",
                                                                                                  assoc_sleep)
        time.sleep(0.5)
        idle = dict(loops)
        # pynetdicom's polling looks 5,000 (DUL at 0.1 ms) and 500 (association at 1 ms) times in 0.5 s;
        # waiting on the socket and the queues, each thread looks about once per CAP (10 ms)
        assert 5 <= idle["dul"] <= 5 * 0.5 / reactor.CAP and 5 <= idle["association"] <= 5 * 0.5 / reactor.CAP
        assert all(assoc.send_c_echo().Status == 0 for _ in range(20))  # each one woke both threads at once
        assoc.release()
        deadline = time.monotonic() + 5
        while not waker.closed and time.monotonic() < deadline:  # closed with the connection
            time.sleep(0.01)
        assert waker.closed
    finally:
        reactor._DulTime.sleep, reactor._AssociationTime.sleep = staticmethod(dul_sleep), staticmethod(assoc_sleep)
        server.shutdown()


@pytest.mark.parametrize("syntax, flag", [("explicit", "-xe"), ("jpeg2000", "-xv")])
def test_a_series_from_storescu_is_spooled_byte_for_byte_and_recorded_once(node, tmp_path, syntax, flag):
    cfg, store = node
    study = generate_study(61, pe=True, options=PhantomOptions(**{**OPTS.__dict__, "transfer_syntax": syntax,
                                                                   "order": "shuffled"}))
    paths = write_study(study, tmp_path / "out")["ctpa"]
    proc = _storescu(cfg, tmp_path / "out", flag)
    assert proc.returncode == 0, proc.stderr
    uid = study.identity.study_instance_uid
    row = store.study(uid)
    assert row is not None and row["instances"] == len(paths) and row["state"] == StudyState.RECEIVING
    for p in paths:
        sent = pydicom.dcmread(p)
        spooled = instance_path(cfg.storage.root / "spool", uid, sent.SeriesInstanceUID, sent.SOPInstanceUID)
        got = pydicom.dcmread(spooled)
        assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID  # the sender's bytes kept
        assert got.PixelData == sent.PixelData
    # the same series again: every instance is a duplicate, nothing counted twice
    assert _storescu(cfg, tmp_path / "out", flag).returncode == 0
    assert store.study(uid)["instances"] == len(paths)
    assert sum(e["kind"] == "duplicate" for e in store.events_of(uid)) == len(paths)


@pytest.mark.parametrize("instance", ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.12"])
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2"])
def test_the_file_meta_the_listener_packs_is_the_one_pynetdicom_would_encode(instance, syntax):
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(create_file_meta(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=instance, transfer_syntax=syntax))
    assert part10_header("1.2.840.10008.5.1.4.1.1.2", instance, syntax) == expected  # odd and even UID lengths
    meta = pydicom.dcmread(BytesIO(expected + b"\x08\x00\x16\x00UI\x00\x00"), force=True).file_meta
    assert meta.MediaStorageSOPInstanceUID == instance and meta.TransferSyntaxUID == syntax


def test_a_caller_outside_the_allow_list_is_rejected_and_nothing_is_stored(node, tmp_path):
    cfg, store = node
    study = generate_study(62, pe=False, options=OPTS)
    write_study(study, tmp_path / "out")
    proc = _storescu(cfg, tmp_path / "out", aet="STRANGER")
    assert proc.returncode != 0
    assert store.study(study.identity.study_instance_uid) is None
    assert not any((cfg.storage.root / "spool").rglob("*.dcm"))


def _send(cfg: Config, ds: pydicom.Dataset, priority: int = 0) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title=cfg.node.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds, priority=priority)
    finally:
        assoc.release()
    return int(status.Status)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_uid_that_could_leave_the_spool_is_refused_with_cannot_understand(node, tmp_path):
    cfg, store = node
    path = write_study(generate_study(63, pe=False, options=OPTS), tmp_path / "out")["ctpa"][0]
    ds = pydicom.dcmread(path)
    good = _send(cfg, ds)
    ds.StudyInstanceUID = "../../etc"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    assert (good, _send(cfg, ds)) == (SUCCESS, CANNOT_UNDERSTAND)
    assert store.study("../../etc") is None and not (cfg.storage.root / "etc").exists()


def test_a_spool_that_cannot_be_written_answers_out_of_resources_and_records_nothing(node, tmp_path):
    cfg, store = node
    (cfg.storage.root / "spool").write_text("a file where the spool folder should be")
    ds = pydicom.dcmread(write_study(generate_study(64, pe=False, options=OPTS), tmp_path / "out")["ctpa"][0])
    assert _send(cfg, ds) == OUT_OF_RESOURCES
    assert store.study(ds.StudyInstanceUID) is None


def test_an_interrupted_write_leaves_no_instance_and_the_sweep_removes_its_temporary_file(tmp_path):
    target = tmp_path / "1.2" / "3.4" / "5.6.dcm"

    with pytest.raises(TypeError):
        write_atomic(target, object())  # type: ignore[arg-type]  # fails while writing
    assert not target.exists() and not list(tmp_path.rglob("*.tmp"))
    (tmp_path / "1.2" / "3.4" / ".5.6.dcm.dead.tmp").write_bytes(b"partial")
    assert sweep_partials(tmp_path) == 1 and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(("how", "urgent"), [("routine", False), ("c-store priority high", True),
                                             ("requested procedure priority STAT", True),
                                             ("reporting priority in request attributes", True)])
def test_a_study_the_sender_marks_urgent_is_queued_ahead_of_routine_ones(node, tmp_path, how, urgent):
    import datetime as dt

    from node.config import TriageSettings
    from node.store import utcnow
    from node.triage import priority

    cfg, store = node
    ds = pydicom.dcmread(write_study(generate_study(65, pe=False, options=OPTS), tmp_path / "out")["ctpa"][0])
    if how == "requested procedure priority STAT":
        ds.RequestedProcedurePriority = "STAT"
    elif how == "reporting priority in request attributes":
        item = pydicom.Dataset()
        item.ReportingPriority = "HIGH"
        ds.RequestAttributesSequence = [item]
    assert _send(cfg, ds, priority=1 if how == "c-store priority high" else 0) == SUCCESS
    assert bool(store.study(ds.StudyInstanceUID)["urgent"]) == urgent
    triage = TriageSettings()
    store.complete_quiet_studies(utcnow() + dt.timedelta(minutes=5), 1, 900,
                                 priority_of=lambda u: priority(triage, positive=None, urgent=u))
    assert store.jobs_of(ds.StudyInstanceUID)[0]["priority"] == triage.pending + (triage.urgent_bonus if urgent else 0)


def test_a_port_already_in_use_is_a_clear_error_not_a_traceback(node):
    from node.errors import NodeError

    cfg, store = node
    with pytest.raises(NodeError, match=f"cannot listen on 127.0.0.1:{cfg.node.port}"):
        start_scp(cfg, store)


def test_a_lone_sender_s_row_is_committed_in_its_own_thread_and_a_refused_row_raises_to_its_caller(tmp_path):
    import threading

    from node.group_commit import GroupRecorder
    from node.store import Received, StoreError

    store = Store(database_url(tmp_path))
    recorder = GroupRecorder(store)
    seen: list[str] = []
    record_instances = store.record_instances

    def spy(items, now=None):
        seen.append(threading.current_thread().name)
        return record_instances(items, now)

    store.record_instances = spy  # type: ignore[method-assign]
    row = Received("1.2.9.1", "1.2.9", "1.2.9.0", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                   tmp_path / "1.dcm", 10, "MOD")
    assert recorder.record(row) is True
    assert recorder.record(row) is False  # the same instance again: a duplicate, counted once
    assert seen == [threading.current_thread().name] * 2 and (recorder.batches, recorder.rows) == (2, 2)
    bad = Received("1.2.9.2", "1.2.9", "1.2.9.0", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                   tmp_path / "2.dcm", 10, "MOD")

    def refuse(items, now=None):
        raise StoreError("database or disk is full")

    store.record_instances = refuse  # type: ignore[method-assign]
    with pytest.raises(StoreError, match="disk is full"):  # the caller hears it (and answers out of resources)
        recorder.record(bad)
    store.record_instances = spy  # type: ignore[method-assign]
    assert recorder.record(Received("1.2.9.3", "1.2.9", "1.2.9.0", "1.2.840.10008.5.1.4.1.1.2",
                                    "1.2.840.10008.1.2.1", tmp_path / "3.dcm", 10, "MOD")) is True
    recorder.close()
    with pytest.raises(StoreError, match="stopped"):
        recorder.record(row)
    assert store.study("1.2.9")["instances"] == 2


def test_rows_that_wait_while_a_commit_runs_are_committed_together_and_each_once(tmp_path):
    import sqlite3
    import threading
    import time

    from node.group_commit import GroupRecorder
    from node.store import Received

    store = Store(database_url(tmp_path))
    recorder = GroupRecorder(store)
    lock = sqlite3.connect(tmp_path / "petriage.db", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another writer holds the database: the first commit waits for it
    results: dict[str, bool] = {}

    def send(k: int) -> None:
        results[f"1.2.9.{k}"] = recorder.record(Received(f"1.2.9.{k}", "1.2.9", "1.2.9.0", "1.2.840.10008.5.1.4.1.1.2",
                                                          "1.2.840.10008.1.2.1", tmp_path / f"{k}.dcm", 10, "MOD"))

    threads = [threading.Thread(target=send, args=(k,)) for k in range(10)]
    threads[0].start()  # leads: its commit waits for the lock
    deadline = time.monotonic() + 30
    while not recorder._leading and time.monotonic() < deadline:
        time.sleep(0.01)
    for t in threads[1:]:
        t.start()
    while recorder.waiting < 9 and time.monotonic() < deadline:  # nine more wait behind that commit
        time.sleep(0.01)
    lock.execute("COMMIT")
    for t in threads:
        t.join(30)
    recorder.close()
    assert results == {f"1.2.9.{k}": True for k in range(10)}
    assert (recorder.batches, recorder.rows) == (2, 10)  # the nine waiting rows: one transaction
    assert store.study("1.2.9")["instances"] == 10
