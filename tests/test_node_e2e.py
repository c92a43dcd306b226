"""The node end to end: Orthanc (the PACS) C-STOREs a phantom study to the node; SC + SR come back."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import pydicom

from conftest import free_port, require_tool
from node.commands.serve import Node
from node.config import load_config
from node.phantom import PhantomOptions, generate_study, write_study
from node.store import JobState
from node.validation import dciodvfy

DATA = PhantomOptions(matrix=256, slices=64, slice_spacing_mm=4.5, min_embolus_mm=10.0,
                      embolus_levels=("central", "lobar"), companions=("localizer",))


def _call(orthanc, method: str, path: str, body: object) -> object:
    req = urllib.request.Request(orthanc.url + path, data=json.dumps(body).encode(), method=method,  # noqa: S310
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310 - loopback only
        text = resp.read()
    return json.loads(text) if text else None


def test_orthanc_forwards_a_study_and_receives_the_sr_and_key_images(orthanc, tmp_path):
    storescu = require_tool("storescu")
    port = free_port()
    cfg = load_config(None, environ={}, overrides=[
        f"storage.root={tmp_path / 'var'}", "node.host=127.0.0.1", f"node.port={port}", "study.quiet_seconds=2",
        "study.max_wait_seconds=60", "model.device=cpu",
        f"destinations=[{{name: pacs, ae_title: {orthanc.ae_title}, host: 127.0.0.1, port: {orthanc.dicom_port}}}]"])
    study = generate_study(930001, pe=True, options=DATA)
    write_study(study, tmp_path / "in")
    subprocess.run([storescu, "-aec", orthanc.ae_title, "+sd", "+r", "127.0.0.1", str(orthanc.dicom_port),
                    str(tmp_path / "in")], check=True, timeout=120, env={"TCP_NODELAY": "1"})
    _call(orthanc, "PUT", "/modalities/petriage", {"AET": cfg.node.ae_title, "Host": "127.0.0.1", "Port": port})
    orthanc_study = orthanc.get("/studies")[0]
    node = Node(cfg, sweep_seconds=0.5, stop_timeout=30)
    try:
        _call(orthanc, "POST", "/modalities/petriage/store", {"Resources": [orthanc_study], "Synchronous": True})
        uid = study.identity.study_instance_uid
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            jobs = node.store.jobs_of(uid)
            if jobs and jobs[-1]["state"] in (JobState.DONE, JobState.FAILED, JobState.SKIPPED):
                break
            time.sleep(0.5)
        assert jobs and jobs[-1]["state"] == JobState.DONE, jobs
        assert "sent to pacs" in jobs[-1]["reason"]
    finally:
        node.stop()
    series = orthanc.get(f"/studies/{orthanc_study}/series?expand")
    modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
    assert modalities.count("SR") == 1 and modalities.count("OT") == 1, modalities  # SR + SC (modality OT)
    results = [s for s in series if s["MainDicomTags"].get("Modality") in ("SR", "OT")]
    assert sum(len(s["Instances"]) for s in results) == 1 + 3 + 1  # SR, 3 key images, summary
    for s in results:
        for instance in s["Instances"]:
            path = tmp_path / f"{instance}.dcm"
            path.write_bytes(orthanc.get_bytes(f"/instances/{instance}/file"))
            assert not dciodvfy(path).errors
            assert pydicom.dcmread(path).StudyInstanceUID == uid
