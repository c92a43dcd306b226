"""A changed result is a new result: UIDs follow what was analysed, a new SR names the one it replaces,
and a result that did not change is neither sent nor notified again. Against a real listener as PACS."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pydicom

from conftest import SMALL, free_port, require_tool
from node.assembly import Assembler
from node.config import StudySettings, load_config
from node.inference import Engine
from node.phantom import PhantomOptions, generate_study, write_study
from node.scp import start_scp
from node.store import JobState, Received, Store
from node.validation import dciodvfy
from node.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2026, 12, 4, 12, 0, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


def _spool(store: Store, paths: list[Path], at: dt.datetime) -> str:
    uid = ""
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        uid = str(ds.StudyInstanceUID)
        store.record_instance(Received(str(ds.SOPInstanceUID), uid, str(ds.SeriesInstanceUID), str(ds.SOPClassUID),
                                       "1.2.840.10008.1.2.1", p, p.stat().st_size, "MODALITY"), at)
    return uid


def _analyse(store: Store, worker: Worker, clock: Clock) -> dict:
    clock.now += dt.timedelta(minutes=2)
    Assembler(store, StudySettings(quiet_seconds=20, max_wait_seconds=300), clock).sweep()
    done = worker.run_once()
    assert done is not None and worker.run_once() is None
    return done


def test_a_grown_study_gets_new_uids_and_an_sr_naming_its_predecessor_and_an_unchanged_one_is_not_resent(tmp_path):
    port = free_port()
    pacs_cfg = load_config(None, environ={}, overrides=[f"storage.root={tmp_path / 'pacs'}", "node.host=127.0.0.1",
                                                        f"node.port={port}", "node.ae_title=PACS"])
    dest = load_config(None, environ={}, overrides=[
        f"destinations=[{{name: pacs, ae_title: PACS, host: 127.0.0.1, port: {port}}}]"]).destinations
    (tmp_path / "pacs").mkdir()
    pacs = Store(f"sqlite:///{tmp_path / 'pacs' / 'db.sqlite'}")
    server = start_scp(pacs_cfg, pacs)
    written = write_study(generate_study(501, pe=True, options=PhantomOptions(**{**SMALL.__dict__,
                                                                                  "companions": ("localizer",)})),
                          tmp_path / "s")
    paths = written["ctpa"]
    head_first = sorted(paths, key=lambda p: -float(pydicom.dcmread(p, stop_before_pixels=True)
                                                    .ImagePositionPatient[2]))
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    clock = Clock()
    worker = Worker(store, Engine(ROOT / "models" / "demo", device="cpu"), owner="w", clock=clock,
                    outbox_root=tmp_path / "outbox", destinations=dest)
    try:
        uid = _spool(store, head_first[:-1], clock())  # the last slice comes late
        first = _analyse(store, worker, clock)
        assert first["state"] == JobState.DONE and first["reason"].endswith("sent to pacs")
        sent_first = pacs.study(uid)["instances"]

        store.record_instance(Received(*_ids(head_first[-1]), "1.2.840.10008.1.2.1", head_first[-1],
                                       head_first[-1].stat().st_size, "MODALITY"), clock())
        grown = _analyse(store, worker, clock)
        assert grown["state"] == JobState.DONE and grown["reason"].endswith("sent to pacs")
        before, after = json.loads(first["result"]), json.loads(grown["result"])
        assert after["slices"] == before["slices"] + 1
        assert after["sr"]["sop_instance_uid"] != before["sr"]["sop_instance_uid"]
        assert pacs.study(uid)["instances"] == 2 * sent_first  # a whole new version, nothing overwritten
        sr = pydicom.dcmread(next((tmp_path / "outbox").rglob(f"{after['sr']['sop_instance_uid']}.dcm")))
        predecessor = sr.PredecessorDocumentsSequence[0]
        assert predecessor.StudyInstanceUID == uid
        assert predecessor.ReferencedSeriesSequence[0].SeriesInstanceUID == before["sr"]["series_instance_uid"]
        assert predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
            before["sr"]["sop_instance_uid"]
        require_tool("dciodvfy")
        verdict = dciodvfy(Path(sr.filename))
        assert not verdict.errors, verdict.errors

        _spool(store, written["localizer"], clock())  # a late scout: the study reopens, its CTPA is as it was
        again = _analyse(store, worker, clock)
        assert again["state"] == JobState.DONE
        assert f"unchanged since job {grown['id']}" in again["reason"] and "not sent or notified again" in \
            again["reason"]
        assert pacs.study(uid)["instances"] == 2 * sent_first
        assert json.loads(again["result"])["result_key"] == after["result_key"]
    finally:
        server.shutdown()


def _ids(path: Path) -> tuple[str, str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID)
