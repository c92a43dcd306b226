"""The storage root's mark: a node whose shared storage is not mounted neither acknowledges instances
nor starts jobs, and one started on the wrong storage refuses to start.

The "share" is a folder; unmounting it is moving it away and leaving an empty folder at its path,
which is what an NFS mount point looks like when nothing is mounted there.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from conftest import free_port
from node.commands.serve import Node
from node.config import load_config
from node.phantom import PhantomOptions, generate_study, write_study
from node.scp import OUT_OF_RESOURCES, SUCCESS
from node.storage_mark import MARK, StorageMarkError, claim_storage
from node.store import Store

SMALL = PhantomOptions(matrix=64, slices=4, slice_spacing_mm=10.0)


def _config(tmp_path: Path, root: Path, db: Path, role: str = "receiver", name: str = "rx-1"):
    return load_config(None, environ={}, overrides=[
        f"storage.root={root}", f"store.url=sqlite:///{db}", "node.host=127.0.0.1", f"node.port={free_port()}",
        f"node.role={role}", f"node.name={name}", "metrics.port=0", "model.device=cpu"])


def _store(cfg, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title=cfg.node.ae_title)
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _unmount(root: Path) -> Path:
    away = root.with_name(root.name + "-unmounted")
    root.rename(away)
    root.mkdir()  # the empty mount point on the local disk
    time.sleep(1.2)  # the receiver reads the mark at most once a second
    return away


def test_a_receiver_whose_share_is_gone_answers_out_of_resources_and_records_nothing(tmp_path):
    root, db = tmp_path / "share", tmp_path / "db" / "petriage.db"
    db.parent.mkdir()
    cfg = _config(tmp_path, root, db)
    files = write_study(generate_study(61, pe=False, options=SMALL), tmp_path / "in")["ctpa"]
    first, second, third = (pydicom.dcmread(p) for p in files[:3])
    node = Node(cfg, sweep_seconds=0.2, stop_timeout=30)
    try:
        assert (root / MARK).is_file()
        assert _store(cfg, first) == SUCCESS
        away = _unmount(root)
        assert _store(cfg, second) == OUT_OF_RESOURCES  # the sender keeps it and retries
        assert not [p for p in root.rglob("*") if p.is_file()]  # nothing written to the local disk
        assert node.store.study(str(second.StudyInstanceUID))["instances"] == 1
        root.rmdir()
        away.rename(root)  # mounted again
        time.sleep(1.2)
        assert _store(cfg, third) == SUCCESS
        assert node.store.study(str(third.StudyInstanceUID))["instances"] == 2
    finally:
        node.stop()


def test_a_node_started_where_the_share_is_not_mounted_refuses_to_start_and_says_why(tmp_path):
    root, db = tmp_path / "share", tmp_path / "db" / "petriage.db"
    db.parent.mkdir()
    root.mkdir()
    first = claim_storage(root, Store(f"sqlite:///{db}"))  # the first node made the mark and the store knows it
    empty = tmp_path / "mountpoint"  # another host's mount point, nothing mounted
    empty.mkdir()
    with pytest.raises(StorageMarkError, match="is the shared storage mounted"):
        Node(_config(tmp_path, empty, db), sweep_seconds=0.2, stop_timeout=30)
    assert claim_storage(root, Store(f"sqlite:///{db}")).identity == first.identity  # the right one still is


def test_a_worker_claims_no_job_while_the_storage_mark_is_gone(tmp_path):
    import datetime as dt

    from node.store import Received, utcnow
    from node.worker import Worker

    root = tmp_path / "share"
    root.mkdir()
    store = Store(f"sqlite:///{tmp_path / 'petriage.db'}")
    mark = claim_storage(root, store)
    mark.check_seconds = 0.0
    store.record_instance(Received("1.2.3.1", "1.2.3", "1.2.3.0", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                                   root / "x.dcm", 10, "MODALITY"))
    assert store.complete_quiet_studies(utcnow() + dt.timedelta(seconds=60), 1.0, 600.0) == ["1.2.3"]
    (root / MARK).unlink()  # the share is gone
    worker = Worker(store, engine=None, storage_mark=mark)  # type: ignore[arg-type]  # no job may reach it
    assert worker.run_once() is None
    job = store.jobs_of("1.2.3")[-1]
    assert job["state"] == "queued" and job["lease_owner"] is None and job["attempts"] == 0
