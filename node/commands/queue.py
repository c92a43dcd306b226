"""The admin commands: ``petriage queue …``, ``worklist``, ``status``, ``echo``, ``send``.

They work on the node's store while the node runs. Every listing takes ``--json`` (one JSON document
on stdout, nothing else). Exit codes: 0 done; 1 not done (no such job, a state that does not allow
it, an unhealthy node for ``status``, a destination that does not answer); 2 bad usage or config.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import socket
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from node import admin
from node.config import Config, Destination
from node.errors import NodeError

out = Console()
err = Console(stderr=True)

queue_app = typer.Typer(no_args_is_help=True, help="See and change the analysis queue (works while the node runs).")

HEARTBEAT_STALE_SECONDS = 20.0


def _store(ctx: typer.Context):
    from node.store import Store, database_url

    cfg: Config = ctx.obj.config
    db = Path(cfg.storage.root) / "petriage.db"
    if cfg.store.url is None and not db.exists():
        raise NodeError(f"no node store at {db} (is storage.root right? use --config or PETRIAGE_CONFIG)")
    return Store(database_url(cfg.storage.root, cfg.store.url))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d"


def _json(data) -> None:
    print(json.dumps(data, indent=1, default=lambda v: v.isoformat() if isinstance(v, dt.datetime) else str(v)))


def _short(uid: str) -> str:
    return "…" + uid[-12:] if len(uid) > 13 else uid


STATE_COLOURS = {"failed": "red", "skipped": "yellow", "done": "green", "running": "cyan", "sending": "magenta"}


def _print_jobs(rows: list[dict], title: str) -> None:
    """Two lines per job (the reason gets a line of its own, readable at any terminal width)."""
    out.print(f"[bold]{title}[/bold]")
    for r in rows:
        p = r.get("probability")
        colour = STATE_COLOURS.get(r["state"], "white")
        probability = "-" if p is None else f"{p:.3f}"
        out.print(f"job {r['id']:<5} [{colour}]{r['state']:<9}[/{colour}] priority {r['priority']:<5} "
                  f"p {probability:<6} attempts {r['attempts']:<3} age {_age(r['age_seconds']):<6} "
                  f"study {_short(r['study_instance_uid'])}", highlight=False, soft_wrap=True)
        if r.get("reason"):
            out.print(f"          {r['reason']}", highlight=False, soft_wrap=True)


AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


@queue_app.command("list")
def queue_list(ctx: typer.Context,
               state: Annotated[list[str] | None, typer.Option("--state", "-s", help="Only jobs in this state "
                                                               "(repeatable): queued, running, sending, done, "
                                                               "skipped, failed, cancelled.")] = None,
               limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 200,
               as_json: AsJson = False) -> None:
    """Jobs, most urgent first."""
    from node.store import JobState

    bad = [s for s in state or [] if s not in {str(x) for x in JobState}]
    if bad:
        raise typer.BadParameter(f"unknown state {', '.join(bad)}; one of {', '.join(map(str, JobState))}")
    rows = admin.list_jobs(_store(ctx), state, limit)
    if as_json:
        _json(rows)
        return
    _print_jobs(rows, f"{len(rows)} job(s)" + (f" in {', '.join(state)}" if state else "") + ", most urgent first")


@queue_app.command("show")
def queue_show(ctx: typer.Context,
               ref: Annotated[str, typer.Argument(help="Job number, or StudyInstanceUID (or its last 6+ digits).")],
               as_json: AsJson = False) -> None:
    """A job (or every job of a study), its result and its timeline from the event log."""
    store = _store(ctx)
    uid, found = admin.find(store, ref)
    events = admin.timeline(store, uid)
    notes = store.notifications_of(uid)
    if as_json:
        _json({"jobs": found, "study": store.study(uid), "notifications": [
            {k: v for k, v in n.items() if k != "payload"} for n in notes], "events": events})
        return
    study = store.study(uid) or {}
    out.print(f"[bold]study[/bold] {uid}  ({study.get('instances', '?')} instances, {study.get('state', '?')}, "
              f"{'urgent' if study.get('urgent') else 'routine'})", highlight=False, soft_wrap=True)
    if not found:
        out.print("no job yet: the study is complete after study.quiet_seconds without a new instance")
    for job in found:
        out.print(f"job {job['id']}: [bold]{job['state']}[/bold], priority {job['priority']}, attempt(s) "
                  f"{job['attempts']}, created {job['created_at']:%Y-%m-%d %H:%M:%S} UTC - {job.get('reason') or ''}",
                  highlight=False, soft_wrap=True)
        if job.get("trigger"):
            out.print(f"job {job['id']}: analysed because {job['trigger']}", highlight=False, soft_wrap=True)
        if job.get("result"):
            result = json.loads(job["result"])
            series = result.get("series", {})
            out.print(f"job {job['id']}: {result['decision']}, probability {result['probability']:.3f} "
                      f"(threshold {result['threshold']:.3f}); series {series.get('description') or '?'}: "
                      f"{series.get('reason', '')}", highlight=False, soft_wrap=True)
    for n in notes:
        out.print(f"notification {n['id']} {n['channel']}: {n['state']} after {n['attempts']} attempt(s) "
                  f"{n.get('reason') or ''}", highlight=False, soft_wrap=True)
    out.print("[bold]timeline[/bold] (UTC)")
    for e in events:
        out.print(f"{e['at']:%Y-%m-%d %H:%M:%S}  {e['kind']:<15} {e['detail']}", highlight=False, soft_wrap=True)


JobId = Annotated[int, typer.Argument(help="Job number (petriage queue list).")]


@queue_app.command("retry")
def queue_retry(ctx: typer.Context, job: JobId,
                force: Annotated[bool, typer.Option(help="Also analyse a done job again.")] = False) -> None:
    """Run a failed, skipped or cancelled job again (send again if its results exist, else analyse
    again); a job waiting to re-send is sent now."""
    row = admin.retry(_store(ctx), job, force=force)
    out.print(f"job {job}: {row['state']} ({row['reason']})")


@queue_app.command("cancel")
def queue_cancel(ctx: typer.Context, job: JobId) -> None:
    """Cancel a queued, running or sending job."""
    row = admin.cancel(_store(ctx), job)
    out.print(f"job {job}: {row['state']}")


@queue_app.command("priority")
def queue_priority(ctx: typer.Context, job: JobId,
                   priority: Annotated[int, typer.Argument(help="New priority (higher runs and lists first).")]
                   ) -> None:
    """Set a job's priority (the queue order and the worklist order)."""
    row = admin.set_priority(_store(ctx), job, priority)
    out.print(f"job {job}: priority {row['priority']}")


