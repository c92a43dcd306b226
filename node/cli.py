"""``petriage``: the node's command line (entry point ``main(argv) -> int``)."""

from __future__ import annotations

import logging
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from node.cli_runner import run_app
from node.commands.analyze import analyze_cmd
from node.commands.demo import demo_cmd
from node.commands.phantom import phantom_cmd
from node.commands.queue import echo_cmd, queue_app, send_cmd, status_cmd, worklist_cmd
from node.commands.serve import serve_cmd
from node.commands.web import web_app
from node.config import Config, load_config
from node.errors import NodeError

out = Console()
err = Console(stderr=True)

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="petriage: CTPA pulmonary-embolism triage node (AI triage aid, not for diagnostic use).")
config_app = typer.Typer(no_args_is_help=True, help="Inspect and check configuration files.")
app.add_typer(config_app, name="config")


class State:
    """What the top-level options chose; the config is loaded on first use, once."""

    def __init__(self, path: Path | None, overrides: list[str]):
        self.path, self.overrides = path, overrides
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.path, overrides=self.overrides)
            logging.getLogger().setLevel(self._config.logging.level)
        return self._config


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file "
                                                "(default: $PETRIAGE_CONFIG, else embedded defaults).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one key: section.key=value.")] = None,
) -> None:
    ctx.obj = State(config, set_ or [])


@app.command("version")
def version_cmd() -> None:
    """Print the installed version."""
    try:
        out.print(f"petriage {version('petriage')}")
    except PackageNotFoundError:
        out.print("petriage (not installed)")


@config_app.command("check")
def config_check(
    ctx: typer.Context,
    file: Annotated[Path | None, typer.Argument(help="File to check (default: the one the node would use).")] = None,
) -> None:
    """Print the effective configuration, or what is wrong with it (exit code 2)."""
    state: State = ctx.obj
    cfg = load_config(file, overrides=state.overrides) if file is not None else state.config
    source = file or state.path or "embedded defaults / $PETRIAGE_CONFIG"
    err.print(f"[green]configuration OK[/green] ({source})")
    out.print(cfg.to_yaml(), end="", markup=False, highlight=False)


app.command("phantom")(phantom_cmd)
app.command("demo")(demo_cmd)
app.command("analyze")(analyze_cmd)
app.command("serve")(serve_cmd)
app.add_typer(queue_app, name="queue")
app.command("worklist")(worklist_cmd)
app.command("status")(status_cmd)
app.command("echo")(echo_cmd)
app.command("send")(send_cmd)
app.add_typer(web_app, name="web")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad usage or configuration)."""
    return run_app(app, argv, "petriage", (NodeError,))


if __name__ == "__main__":
    sys.exit(main())
