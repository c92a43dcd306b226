"""Run a typer app as an entry point: errors become a message and an exit code, never a traceback."""

from __future__ import annotations

import logging

import typer
from rich.console import Console
from rich.markup import escape
from typer.exceptions import TyperException

from node.errors import ConfigError

err = Console(stderr=True)


def quiet_libraries() -> None:
    """pynetdicom, APScheduler and highdicom log every association, timer run and copied module at INFO
    (pynetdicom can dump whole data sets at DEBUG): keep their warnings only."""
    for name in ("pynetdicom", "apscheduler", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_app(app: typer.Typer, argv: list[str] | None, prog_name: str,
            failures: tuple[type[Exception], ...]) -> int:
    """Exit codes: 0 ok, 1 a deliberate failure (``failures``), 2 bad usage or configuration, 130 aborted."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        result = app(args=argv, prog_name=prog_name, standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err.print("aborted")
        return 130
    except TyperException as exc:  # usage errors: bad option, missing argument
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            err.print(f"error: {escape(exc.format_message())}", highlight=False)
        return exc.exit_code
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except failures as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1
    return result if isinstance(result, int) else 0