@queue_app.command("requeue")
def queue_requeue(ctx: typer.Context,
                  failed: Annotated[bool, typer.Option("--failed", help="Every failed job: run it again.")] = False,
                  sending: Annotated[bool, typer.Option("--sending", help="Every job waiting to re-send: send "
                                                        "now (the PACS is back).")] = False) -> None:
    """Run every failed job again, or send every waiting result now."""
    from node.store import JobState

    if failed == sending:
        raise typer.BadParameter("say which jobs: --failed or --sending")
    ids = admin.requeue(_store(ctx), JobState.FAILED if failed else JobState.SENDING)
    what = "re-queued" if failed else "sending now"
    out.print(f"{what}: {len(ids)} job(s)" + (f" ({', '.join(map(str, ids))})" if ids else ""))


def _duration(text: str) -> dt.timedelta:
    match = re.fullmatch(r"(\d+)\s*([smhdw])", text.strip())
    if not match:
        raise typer.BadParameter(f"{text!r}: expected a number and a unit s, m, h, d or w (e.g. 30d)")
    n, unit = int(match.group(1)), match.group(2)
    return dt.timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit])


@queue_app.command("purge")
def queue_purge(ctx: typer.Context,
                older_than: Annotated[str, typer.Option("--older-than", help="Age such as 30d, 12h, 2w.")],
                dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would go.")] = False,
                as_json: AsJson = False) -> None:
    """Delete finished studies older than this: spool files, results, rows (the event log stays)."""
    cfg: Config = ctx.obj.config
    result = admin.purge(_store(ctx), Path(cfg.storage.root), _duration(older_than), dry_run=dry_run)
    if as_json:
        _json(result.__dict__)
        return
    verb = "would delete" if dry_run else "deleted"
    out.print(f"{verb} {len(result.studies)} study(ies): {result.instances} instances "
              f"({result.bytes / 2**20:.1f} MiB), {result.jobs} job(s)")


