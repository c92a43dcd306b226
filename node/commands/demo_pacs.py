"""The demo's receiving PACS: Orthanc when it is installed, else this package's own storage SCP.

Orthanc runs from a temporary configuration on free loopback ports with ``TCP_NODELAY=1`` in its
environment (DCMTK-based peers crawl at ~20 images/s without it) and is stopped with the demo.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from node.errors import NodeError

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancPacs:
    """A throw-away Orthanc: ``ae_title``, ``port`` (DICOM) and a tiny REST client."""

    def __init__(self, folder: Path, ae_title: str = "DEMOPACS"):
        if ORTHANC is None:
            raise NodeError("Orthanc is not installed")
        self.ae_title, self.port, self.http_port = ae_title, free_port(), free_port()
        folder.mkdir(parents=True, exist_ok=True)
        config = {"Name": "petriage-demo", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
                  "DicomAet": ae_title, "DicomPort": self.port, "HttpPort": self.http_port,
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
                  "Plugins": [], "DicomModalities": {}, "HttpServerEnabled": True}
        (folder / "orthanc.json").write_text(json.dumps(config))
        self._log = (folder / "orthanc.log").open("w")
        self.proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"})
        deadline = time.monotonic() + 30
        while True:
            try:
                self.rest("GET", "/system")
                return
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise NodeError(f"Orthanc did not start (log: {folder / 'orthanc.log'})") from exc
                time.sleep(0.2)

    def rest(self, method: str, path: str, body: str | None = None) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",  # noqa: S310 - loopback only
                                     data=None if body is None else body.encode(), method=method)
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            return resp.read()

    def instance_file(self, sop_instance_uid: str) -> bytes | None:
        found = json.loads(self.rest("POST", "/tools/lookup", sop_instance_uid))
        ids = [f["ID"] for f in found if f.get("Type") == "Instance"]
        return self.rest("GET", f"/instances/{ids[0]}/file") if ids else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
