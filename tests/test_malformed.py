"""Malformed input, generated with hypothesis: the node answers a status the sender understands or
stores the bytes it was sent, keeps serving, and every stored study ends as a job with a reason.

Objects go over a real association to the real listener (pynetdicom sends file bytes as they are, so
random and truncated data sets reach the node unchanged); the stored studies then go through the
real worker with the demo model. Counts are printed (``pytest -s``) for the closing note.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from conftest import free_port
from node.config import load_config
from node.inference import Engine
from node.phantom import PhantomOptions, generate_study, write_study
from node.scp import CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH_SOP_CLASS, SUCCESS, start_scp
from node.series import SeriesError, index_series
from node.store import FINAL_STATES, Store, database_url, utcnow
from node.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
UNDERSTOOD = {SUCCESS, CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH_SOP_CLASS}
TALLY: Counter = Counter()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    root = tmp_path_factory.mktemp("node")
    cfg = load_config(None, environ={}, overrides=[f"storage.root={root}", "node.host=127.0.0.1",
                                                   f"node.port={free_port()}", "storage.min_free_mb=0"])
    store = Store(database_url(root))
    server = start_scp(cfg, store, fsync=False)
    template = write_study(generate_study(970001, pe=False, options=PhantomOptions(matrix=64, slices=20,
                                                                                   slice_spacing_mm=4.5)),
                           tmp_path_factory.mktemp("template"))["ctpa"]
    yield cfg, store, root, [pydicom.dcmread(p) for p in template]
    server.shutdown()
    print(f"\nmalformed inputs: {dict(TALLY)}")


def _file_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _meta_and_body(ds: pydicom.Dataset, body: bytes) -> bytes:
    """A file whose meta is valid (so it can be offered on an association) and whose data set is ``body``."""
    whole = _file_bytes(ds)
    head = pydicom.filereader.read_preamble(BytesIO(whole), force=False)
    assert head is not None
    meta_end = 132 + 12 + int.from_bytes(whole[140:144], "little")  # group length element ends the meta header
    return whole[:meta_end] + body


def _send_raw(cfg, tmp: Path, payload: bytes, sop_class: str) -> tuple[int, bool]:
    """C-STORE the data set bytes of ``payload`` as they are; returns (status, C-ECHO after it succeeded)."""
    path = tmp / f"{generate_uid()}.dcm"
    path.write_bytes(payload)
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    previous = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, not a re-encoding
    try:
        assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title=cfg.node.ae_title)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(path)
            code = int(status.Status) if status else -1
        finally:
            assoc.release()
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = previous
        path.unlink()
    ae2 = AE(ae_title="FUZZER")
    ae2.add_requested_context(Verification)
    echo_assoc = ae2.associate("127.0.0.1", cfg.node.port, ae_title=cfg.node.ae_title)
    alive = echo_assoc.is_established and echo_assoc.send_c_echo().Status == 0
    echo_assoc.release()
    return code, alive


def _fresh(ds: pydicom.Dataset, seed: int) -> pydicom.Dataset:
    """A copy with a new SOPInstanceUID drawn from ``seed`` (hypothesis replays must draw the same bytes)."""
    out = pydicom.dcmread(BytesIO(_file_bytes(ds)))
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(seed)])
    return out


@st.composite
def malformed_objects(draw, template: list[pydicom.Dataset]):
    kind = draw(st.sampled_from(["random-bytes", "truncated", "flipped-bytes", "wrong-vr", "no-pixel-data",
                                 "pixel-data-size", "bad-uid"]))
    ds = _fresh(template[draw(st.integers(0, len(template) - 1))], draw(st.integers(0, 2**32)))
    if kind == "random-bytes":
        return kind, _meta_and_body(ds, draw(st.binary(max_size=2048)))
    if kind == "wrong-vr":  # the element's VR bytes replaced: the value is then read as another type
        keyword = draw(st.sampled_from(["Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "RescaleSlope",
                                        "BitsAllocated", "StudyInstanceUID"]))
        tag = pydicom.datadict.tag_for_keyword(keyword)
        whole = _file_bytes(ds)
        needle = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
        at = whole.index(needle, 132 + 12 + int.from_bytes(whole[140:144], "little")) + 4
        vr = draw(st.sampled_from([b"LO", b"UL", b"FD", b"US", b"SQ", b"OB", b"UN", b"XX"]))
        return kind, whole[:at] + vr + whole[at + 2:]
    if kind == "no-pixel-data":
        del ds.PixelData
        return kind, _file_bytes(ds)
    if kind == "pixel-data-size":
        n = len(ds.PixelData)
        ds.PixelData = bytes(draw(st.sampled_from([0, 2, n // 2, n + 2, n * 4])))
        return kind, _file_bytes(ds)
    if kind == "bad-uid":
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = draw(
            # (pynetdicom itself refuses to send over-long or empty ones)
            st.sampled_from(["../../etc/passwd", "1.2.3.04a", "1..2", "abc", "1.2.3.4 "]))
        return kind, _file_bytes(ds)
    whole = _file_bytes(ds)
    meta_end = 132 + 12 + int.from_bytes(whole[140:144], "little")
    body = bytearray(whole[meta_end:])
    if kind == "truncated":
        return kind, whole[:meta_end] + bytes(body[:draw(st.integers(0, len(body) - 1))])
    for _ in range(draw(st.integers(1, 16))):  # flipped-bytes: header region mostly
        body[draw(st.integers(0, min(len(body), 2048) - 1))] = draw(st.integers(0, 255))
    return kind, whole[:meta_end] + bytes(body)


def test_malformed_objects_get_a_status_the_sender_understands_and_the_node_keeps_serving(node, tmp_path):
    cfg, store, root, template = node

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(data=st.data())
    def run(data):
        kind, payload = data.draw(malformed_objects(template))
        code, alive = _send_raw(cfg, tmp_path, payload, template[0].SOPClassUID)
        TALLY[f"{kind}: status 0x{code:04X}" if code >= 0 else f"{kind}: no answer"] += 1
        assert code in UNDERSTOOD, (kind, code)
        assert alive, kind
        if code == SUCCESS:  # stored: the spool holds the very bytes that were sent
            held = [p for p in (root / "spool").rglob("*.dcm") if p.read_bytes().endswith(payload[-64:])]
            assert held, kind

    run()
    TALLY["objects tried"] = sum(v for k, v in TALLY.items() if "status" in k or "answer" in k)


def _send_series(cfg, datasets: list[pydicom.Dataset]) -> list[int]:
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(datasets[0].SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", cfg.node.port, ae_title=cfg.node.ae_title)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


@st.composite
def inconsistent_series(draw, template: list[pydicom.Dataset]):
    seed = draw(st.integers(0, 2**32))
    study, series = (generate_uid(entropy_srcs=[str(seed), kind]) for kind in ("study", "series"))
    out = []
    fault = draw(st.sampled_from(["positions", "orientation", "duplicate-positions", "sizes", "missing-position",
                                  "pixel-spacing", "too-few-slices", "gap"]))
    for k, source in enumerate(template):
        ds = _fresh(source, seed * 100 + k)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        if fault == "positions":
            ds.ImagePositionPatient = [0.0, 0.0, draw(st.floats(-500, 500, allow_nan=False))]
        elif fault == "orientation" and k == draw(st.integers(0, len(template) - 1)):
            ds.ImageOrientationPatient = [float(v) for v in draw(st.lists(st.floats(-1, 1), min_size=6, max_size=6))]
        elif fault == "duplicate-positions" and k % 2:
            ds.ImagePositionPatient = list(template[k - 1].ImagePositionPatient)
        elif fault == "sizes" and k == 3:
            ds.Rows = ds.Columns = 32
            ds.PixelData = np.zeros((32, 32), dtype=np.uint16).tobytes()
        elif fault == "missing-position" and k == 5:
            del ds.ImagePositionPatient
        elif fault == "pixel-spacing":
            ds.PixelSpacing = [draw(st.sampled_from([0.0, -1.0, 1e-9, 1e6])), 1.0]
        elif fault == "gap" and k > 10:
            ds.ImagePositionPatient = [*list(ds.ImagePositionPatient)[:2], float(ds.ImagePositionPatient[2]) - 40]
        out.append(ds)
    if fault == "too-few-slices":
        out = out[:draw(st.integers(1, 5))]
    return fault, study, out


def test_inconsistent_series_end_as_jobs_with_a_reason_and_the_worker_keeps_working(node):
    cfg, store, root, template = node
    engine = Engine(ROOT / "models" / "demo", device="cpu")
    worker = Worker(store, engine, owner="fuzz-worker")
    outcomes: Counter = Counter()

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(data=st.data())
    def run(data):
        fault, study, datasets = data.draw(inconsistent_series(template))
        statuses = _send_series(cfg, datasets)
        assert set(statuses) <= UNDERSTOOD
        store.complete_quiet_studies(utcnow() + dt.timedelta(hours=1), 1, 900)
        while (outcome := worker.run_once()) is not None:  # never raises
            pass
        jobs = store.jobs_of(study)
        if SUCCESS in statuses:
            assert jobs and jobs[-1]["state"] in FINAL_STATES and jobs[-1]["reason"], (fault, jobs)
            assert not jobs[-1]["reason"].startswith("internal error"), (fault, jobs[-1]["reason"])
            outcomes[f"{fault}: {jobs[-1]['state']}"] += 1
        del outcome

    run()
    TALLY.update({f"series {k}": v for k, v in outcomes.items()})
    # every study stored by either test (malformed objects included) ended as a job with a reason
    with store.engine.connect() as conn:
        from sqlalchemy import select

        from node.store import jobs as jobs_table

        everything = [dict(r._mapping) for r in conn.execute(select(jobs_table)).all()]
    assert everything and all(j["state"] in FINAL_STATES and j["reason"] for j in everything)
    assert not [j["reason"] for j in everything if j["reason"].startswith("internal error")]
    TALLY.update(Counter(f"job {j['state']}" for j in everything))


@pytest.mark.parametrize("spacing", [0.0, -1.0, 1e-9, 1e6])
def test_an_impossible_pixel_spacing_is_refused_with_its_value_not_computed_with(tmp_path, spacing):
    options = PhantomOptions(matrix=64, slices=20, slice_spacing_mm=4.5)
    paths = write_study(generate_study(970002, pe=False, options=options), tmp_path)["ctpa"]
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PixelSpacing = [spacing, 1.0]
        ds.save_as(p)
    with pytest.raises(SeriesError, match="is not a CT pixel size"):
        index_series(paths)


@pytest.mark.parametrize("vr", [b"XX", b"ZZ"])
def test_an_unknown_value_representation_in_a_uid_is_refused_as_cannot_understand_not_a_handler_error(
        node, tmp_path, vr):
    cfg, store, root, template = node
    whole = _file_bytes(_fresh(template[0], 424242 + vr[0]))
    tag = pydicom.datadict.tag_for_keyword("SOPInstanceUID")
    needle = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    at = whole.index(needle, 132 + 12 + int.from_bytes(whole[140:144], "little")) + 4
    code, alive = _send_raw(cfg, tmp_path, whole[:at] + vr + whole[at + 2:], template[0].SOPClassUID)
    assert code == CANNOT_UNDERSTAND and alive  # was 0xC211 from pynetdicom, with a traceback in the log
