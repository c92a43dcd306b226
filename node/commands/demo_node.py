"""The demo's second half: the node itself on loopback, a receiving "PACS", and the studies sent to it.

The PACS is a small storage SCP (this package's own listener, AE ``DEMOPACS``, storing under the demo
folder). The node runs as ``petriage serve`` would (listener, sweep, worker process) with temporary
storage; each study is sent with C-STORE, and the clock runs from its last image leaving the sender
until the SR and key images are stored in the PACS.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_node_demo(cfg: Config, studies: list[tuple[bool, str, list[Path]]], out_dir: Path,
                  timeout: float = 600.0) -> list[DemoRow]:
    from node.commands.serve import Node
    from node.config import load_config
    from node.scp import start_scp
    from node.scu import send_files
    from node.store import JobState, Store

    pacs_port, node_port = _free_port(), _free_port()
    pacs_cfg = load_config(None, environ={}, overrides=[f"storage.root={out_dir / 'pacs'}", "node.host=127.0.0.1",
                                                        f"node.port={pacs_port}", "node.ae_title=DEMOPACS"])
    (out_dir / "pacs").mkdir(parents=True, exist_ok=True)
    pacs_store = Store(f"sqlite:///{out_dir / 'pacs' / 'pacs.db'}")
    pacs = start_scp(pacs_cfg, pacs_store, fsync=False)
    node_cfg = cfg.model_copy(update={
        "node": cfg.node.model_copy(update={"host": "127.0.0.1", "port": node_port, "allowed_calling_aets": []}),
        "storage": cfg.storage.model_copy(update={"root": out_dir / "node"}),
        "study": cfg.study.model_copy(update={"quiet_seconds": 2.0, "max_wait_seconds": 60.0}),
        "destinations": load_config(None, environ={}, overrides=[
            f"destinations=[{{name: demopacs, ae_title: DEMOPACS, host: 127.0.0.1, port: {pacs_port}}}]"]
        ).destinations,
    })
    node = Node(node_cfg, sweep_seconds=0.5, stop_timeout=60)
    rows = []
    try:
        for truth, uid, files in studies:
            send_files(files, node_cfg.destinations[0].model_copy(update={
                "name": "node", "ae_title": node_cfg.node.ae_title, "port": node_port}), calling_ae_title="DEMOSCANNER")
            sent = time.monotonic()
            while time.monotonic() - sent < timeout:
                node.supervise()
                jobs = node.store.jobs_of(uid)
                final = [j for j in jobs if j["state"] in (JobState.DONE, JobState.SKIPPED, JobState.FAILED)]
                study = pacs_store.study(uid)
                if final and (final[-1]["state"] != JobState.DONE or (study and study["instances"] >= 5)):
                    break
                time.sleep(0.1)
            seconds = time.monotonic() - sent
            job = node.store.jobs_of(uid)[-1]
            summary = json.loads(job["result"]) if job.get("result") else {}
            pngs = _pngs(pacs_store.study_files(uid), out_dir / "png", uid)
            rows.append(DemoRow(uid, truth, summary.get("series", {}).get("description", "-"),
                                summary.get("probability"), f"{job['state']}: {summary.get('decision', job['reason'])}",
                                seconds, pngs))
    finally:
        node.stop()
        pacs.shutdown()
        pacs_store.engine.dispose()
    return rows


def _pngs(files: list[Path], folder: Path, uid: str) -> list[Path]:
    """The secondary captures the PACS received, as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        if str(ds.SOPClassUID) != pydicom.uid.SecondaryCaptureImageStorage:
            continue
        target = folder / f"result-{uid[-6:]}-{int(ds.InstanceNumber)}.png"
        Image.fromarray(ds.pixel_array).save(target)
        out.append(target)
    return sorted(out)
