"""``petriage web``: run the console; ``petriage web user ...``: its local users."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from node.config import Config
from node.errors import NodeError

out = Console()
log = logging.getLogger(__name__)

web_app = typer.Typer(help="The web console: worklist, study pages, queue control behind a login.")
user_app = typer.Typer(no_args_is_help=True, help="Local users of the console (argon2-hashed passwords).")
web_app.add_typer(user_app, name="user")


def _store(ctx, create: bool = False):
    from node.commands.queue import _store as existing
    from node.store import Store, database_url

    cfg: Config = ctx.find_root().obj.config
    if create:  # the console may be set up before the node ever ran: make the store
        if cfg.store.url is None:
            Path(cfg.storage.root).mkdir(parents=True, exist_ok=True)
        return Store(database_url(cfg.storage.root, cfg.store.url))
    return existing(ctx.find_root())


def _password(given_on_stdin: bool, name: str) -> str:
    if given_on_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = typer.prompt(f"password for {name}", hide_input=True)
    if typer.prompt("again", hide_input=True) != first:
        raise NodeError("the two passwords differ")
    return first


PasswordStdin = Annotated[bool, typer.Option("--password-stdin", help="Read the password from the first line of "
                                             "standard input (for scripts) instead of asking.")]


@web_app.callback(invoke_without_command=True)
def web_cmd(ctx: typer.Context) -> None:
    """Serve the console (web.host:web.port; HTTPS with web.tls, else on a loopback address only)."""
    if ctx.invoked_subcommand is not None:
        return
    from node.logs import configure_logging
    from node.web.server import run_console

    cfg: Config = ctx.obj.config
    configure_logging(cfg.logging, role="web")
    store = _store(ctx, create=True)
    scheme = "https" if cfg.web.tls else "http"
    log.warning("petriage console on %s://%s:%d - AI triage aid, not for diagnostic use", scheme, cfg.web.host,
                cfg.web.port)
    run_console(cfg, store)


@user_app.command("add")
def user_add(ctx: typer.Context, name: str,
             role: Annotated[str, typer.Option("--role", help="viewer (sees) or admin (also acts).")] = "viewer",
             password_stdin: PasswordStdin = False) -> None:
    """Add a user of the console."""
    from node.store import utcnow
    from node.web import users

    store = _store(ctx, create=True)
    users.check_new(name, role, "x" * users.MIN_PASSWORD)
    user = users.add(store, name, role, _password(password_stdin, name))
    store.record_event(None, "web-user-added", f"{user.name} ({user.role})", utcnow())
    out.print(f"user {user.name} ({user.role}) added")


@user_app.command("list")
def user_list(ctx: typer.Context) -> None:
    """The console's users and their roles."""
    from node.web import users

    table = Table("name", "role", "created (UTC)", "password changed (UTC)")
    for u in users.listing(_store(ctx, create=True)):
        table.add_row(u["name"], u["role"], f"{u['created_at']:%Y-%m-%d %H:%M}",
                      f"{u['password_changed_at']:%Y-%m-%d %H:%M}")
    out.print(table)


@user_app.command("password")
def user_password(ctx: typer.Context, name: str, password_stdin: PasswordStdin = False) -> None:
    """Set a user's password (their open sessions end)."""
    from node.web import users

    store = _store(ctx, create=True)
    if users.get(store, name) is None:
        raise NodeError(f"no user {name!r}")
    users.set_password(store, name, _password(password_stdin, name))
    store.record_event(None, "web-user-password", name)
    out.print(f"password of {name} changed")


@user_app.command("remove")
def user_remove(ctx: typer.Context, name: str) -> None:
    """Remove a user (their open sessions end)."""
    from node.web import users

    store = _store(ctx, create=True)
    users.remove(store, name)
    store.record_event(None, "web-user-removed", name)
    out.print(f"user {name} removed")
