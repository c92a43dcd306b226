"""A throwaway PostgreSQL cluster (initdb and pg_ctl, never as root, trust authentication on loopback),
for the tests (the ``postgres`` fixture) and for benchmarks/load.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def postgres_bindir() -> Path | None:
    """Debian keeps initdb and pg_ctl under /usr/lib/postgresql/<version>/bin, off the PATH."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def _as_postgres(command: list[str]) -> subprocess.CompletedProcess:
    """Run a PostgreSQL server program: never as root (initdb refuses), as the postgres user then."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)


@dataclass
class PostgresCluster:
    """A throwaway PostgreSQL cluster on a free loopback port."""

    folder: Path
    port: int
    user: str = "petriage"

    def database(self, name: str) -> str:
        """Create database ``name`` (fresh) and return its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"

    def pg_ctl(self, *args: str) -> None:
        """pg_ctl on this cluster; the server's output goes to its log (never to our pipes)."""
        bindir = postgres_bindir()
        assert bindir is not None
        _as_postgres([str(bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-l", str(self.folder / "server.log"),
                      *args])

    def restart(self) -> None:
        """Stop the server (closing every client connection) and start it again on the same port."""
        self.pg_ctl("-m", "fast", "-w", "restart")


@contextlib.contextmanager
def throwaway_cluster(port: int, listen: str = "127.0.0.1", trusted: str | None = None) -> Iterator[PostgresCluster]:
    """initdb under /tmp (the postgres user must reach it), start on ``port``; stopped and removed after.
    ``listen``: listen_addresses; ``trusted``: a network (CIDR) whose clients are let in too."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL (initdb, pg_ctl) is not installed (make test installs it)")
    folder = Path(tempfile.mkdtemp(prefix="petriage-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    cluster = PostgresCluster(folder, port)
    _as_postgres([str(bindir / "initdb"), "-D", str(folder / "data"), "-A", "trust", "-U", cluster.user,
                  "-E", "UTF8", "--no-sync"])
    if trusted:
        with (folder / "data" / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {trusted} trust\n")
    options = f"-p {cluster.port} -k {folder} -c listen_addresses={listen}"
    try:
        cluster.pg_ctl("-o", options, "-w", "start")
        yield cluster
    finally:
        try:
            cluster.pg_ctl("-m", "fast", "-w", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(folder, ignore_errors=True)
