"""Operations: the running node seen by its administrator and its radiologists.

A real node (listener, sweep, notifier, metrics, worker process) receives a PE-positive and a
PE-negative study from DCMTK storescu; a recording PACS, an HL7 MLLP server (hl7apy) and a webhook
receiver listen on loopback. The admin CLI runs against the same store while the node runs.
"""

from __future__ import annotations

import json
import stat
import time
import urllib.request

import pydicom
import pytest
from hl7apy.parser import parse_message

from conftest import free_port
from loopback import Hl7Listener, RecordingPacs, WebhookListener, patient_identity, storescu, wait_for, write_config
from node.cli import main
from node.commands.serve import Node
from node.config import load_config
from node.phantom import PhantomOptions, generate_study, write_study
from node.store import JobState

DATA = PhantomOptions(matrix=256, slices=64, slice_spacing_mm=4.5, min_embolus_mm=10.0,
                      embolus_levels=("central", "lobar"))


class Cli:
    """``petriage`` in-process; stdout per call, stderr (the node's logs too) kept for the end."""

    def __init__(self, capfd):
        self.capfd, self.err = capfd, []

    def __call__(self, *args: str) -> tuple[int, str]:
        self.err.append(self.capfd.readouterr().err)
        code = main(list(args))
        captured = self.capfd.readouterr()
        self.err.append(captured.err)
        return code, captured.out

    def logs(self) -> str:
        self.err.append(self.capfd.readouterr().err)
        return "".join(self.err)


@pytest.fixture
def two_studies(tmp_path):
    studies = {}
    for seed, pe in ((940001, True), (940003, False)):  # 940003: below the demo threshold
        study = generate_study(seed, pe=pe, options=DATA)
        write_study(study, tmp_path / f"in-{seed}")
        studies[pe] = (study.identity.study_instance_uid, tmp_path / f"in-{seed}")
    return studies


def test_a_positive_study_tops_the_worklist_goes_out_high_priority_and_is_notified_without_patient_data_in_logs(
        tmp_path, two_studies, capfd):
    cli = Cli(capfd)
    pacs = RecordingPacs().start(free_port())
    hl7 = Hl7Listener(free_port())
    hook = WebhookListener(free_port(), fail_first=1)  # the first POST fails: the retry delivers it
    metrics_port = free_port()
    path = write_config(tmp_path, destinations=[{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                                                 "port": pacs.port}],
                        notify={"hl7": {"host": "127.0.0.1", "port": hl7.port}, "webhook": {"url": hook.url}},
                        metrics={"port": metrics_port}, logging={"format": "json"})
    cfg = load_config(path, environ={})
    node = Node(cfg, sweep_seconds=0.2, notify_seconds=0.5, stop_timeout=60)
    try:
        positive_uid, positive_dir = two_studies[True]
        negative_uid, negative_dir = two_studies[False]
        storescu(cfg, negative_dir)  # the negative study arrives first ...
        storescu(cfg, positive_dir)
        jobs = wait_for(node, [positive_uid, negative_uid])
        assert [jobs[u][-1]["state"] for u in (positive_uid, negative_uid)] == [JobState.DONE] * 2, jobs
        deadline = time.monotonic() + 60
        while not (hl7.received and hook.bodies):
            assert time.monotonic() < deadline, node.store.notifications_of(positive_uid)
            time.sleep(0.2)

        # ... but the worklist puts the positive one on top
        code, text = cli("--config", str(path), "worklist", "--json")
        worklist = json.loads(text)
        assert code == 0 and [r["study_instance_uid"] for r in worklist] == [positive_uid, negative_uid]
        assert worklist[0]["priority"] > worklist[1]["priority"] and worklist[0]["decision"] == "PE suspected"

        # results: C-STORE priority HIGH for the positive study, MEDIUM for the negative
        assert {s.priority for s in pacs.of_study(positive_uid)} == {1}
        assert {s.priority for s in pacs.of_study(negative_uid)} == {0}

        # HL7 ORU^R01 for the positive result only, readable by hl7apy, with the finding and probability
        assert len(hl7.received) == 1
        oru = parse_message(hl7.received[0], find_groups=False)
        source = pydicom.dcmread(next(positive_dir.rglob("*.dcm")), stop_before_pixels=True)
        probability = json.loads(jobs[positive_uid][-1]["result"])["probability"]
        assert oru.pid.pid_3.value.split("^")[0] == source.PatientID
        obx = {o.obx_3.value.split("^")[0]: o.obx_5.value for o in oru.obx}
        assert obx["59282003"].startswith("52101004") and float(obx["PE-PROB"]) == pytest.approx(probability, abs=1e-4)
        assert oru.tq1.tq1_9.value.startswith("S")

        # webhook: one JSON after one failed attempt, with no patient identity in it
        assert len(hook.bodies) == 1 and hook.attempts == 2 and hook.bodies[0]["positive"] is True
        body = json.dumps(hook.bodies[0])
        assert not [s for s in patient_identity(source) if s in body]

        # status: healthy while running
        code, text = cli("--config", str(path), "status", "--json")
        report = json.loads(text)
        assert code == 0 and report["healthy"] and report["queue"]["done"] == 2
        assert report["model"]["name"]

        # the timeline explains what happened to the study
        code, text = cli("--config", str(path), "queue", "show", positive_uid[-10:])
        assert code == 0
        for kind in ("study-started", "study-complete", "job-claimed", "delivered", "notify-sent", "job-done"):
            assert kind in text, text
        text = " ".join(text.split())  # rich wraps long lines
        # who sent it, and what went where
        assert "from STORESCU at 127.0.0.1" in text and "(RECPACS@127.0.0.1" in text and "7 objects" in text

        # metrics
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:  # noqa: S310
            scraped = r.read().decode()
        received = sum(1 for _ in positive_dir.rglob("*.dcm")) + sum(1 for _ in negative_dir.rglob("*.dcm"))
        assert f'petriage_instances_received_total{{status="success"}} {float(received)}' in scraped
        assert 'petriage_queue_jobs{state="done"} 2.0' in scraped
        assert "petriage_inference_seconds_count 2.0" in scraped and "petriage_end_to_end_seconds_count 2.0" in scraped
        assert "petriage_studies_completed_total 2.0" in scraped
    finally:
        node.stop()
        for peer in (pacs, hl7, hook):
            peer.stop()

    # stopped: status says so, with exit code 1
    code, text = cli("--config", str(path), "status")
    assert code == 1 and "DOWN" in text

    # logs (JSON lines from both processes) never name the patient
    logs = cli.logs()
    assert '"role": "worker"' in logs and '"level": "INFO"' in logs  # the worker's JSON lines were captured
    assert not [s for s in patient_identity(source) if s in logs]

    # spool, results and database: the node's user only
    root = cfg.storage.root
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    modes = {}
    for p in root.rglob("*"):
        try:  # SQLite's -shm/-wal files come and go with connections
            if p.is_file():
                modes[p] = stat.S_IMODE(p.stat().st_mode)
        except FileNotFoundError:
            continue
    assert modes and not {p: oct(m) for p, m in modes.items() if m & 0o077}
