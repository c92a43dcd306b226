"""Shared fixtures: real DICOM peers (skip with a reason on a laptop, fail under CI=true), free ports,
a real Orthanc, and small phantom studies generated once per session."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pgcluster import PostgresCluster, postgres_bindir, throwaway_cluster

from node.phantom import PhantomOptions, PhantomStudy, generate_study

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)

#: Small enough for a fast suite, fine enough for segmental emboli to show.
SMALL = PhantomOptions(matrix=128, slices=48, slice_spacing_mm=6.0)


def require_peer(available: bool, what: str) -> None:
    """Skip (developer machine) or fail (CI) when a real peer is missing."""
    if available:
        return
    message = f"{what} is not installed (make test installs it with apt-get)"
    if IN_CI:
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require_peer(path is not None, name)
    assert path is not None
    return path


def pixelmed_sr_check(path: Path) -> str:
    """PixelMed's DicomSRValidator (its template checks, TID 1500 included) on one SR file: its report."""
    require_peer(PIXELMED_JAR.exists(), "PixelMed (pixelmed-apps)")
    proc = subprocess.run([require_tool("java"), "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
                           "-Djdk.xml.xpathTotalOpLimit=0", "-cp", str(PIXELMED_JAR),
                           "com.pixelmed.validate.DicomSRValidator", str(path)], capture_output=True, text=True,
                          timeout=300)
    return proc.stdout + proc.stderr


def to_multi_frame(series_dir: Path, out: Path) -> Path:
    """A series as one Legacy Converted Enhanced CT instance, made by PixelMed (a converter no one here wrote)."""
    require_peer(PIXELMED_JAR.exists(), "PixelMed (pixelmed-apps)")
    out.mkdir()
    proc = subprocess.run([require_tool("java"), "-cp", str(PIXELMED_JAR), "com.pixelmed.dicom.MultiFrameImageFactory",
                           str(series_dir), str(out)], capture_output=True, text=True, timeout=300)
    made = list(out.iterdir())
    assert proc.returncode == 0 and len(made) == 1, proc.stdout + proc.stderr
    return made[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class OrthancServer:
    ae_title: str
    dicom_port: int
    http_port: int
    login: tuple[str, str] | None = None  # HTTP basic authentication, when Orthanc asks for it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _request(self, path: str) -> urllib.request.Request:
        req = urllib.request.Request(self.url + path)  # noqa: S310 - loopback only
        if self.login:
            token = base64.b64encode(f"{self.login[0]}:{self.login[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        return req

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self._request(path), timeout=10) as resp:  # noqa: S310 - loopback only
            return json.loads(resp.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self._request(path), timeout=30) as resp:  # noqa: S310
            return resp.read()


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@contextlib.contextmanager
def running_orthanc(folder: Path, *, dicomweb: bool = False, http_port: int | None = None,
                    dicom_port: int | None = None, users: dict[str, str] | None = None) -> Iterator[OrthancServer]:
    """A real Orthanc on loopback (free ports unless given), with TCP_NODELAY=1 (DCMTK crawls without it);
    ``dicomweb``: with Debian's DICOMweb plugin, serving ``/dicom-web``; ``users``: HTTP basic
    authentication with these users (the fixture's own calls use the first)."""
    require_peer(ORTHANC is not None, "Orthanc")
    if dicomweb:
        require_peer(DICOMWEB_PLUGIN.exists(), "Orthanc's DICOMweb plugin (orthanc-dicomweb)")
    server = OrthancServer("ORTHANC", dicom_port or free_port(), http_port or free_port(),
                           next(iter(users.items())) if users else None)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "petriage-test", "StorageDirectory": str(folder / "orthanc-db"),
        "IndexDirectory": str(folder / "orthanc-db"), "DicomAet": server.ae_title,
        "DicomPort": server.dicom_port, "HttpPort": server.http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {}, "DicomCheckCalledAet": False,
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
        "DicomModalities": {}, "HttpServerEnabled": True, "StableAge": 1,
        **({"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}} if dicomweb else {}),
    }
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("w")
    proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "TCP_NODELAY": "1"})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server.get("/system")
                break
            except OSError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (folder / "orthanc.log").read_text()[-2000:]
                    raise RuntimeError(f"Orthanc did not start: {tail}") from exc
                time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A real Orthanc on free loopback ports."""
    with running_orthanc(tmp_path) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A real PostgreSQL cluster made by initdb for this test session and removed after it."""
    bindir = postgres_bindir()
    require_peer(bindir is not None, "PostgreSQL (initdb, pg_ctl)")
    if os.geteuid() == 0:
        require_peer(subprocess.run(["id", "postgres"], capture_output=True).returncode == 0,
                     "the postgres system user (Debian's postgresql package)")
    with throwaway_cluster(free_port()) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def positive_study() -> PhantomStudy:
    return generate_study(101, pe=True, options=SMALL)


@pytest.fixture(scope="session")
def negative_study() -> PhantomStudy:
    return generate_study(202, pe=False, options=SMALL)
