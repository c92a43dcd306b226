"""A node on loopback for the operations tests: its config file with free ports, storescu into it,
waiting for its jobs; and real listeners: a recording PACS (pynetdicom), an HL7 MLLP server (hl7apy,
a library no one here wrote) and a webhook receiver (http.server)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import yaml
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from conftest import free_port, require_tool
from node.commands.serve import Node
from node.store import FINAL_STATES


@dataclass
class Stored:
    sop_instance_uid: str
    study_instance_uid: str
    modality: str
    priority: int
    at: float


@dataclass
class RecordingPacs:
    """A storage SCP that keeps every C-STORE it answers (duplicates included), with its request Priority.
    It takes every storage SOP class but ``refuse`` (SOP Class UIDs), uncompressed only (pynetdicom's
    default transfer syntaxes); ``datasets`` keeps what it received, by SOP Instance UID."""

    ae_title: str = "RECPACS"
    refuse: tuple[str, ...] = ()
    received: list[Stored] = field(default_factory=list)
    datasets: dict[str, pydicom.Dataset] = field(default_factory=dict)
    server: object = None
    port: int = 0

    def start(self, port: int, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> RecordingPacs:
        ae = AE(ae_title=self.ae_title)
        for context in StoragePresentationContexts:
            if context.abstract_syntax not in self.refuse:
                ae.add_supported_context(context.abstract_syntax)
        ae.add_supported_context(Verification)
        lock = threading.Lock()

        def on_store(event):
            ds = event.dataset
            with lock:
                self.received.append(Stored(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID),
                                            str(getattr(ds, "Modality", "")), int(event.request.Priority),
                                            time.monotonic()))
                ds.file_meta = event.file_meta
                self.datasets[str(ds.SOPInstanceUID)] = ds
            return 0x0000

        self.port = port
        self.server = ae.start_server((host, port), block=False, ssl_context=ssl_context,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])
        return self

    def of_study(self, uid: str) -> list[Stored]:
        return [s for s in self.received if s.study_instance_uid == uid]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


class _Recorder(AbstractHandler):
    received: list[str] = []
    answer = "AA"

    def reply(self) -> str:
        msg = parse_message(self.incoming_message, find_groups=False)
        type(self).received.append(self.incoming_message)
        ack = Message("ACK", version="2.5.1")
        ack.msh.msh_3 = "RIS"
        ack.msh.msh_9 = "ACK^R01^ACK"
        ack.msh.msh_10 = "ack-" + str(msg.msh.msh_10.value)
        ack.msh.msh_11 = "P"
        ack.msa.msa_1 = type(self).answer
        ack.msa.msa_2 = str(msg.msh.msh_10.value)
        return ack.to_mllp()  # hl7apy writes the reply as given: the handler frames it


class Hl7Listener:
    """An MLLP server that ACKs ORU^R01 with ``answer`` (AA by default) and keeps each message."""

    def __init__(self, port: int, answer: str = "AA"):
        self.recorder = type("Recorder", (_Recorder,), {"received": [], "answer": answer})
        self.server = MLLPServer("127.0.0.1", port, {"ORU^R01^ORU_R01": (self.recorder,)})
        self.port = port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def received(self) -> list[str]:
        return self.recorder.received

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class WebhookListener:
    """An HTTP server that answers ``fail_first`` POSTs with 503, then 204, and keeps each JSON body."""

    def __init__(self, port: int, fail_first: int = 0):
        self.bodies: list[dict] = []
        self.attempts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                outer.attempts += 1
                if outer.attempts <= fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                outer.bodies.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def patient_identity(ds: pydicom.Dataset) -> list[str]:
    """The strings that identify the patient: they must never appear in logs or webhooks."""
    name = str(ds.PatientName)
    return [s for s in (name, name.replace("^", " "), str(ds.PatientID), str(ds.PatientBirthDate)) if s]


def write_config(tmp_path: Path, **sections) -> Path:
    """A node config file on loopback with free ports; ``sections`` are merged over it."""
    data = {"node": {"host": "127.0.0.1", "port": free_port()}, "storage": {"root": str(tmp_path / "var")},
            "study": {"quiet_seconds": 1.0, "max_wait_seconds": 60.0}, "model": {"device": "cpu"},
            "metrics": {"port": 0}, "destinations": []}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "petriage.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def storescu(cfg, folder: Path) -> None:
    subprocess.run([require_tool("storescu"), "-aec", cfg.node.ae_title, "+sd", "+r", "127.0.0.1",
                    str(cfg.node.port), str(folder)], check=True, timeout=120, env={"TCP_NODELAY": "1"},
                   capture_output=True)


def wait_for(node: Node, uids: list[str], seconds: float = 180, states=FINAL_STATES) -> dict[str, list[dict]]:
    deadline = time.monotonic() + seconds
    while True:
        node.supervise()
        jobs = {u: node.store.jobs_of(u) for u in uids}
        if all(j and j[-1]["state"] in states for j in jobs.values()):
            return jobs
        assert time.monotonic() < deadline, jobs
        time.sleep(0.2)


def start_listener(root: Path, *overrides: str, fsync: bool = True):
    """The node's listener alone on a free loopback port with its store under ``root``; returns
    (config, store, server); call ``server.shutdown()``."""
    from node.config import load_config
    from node.scp import start_scp
    from node.store import Store, database_url

    cfg = load_config(None, environ={}, overrides=[f"storage.root={root}", "node.host=127.0.0.1",
                                                   f"node.port={free_port()}", *overrides])
    root.mkdir(parents=True, exist_ok=True)
    store = Store(database_url(root))
    return cfg, store, start_scp(cfg, store, fsync=fsync)


def accepts(host: str, port: int) -> bool:
    """Something listens on host:port (a TCP connection is accepted)."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def stop_process_groups(procs: list[subprocess.Popen], timeout: float = 60) -> None:
    """SIGTERM each node started in its own session (the whole group: listener, workers), then wait."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        p.wait(timeout)
