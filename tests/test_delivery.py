"""Which objects go where, and how: a PACS that refuses SEG, one that takes it only uncompressed, a
destination that takes only the SR, and STOW-RS to Orthanc's DICOMweb plugin while it is down and
when it is back. Every peer is real: pynetdicom storage SCPs on loopback, Orthanc with its plugin."""

from __future__ import annotations

import json
import time
from collections import Counter

import pydicom
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from typer.testing import CliRunner

from conftest import free_port, running_orthanc
from loopback import RecordingPacs, storescu, wait_for, write_config
from node.cli import app, main
from node.commands.serve import Node
from node.config import load_config
from node.phantom import PhantomOptions, generate_study, write_study
from node.scu import hold_reactor
from node.store import JobState

SMALL = PhantomOptions(matrix=256, slices=64, slice_spacing_mm=4.5, min_embolus_mm=10.0,
                       embolus_levels=("central", "lobar"))
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"


def _study(tmp_path, seed: int) -> str:
    study = generate_study(seed, pe=True, options=SMALL)
    write_study(study, tmp_path / f"in-{seed}")
    return study.identity.study_instance_uid


def _analysed(path, tmp_path, seed: int, *peers: tuple[RecordingPacs, int]) -> tuple[str, dict]:
    """Start ``peers`` (PACS, port), send the phantom study ``seed`` to a node configured by ``path``;
    the study's UID and its last job once it is final."""
    cfg = load_config(path, environ={})
    uid = _study(tmp_path, seed)
    for pacs, port in peers:
        pacs.start(port)
    node = Node(cfg, sweep_seconds=0.2, stop_timeout=60)
    try:
        storescu(cfg, tmp_path / f"in-{seed}")
        return uid, wait_for(node, [uid])[uid][-1]
    finally:
        node.stop()
        for pacs, _ in peers:
            pacs.stop()


