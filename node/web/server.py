"""Run the console on uvicorn: in the foreground (``petriage web``) or in a thread of the node."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from node.config import Config
from node.store import Store
from node.web.errors import WebError


@dataclass
class ConsoleServer:
    url: str
    server: object
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True  # type: ignore[attr-defined]
        self.thread.join(timeout)


def _uvicorn_config(cfg: Config, store: Store, port: int | None = None):
    import uvicorn

    from node.web.app import create_app

    tls = cfg.web.tls
    return uvicorn.Config(create_app(cfg, store), host=cfg.web.host, port=cfg.web.port if port is None else port,
                          log_level="warning", access_log=False, server_header=False,
                          ssl_certfile=str(tls.cert) if tls else None, ssl_keyfile=str(tls.key) if tls else None)


def run_console(cfg: Config, store: Store) -> None:
    """Serve until interrupted (SIGINT/SIGTERM)."""
    import uvicorn

    server = uvicorn.Server(_uvicorn_config(cfg, store))
    server.run()
    if not server.started:
        raise WebError(f"web: cannot listen on {cfg.web.host}:{cfg.web.port} (in use, or not an address of "
                       "this host)")


def start_console(cfg: Config, store: Store, port: int | None = None, timeout: float = 20.0) -> ConsoleServer:
    """Serve in a daemon thread; returns once it accepts connections (WebError if it cannot listen)."""
    import uvicorn

    server = uvicorn.Server(_uvicorn_config(cfg, store, port))
    thread = threading.Thread(target=server.run, name="petriage-console", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        server.should_exit = True
        raise WebError(f"web: cannot listen on {cfg.web.host}:{cfg.web.port if port is None else port}")
    scheme = "https" if cfg.web.tls else "http"
    return ConsoleServer(f"{scheme}://{cfg.web.host}:{server.config.port}", server, thread)