def worklist_cmd(ctx: typer.Context, as_json: AsJson = False,
                 limit: Annotated[int, typer.Option(min=1, help="At most this many rows.")] = 50) -> None:
    """Studies in reading order: PE suspected first (most probable first), then pending, then the rest."""
    rows = admin.worklist(_store(ctx), limit=limit)
    if as_json:
        _json(rows)
        return
    table = Table(title="worklist (AI triage aid - not for diagnostic use)", title_justify="left")
    table.add_column("#", justify="right", min_width=2, no_wrap=True)
    table.add_column("study", no_wrap=True)
    table.add_column("triage", no_wrap=True, min_width=16)
    table.add_column("p", justify="right", no_wrap=True)
    table.add_column("prio", justify="right", no_wrap=True)
    table.add_column("job", no_wrap=True)
    table.add_column("received", justify="right", no_wrap=True)
    styles = {"PE suspected": "bold red", "PE not suspected": "green", "pending": ""}
    for i, r in enumerate(rows, 1):
        p = r["probability"]
        label = admin.triage_label(r)
        style = styles.get(label, "yellow")
        triage = f"[{style}]{label}[/{style}]" if style else label
        table.add_row(str(i), _short(r["study_instance_uid"])[-10:], triage, "-" if p is None else f"{p:.2f}",
                      str(r["priority"]), f"{r['id']} {r['state']}", _age(r["received_age_seconds"]))
    out.print(table)


def _beat_text(age: float | None) -> str:
    return "no heartbeat recorded" if age is None else f"last heartbeat {_age(age)} ago"


def _listening(host: str, port: int) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)  # noqa: S104
    try:
        with socket.create_connection((target, port), timeout=2):
            return True
    except OSError:
        return False


def status_cmd(ctx: typer.Context, as_json: AsJson = False) -> None:
    """Is the node healthy? Listener, worker, queue, disk, model. Exit code 1 when something is down."""
    from node.store import naive_utc, utcnow

    cfg: Config = ctx.obj.config
    store = _store(ctx)
    now = utcnow()
    this_node = cfg.node.name or socket.gethostname()
    beats = store.heartbeats(node=this_node)  # this node's listener and worker

    def beat_age(name: str) -> float | None:
        return (naive_utc(now) - naive_utc(beats[name]["at"])).total_seconds() if name in beats else None

    summary = store.queue_summary(now)
    notes: dict[str, int] = {}
    for (_, state), count in summary["notifications"].items():
        notes[state] = notes.get(state, 0) + count
    usage = shutil.disk_usage(cfg.storage.root)
    listener_age, worker_age = beat_age("listener"), beat_age("worker")
    listening = _listening(cfg.node.host, cfg.node.port)
    listener_ok = listening and listener_age is not None and listener_age < HEARTBEAT_STALE_SECONDS
    worker_ok = worker_age is not None and worker_age < HEARTBEAT_STALE_SECONDS
    disk_ok = usage.free >= cfg.storage.min_free_mb * 2**20
    model = beats.get("worker", {}).get("detail") or {}
    role = cfg.node.role  # judged on what this node runs: a worker node has no listener, a receiver no worker
    report: dict[str, Any] = {
        "healthy": (listener_ok or role == "worker") and (worker_ok or role == "receiver") and disk_ok,
        "role": role,
        "listener": {"ok": listener_ok, "accepting_connections": listening, "heartbeat_age_seconds": listener_age,
                     "ae_title": cfg.node.ae_title, "port": cfg.node.port},
        "worker": {"ok": worker_ok, "heartbeat_age_seconds": worker_age, "owner": model.get("owner")},
        "queue": summary["jobs"] | {"oldest_queued_age_seconds": summary["oldest_queued_age_seconds"]},
        "notifications": notes,
        "disk": {"ok": disk_ok, "free_mib": usage.free // 2**20, "floor_mib": cfg.storage.min_free_mb,
                 "path": str(cfg.storage.root)},
        "model": {k: model.get(k) for k in ("name", "version", "stage1_precision", "providers")}
        if model else {"bundle": str(cfg.model.bundle), "note": "no worker heartbeat yet"},
        "housekeeping": {"heartbeat_age_seconds": beat_age("housekeeping"),
                         **(beats.get("housekeeping", {}).get("detail") or {}),
                         "retention_days": cfg.retention.days},
        "node": this_node,
        "nodes": [{"node": b["node"], "component": b["component"], "host": b["host"], "pid": b["pid"],
                   "heartbeat_age_seconds": (age := (naive_utc(now) - naive_utc(b["at"])).total_seconds()),
                   "ok": age < HEARTBEAT_STALE_SECONDS} for b in store.node_heartbeats()
                  if b["component"] in ("listener", "worker")],
    }
    if as_json:
        _json(report)
    else:
        def mark(ok: bool) -> str:
            return "[green]ok[/green]" if ok else "[bold red]DOWN[/bold red]"

        if role != "worker":
            out.print(f"listener  {mark(listener_ok)}  {cfg.node.ae_title} on port {cfg.node.port}, "
                      f"{'accepting connections' if listening else 'not accepting connections'}, "
                      f"{_beat_text(listener_age)}", highlight=False, soft_wrap=True)
        if role != "receiver":
            out.print(f"worker    {mark(worker_ok)}  {_beat_text(worker_age)}", highlight=False, soft_wrap=True)
        q = report["queue"]
        out.print(f"queue     {q['queued']} queued, {q['running']} running, {q['sending']} sending, "
                  f"{q['failed']} failed; oldest queued {_age(q['oldest_queued_age_seconds'])}", highlight=False)
        out.print(f"notify    {notes.get('pending', 0)} pending, {notes.get('failed', 0)} failed", highlight=False)
        out.print(f"disk      {'[green]ok[/green]' if disk_ok else '[bold red]LOW[/bold red]'}  "
                  f"{usage.free / 2**30:.1f} GiB free (floor {cfg.storage.min_free_mb} MiB)", highlight=False)
        h = report["housekeeping"]
        if h["heartbeat_age_seconds"] is None:
            out.print("housekeep no run recorded yet", highlight=False)
        else:
            out.print(f"housekeep {_age(h['heartbeat_age_seconds'])} ago: {h.get('removed_for_retention', 0)} "
                      f"study(ies) past {h['retention_days'] or 'no'} day(s) retention, "
                      f"{h.get('removed_for_disk_pressure', 0)} for disk space, "
                      f"{(h.get('bytes_removed') or 0) / 2**20:.1f} MiB", highlight=False)
        m = report["model"]
        out.print(f"model     {m.get('name') or m.get('bundle')} {m.get('version') or ''} "
                  f"{m.get('stage1_precision') or ''} {', '.join(m.get('providers') or [])}", highlight=False)
        for n in report["nodes"]:  # every node sharing the store, this one included
            here = " (this node)" if n["node"] == this_node else ""
            out.print(f"node      {'[green]ok[/green]' if n['ok'] else '[yellow]silent[/yellow]'}  {n['node']}{here} "
                      f"{n['component']} on {n['host']} pid {n['pid']}, {_beat_text(n['heartbeat_age_seconds'])}",
                      highlight=False, soft_wrap=True)
    if not report["healthy"]:
        raise typer.Exit(1)


