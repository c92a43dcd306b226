"""The demo's second half: the node itself on loopback, a receiving PACS, and the studies sent to it.

The PACS is Orthanc when it is installed (``node/commands/demo_pacs.py``), otherwise this package's
own listener as a small storage SCP; either way AE ``DEMOPACS``, storing under the demo folder. The
node runs as ``petriage serve`` would (listener, sweep, worker process) with temporary storage; each
study is sent with C-STORE, and the clock runs from its last image leaving the sender until the
results are acknowledged by the PACS (the job is done only then).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
from PIL import Image

from node.config import Config


@dataclass
class DemoRow:
    study_instance_uid: str
    truth: bool
    series: str
    probability: float | None
    decision: str
    seconds: float
    pngs: list[Path]
    arrived: str = "-"  # the result objects the PACS holds, by kind


def run_node_demo(cfg: Config, studies: list[tuple[bool, str, list[Path]]], out_dir: Path,
                  timeout: float = 600.0) -> tuple[str, list[DemoRow]]:
    """Run the node and a PACS, send ``studies`` (truth, StudyInstanceUID, files); returns (PACS name, rows)."""
    from node.commands.demo_pacs import ORTHANC, OrthancPacs, free_port
    from node.commands.serve import Node
    from node.config import load_config
    from node.scp import start_scp
    from node.scu import send_files
    from node.store import FINAL_STATES, JobState, Store

    node_port = free_port()
    orthanc = OrthancPacs(out_dir / "orthanc") if ORTHANC else None
    pacs_store, pacs = None, None
    if orthanc is not None:
        pacs_name, pacs_port = f"Orthanc ({ORTHANC})", orthanc.port
    else:
        pacs_port = free_port()
        pacs_cfg = load_config(None, environ={}, overrides=[f"storage.root={out_dir / 'pacs'}",
                                                            "node.host=127.0.0.1", f"node.port={pacs_port}",
                                                            "node.ae_title=DEMOPACS"])
        (out_dir / "pacs").mkdir(parents=True, exist_ok=True)
        pacs_store = Store(f"sqlite:///{out_dir / 'pacs' / 'pacs.db'}")
        pacs = start_scp(pacs_cfg, pacs_store, fsync=False)
        pacs_name = "petriage storage SCP (Orthanc is not installed)"
    node_cfg = cfg.model_copy(update={
        "node": cfg.node.model_copy(update={"host": "127.0.0.1", "port": node_port, "allowed_calling_aets": []}),
        "storage": cfg.storage.model_copy(update={"root": out_dir / "node"}),
        "study": cfg.study.model_copy(update={"quiet_seconds": 2.0, "max_wait_seconds": 60.0}),
        "metrics": cfg.metrics.model_copy(update={"port": 0}),  # a running node may hold the metrics port
        "destinations": load_config(None, environ={}, overrides=[
            f"destinations=[{{name: demopacs, ae_title: DEMOPACS, host: 127.0.0.1, port: {pacs_port}}}]"]
        ).destinations,
    })
    rows = []
    try:
        node = Node(node_cfg, sweep_seconds=0.5, stop_timeout=60)
        try:
            to_node = node_cfg.destinations[0].model_copy(update={"name": "node", "ae_title": node_cfg.node.ae_title,
                                                                  "port": node_port})
            for truth, uid, files in studies:
                send_files(files, to_node, calling_ae_title="DEMOSCANNER")
                sent = time.monotonic()
                while time.monotonic() - sent < timeout:
                    node.supervise()
                    jobs = node.store.jobs_of(uid)
                    if jobs and all(j["state"] in FINAL_STATES for j in jobs):
                        break
                    time.sleep(0.1)
                seconds = time.monotonic() - sent
                job = node.store.jobs_of(uid)[-1]
                summary = json.loads(job["result"]) if job.get("result") else {}
                pngs: list[Path] = []
                arrived = "-"
                if job["state"] == JobState.DONE and job.get("outbox"):
                    pngs, arrived = _arrived(Path(job["outbox"]), out_dir / "png", uid, orthanc, pacs_store)
                rows.append(DemoRow(uid, truth, summary.get("series", {}).get("description", "-"),
                                    summary.get("probability"),
                                    f"{job['state']}: {summary.get('decision', job['reason'])}", seconds, pngs,
                                    arrived))
        finally:
            node.stop()
    finally:
        if orthanc is not None:
            orthanc.stop()
        if pacs is not None and pacs_store is not None:
            pacs.shutdown()
            pacs_store.engine.dispose()
    return pacs_name, rows


def _arrived(outbox: Path, folder: Path, uid: str, orthanc, pacs_store) -> tuple[list[Path], str]:
    """Which of the sent objects the PACS holds (read back from it), by kind; the secondary captures as PNG."""
    from node.delivery import KINDS

    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    held: Counter[str] = Counter()
    for sent in sorted(outbox.glob("*.dcm")):
        header = pydicom.dcmread(sent, stop_before_pixels=True)
        if orthanc is not None:
            data = orthanc.instance_file(str(header.SOPInstanceUID))
            if data is None:
                continue
            ds = pydicom.dcmread(BytesIO(data))
        else:
            stored = [p for p in pacs_store.study_files(uid) if p.stem == str(header.SOPInstanceUID)]
            if not stored:
                continue
            ds = pydicom.dcmread(stored[0])
        held[KINDS.get(str(ds.SOPClassUID), "other").upper()] += 1
        if str(header.SOPClassUID) != pydicom.uid.SecondaryCaptureImageStorage:
            continue
        target = folder / f"result-{uid[-6:]}-{int(ds.InstanceNumber)}.png"
        Image.fromarray(ds.pixel_array).save(target)
        out.append(target)
    return sorted(out), ", ".join(f"{k} {n}" for k, n in sorted(held.items())) or "none"