def test_a_pacs_that_refuses_seg_gets_the_rest_once_and_queue_show_names_the_refused_class(tmp_path):
    refusing, plain = RecordingPacs(ae_title="NOSEG", refuse=(SEGMENTATION,)), RecordingPacs(ae_title="PLAIN")
    ports = free_port(), free_port()
    path = write_config(tmp_path, destinations=[
        {"name": "noseg", "ae_title": "NOSEG", "host": "127.0.0.1", "port": ports[0]},
        {"name": "plain", "ae_title": "PLAIN", "host": "127.0.0.1", "port": ports[1]}])
    uid, job = _analysed(path, tmp_path, 950001, (refusing, ports[0]), (plain, ports[1]))
    assert job["state"] == JobState.DONE, job
    assert "noseg refused Segmentation Storage (not sent; see destinations[].objects)" in job["reason"]
    modalities = Counter(s.modality for s in refusing.received)
    assert modalities == {"SR": 1, "OT": 4, "KO": 1}  # SR, 3 key images + summary, KOS; no SEG, nothing twice
    assert Counter(s.modality for s in plain.received) == {**modalities, "SEG": 1}
    # the peer takes SEG uncompressed only: the RLE instance went decompressed, with its own UID
    seg = next(ds for ds in plain.datasets.values() if ds.Modality == "SEG")
    assert seg.file_meta.TransferSyntaxUID != pydicom.uid.RLELossless
    sr = next(ds for ds in plain.datasets.values() if ds.Modality == "SR")
    assert seg.SOPInstanceUID in str(sr.ContentSequence)  # the SR's Referenced Segment is this very instance
    shown = CliRunner().invoke(app, ["--config", str(path), "queue", "show", uid], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "refused by the destination, not sent: Segmentation Storage (1)" in " ".join(shown.output.split())


def test_a_response_reaches_its_request_because_the_association_reactor_is_parked_before_it_goes_out():
    """The race behind a delivery that failed on a DIMSE timeout although the PACS had answered: the
    requestor association's reactor thread took the response as "unexpected". Here the requesting
    thread turns to the queue 50 ms late, as a thread that waits for the GIL on a loaded machine does:
    after ``hold_reactor`` its response is still there; a reactor thread left running (it polls every
    1 ms) has taken it by then, and the request hears nothing."""
    pacs, port = RecordingPacs(ae_title="ECHO"), free_port()
    pacs.start(port)
    ae = AE(ae_title="PETRIAGE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 3
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ECHO")
    try:
        assert assoc.is_established
        context_id = assoc.accepted_contexts[0].context_id
        for message_id in (1, 2, 3):
            assert hold_reactor(assoc)
            request = C_ECHO()
            request.MessageID, request.AffectedSOPClassUID = message_id, Verification
            assoc.dimse.send_msg(request, context_id)
            time.sleep(0.05)
            _, response = assoc.dimse.get_msg(block=True)
            assoc._reactor_checkpoint.set()  # what send_c_echo does once it has its response
            assert response is not None, f"request {message_id}: the reactor thread took the response"
            assert response.MessageIDBeingRespondedTo == message_id and response.Status == 0x0000
    finally:
        assoc.release()
        pacs.stop()


def test_a_destination_that_takes_only_the_sr_gets_only_the_sr(tmp_path):
    pacs, port = RecordingPacs(ae_title="SRONLY"), free_port()
    path = write_config(tmp_path, destinations=[{"name": "ris", "ae_title": "SRONLY", "host": "127.0.0.1",
                                                 "port": port, "objects": ["sr"]}])
    _, job = _analysed(path, tmp_path, 950002, (pacs, port))
    assert job["state"] == JobState.DONE, job
    assert [s.modality for s in pacs.received] == ["SR"]


def test_stow_rs_to_orthanc_dicomweb_waits_while_it_is_down_and_delivers_everything_once_when_it_is_back(tmp_path):
    http_port = free_port()
    path = write_config(tmp_path, destinations=[{"name": "archive", "kind": "dicomweb",
                                                 "url": f"http://127.0.0.1:{http_port}/dicom-web"}])
    cfg = load_config(path, environ={})
    uid = _study(tmp_path, 950003)
    node = Node(cfg, sweep_seconds=0.2, stop_timeout=60)
    try:
        storescu(cfg, tmp_path / "in-950003")
        job = wait_for(node, [uid], states=(JobState.SENDING,))[uid][-1]
        assert "STOW-RS failed" in job["reason"] and "next at" in job["reason"], job
        with running_orthanc(tmp_path / "orthanc", dicomweb=True, http_port=http_port) as orthanc:
            job = wait_for(node, [uid], seconds=120)[uid][-1]
            assert job["state"] == JobState.DONE and "sent to archive" in job["reason"], job
            found = orthanc.get(f"/dicom-web/studies/{uid}/series")  # QIDO-RS of what arrived
            modalities = sorted(s["00080060"]["Value"][0] for s in found)
            instances = orthanc.get("/instances")
    finally:
        node.stop()
    assert modalities == ["KO", "OT", "SEG", "SR"], modalities
    assert len(instances) == 1 + 4 + 1 + 1  # SR, 3 key images + summary, SEG, KOS: once each
    kinds = [e["kind"] for e in node.store.events_of(uid)]
    assert "send-retry" in kinds  # the failed attempt is on the study's record
    delivered = [e["detail"] for e in node.store.events_of(uid) if e["kind"] == "delivered"]
    assert len(delivered) == 1 and "STOW-RS: 7 objects" in delivered[0], delivered


def test_stow_rs_with_basic_authentication_stores_and_a_wrong_password_waits_with_the_http_status(tmp_path, capsys):
    http_port = free_port()
    (tmp_path / "right").write_text("s3cret-stow\n")
    (tmp_path / "wrong").write_text("guess\n")
    url = f"http://127.0.0.1:{http_port}/dicom-web"
    path = write_config(tmp_path, destinations=[
        {"name": "good", "kind": "dicomweb", "url": url, "username": "petriage", "password_file": "right"},
        {"name": "bad", "kind": "dicomweb", "url": url, "username": "petriage", "password_file": "wrong"}])
    cfg = load_config(path, environ={})
    uid = _study(tmp_path, 950004)
    with running_orthanc(tmp_path / "orthanc", dicomweb=True, http_port=http_port,
                         users={"petriage": "s3cret-stow"}) as orthanc:
        node = Node(cfg, sweep_seconds=0.2, stop_timeout=60)
        try:
            storescu(cfg, tmp_path / "in-950004")
            job = wait_for(node, [uid], states=(JobState.SENDING,))[uid][-1]
        finally:
            node.stop()
        stored = orthanc.get("/instances")
        capsys.readouterr()
        good = main(["--config", str(path), "echo", "good"]), capsys.readouterr()
        bad = main(["--config", str(path), "echo", "bad"]), capsys.readouterr()
    assert good[0] == 0 and "QIDO-RS answered" in good[1].out, good
    assert bad[0] == 1 and "HTTP 401" in bad[1].err and "Traceback" not in bad[1].err, bad
    assert "bad (" in job["reason"] and "HTTP 401" in job["reason"], job  # the wrong password, named
    assert json.loads(job["delivered"]) == ["good"]  # the right one delivered, and will not be sent again
    assert len(stored) == 7