def _destination(cfg: Config, name: str) -> Destination:
    for d in cfg.destinations:
        if d.name == name:
            return d
    match = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d+)", name)
    if match:
        return Destination(name="adhoc", ae_title=match.group(1), host=match.group(2), port=int(match.group(3)))
    known = ", ".join(d.name for d in cfg.destinations) or "none configured"
    raise NodeError(f"no destination {name!r} (configured: {known}; or give AE@host:port)")


DestArg = Annotated[str, typer.Argument(help="A destination name from the config, or AE@host:port.")]


def echo_cmd(ctx: typer.Context, dest: DestArg) -> None:
    """C-ECHO a destination, or query a DICOMweb one (is the PACS reachable and does it accept us?)."""
    from node.scu import echo
    from node.stow import qido_ping

    cfg: Config = ctx.obj.config
    destination = _destination(cfg, dest)
    if destination.kind == "dicomweb":
        seconds = qido_ping(destination)
        out.print(f"{destination.where}: QIDO-RS answered in {seconds * 1000:.0f} ms", highlight=False)
        return
    seconds = echo(destination, calling_ae_title=cfg.node.ae_title)
    out.print(f"{destination.where}: C-ECHO success in {seconds * 1000:.0f} ms", highlight=False)


def send_cmd(ctx: typer.Context,
             path: Annotated[Path, typer.Argument(help="A DICOM file or a folder of them.", exists=True)],
             to: Annotated[str, typer.Option("--to", help="Destination name, or AE@host:port.")]) -> None:
    """C-STORE (or STOW-RS, for a DICOMweb destination) files to a destination, e.g. a result from the outbox."""
    from node.scu import send_files
    from node.stow import stow_files

    cfg: Config = ctx.obj.config
    destination = _destination(cfg, to)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise NodeError(f"{path}: no files")
    if destination.kind == "dicomweb":
        delivery = stow_files(files, destination)
    else:
        delivery = send_files(files, destination, calling_ae_title=cfg.node.ae_title)
    out.print(f"{len(delivery.acknowledged)} of {len(files)} instance(s) stored by {destination.where}"
              + ("; refused: " + ", ".join(f"{k} ({n})" for k, n in sorted(delivery.refused.items()))
                 if delivery.refused else ""), highlight=False)
