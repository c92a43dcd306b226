"""``petriage demo``: the main job on the embedded defaults, shown end to end.

It makes one PE-positive and one PE-negative synthetic CTPA study with their companion series, writes
them as DICOM under the storage root, validates every file with dciodvfy when it is installed, writes
PNG views, then starts the node on loopback with temporary storage and a small receiving PACS, sends
both studies by C-STORE, waits for the results (SEG, SR, key images, KOS) to reach the PACS, prints what came back and
how long it took, writes the key images as PNG, and stops everything.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from node.phantom import COMPANIONS, HU_RANGE, PhantomOptions, Structure, generate_study, write_study
from node.phantom.preview import write_previews
from node.validation import dciodvfy, dciodvfy_available

out = Console()
SHOWN = (Structure.LUNG, Structure.PULMONARY_ARTERY, Structure.EMBOLUS, Structure.PULMONARY_VEIN,
         Structure.AORTA, Structure.FLOW_ARTEFACT, Structure.LYMPH_NODE)


def demo_cmd(
    ctx: typer.Context,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder (default: <storage.root>/demo).")] = None,
    matrix: Annotated[int, typer.Option(help="Rows and columns.")] = 512,
    slices: Annotated[int, typer.Option(help="Slices of the CTPA series.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the positive study (the negative one uses seed+1).")] = 2026,
) -> int:
    """Make, validate and show a PE-positive and a PE-negative synthetic CTPA study."""
    cfg = ctx.obj.config
    out_dir = out_dir or cfg.storage.root / "demo"
    options = PhantomOptions(matrix=matrix, slices=slices, slice_spacing_mm=300.0 / slices,
                             companions=COMPANIONS)
    out.rule("[bold]petriage demo[/bold] - synthetic data, AI triage aid, not for diagnostic use")
    out.print(f"configuration: {ctx.obj.path or 'embedded defaults'}; output: {out_dir}")
    table = Table(title="synthetic CTPA studies")
    for col in ("study", "PE", "emboli (level, size)", "PE slices", "series", "seconds"):
        table.add_column(col)
    hu_table = Table(title="mean HU of each structure's core (specification in brackets)")
    hu_table.add_column("structure")
    files: list[Path] = []
    pngs: list[Path] = []
    studies_sent: list[tuple[bool, str, list[Path]]] = []
    stats = []
    for pe, study_seed in ((True, seed), (False, seed + 1)):
        start = time.perf_counter()
        with out.status(f"rendering {'PE-positive' if pe else 'PE-negative'} study ({matrix}x{matrix}x{slices})"):
            study = generate_study(study_seed, pe=pe, options=options)
            written = write_study(study, out_dir / "dicom")
            pngs += write_previews(study, out_dir / "png", prefix="positive" if pe else "negative")
        seconds = time.perf_counter() - start
        files += [p for paths in written.values() for p in paths]
        studies_sent.append((study.pe_present, study.identity.study_instance_uid,
                             [p for paths in written.values() for p in paths]))
        stats.append(study.structure_hu())
        emboli = ", ".join(f"{e.level} {e.size_mm:.0f} mm" for e in study.emboli) or "-"
        table.add_row(study.identity.study_instance_uid[-10:], "yes" if study.pe_present else "no", emboli,
                      f"{int(study.slice_labels.sum())}/{len(study.grid.zs)}",
                      ", ".join(f"{k} {len(v)}" for k, v in written.items()), f"{seconds:.1f}")
        hu_table.add_column("PE-positive" if pe else "PE-negative", justify="right")
    for s in SHOWN:
        lo, hi = HU_RANGE[s]
        hu_table.add_row(f"{s.name.lower().replace('_', ' ')} [{lo:.0f}, {hi:.0f}]",
                         *(f"{st[s][0]:.0f} +/- {st[s][1]:.0f}" if s in st else "-" for st in stats))
    out.print(table)
    out.print(hu_table)
    status = 0
    if dciodvfy_available():
        with out.status(f"validating {len(files)} files with dciodvfy"):
            verdicts = [dciodvfy(p) for p in files]
        errors = sum(len(v.errors) for v in verdicts)
        warnings = sum(len(v.warnings) for v in verdicts)
        colour = "green" if errors == 0 else "red"
        out.print(f"dciodvfy: [{colour}]{errors} errors[/{colour}], {warnings} warnings in {len(files)} files")
        for v in verdicts:
            for line in v.errors[:3]:
                out.print(f"  {v.path.name}: {line}", markup=False)
        status = 1 if errors else 0
    else:
        out.print("dciodvfy not installed: DICOM validation skipped (make test installs it)")
    out.print("PNG views: " + ", ".join(str(p) for p in pngs))
    _serve_and_send(cfg, studies_sent, out_dir)
    return status


def _serve_and_send(cfg, studies: list[tuple[bool, str, list[Path]]], out_dir: Path) -> None:
    """Run the node on loopback, send both studies, and show what came back to the PACS."""
    from node.bundle import load_bundle
    from node.commands.demo_node import run_node_demo

    m = load_bundle(cfg.model.bundle).manifest  # verified here; the worker process builds the sessions
    out.print(f"model {m.name} {m.version} (device {cfg.model.device}, precision {cfg.model.precision})"
              + (" - synthetic training data, not for clinical use" if m.synthetic_training_data else ""),
              soft_wrap=True)
    with out.status("node on loopback: receiving, completing, analysing, sending SEG + SR + key images + KOS"):
        pacs_name, rows = run_node_demo(cfg, studies, out_dir)
    table = Table(title=f"the node: C-STORE in, results out to the PACS: {pacs_name}")
    for col in ("study", "truth", "series chosen", "probability", "decision", "last image -> results in PACS"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.study_instance_uid[-10:], "PE" if r.truth else "no PE", r.series,
                      "-" if r.probability is None else f"{r.probability:.3f}", r.decision, f"{r.seconds:.1f} s")
    out.print(table)
    for r in rows:
        out.print(f"study ...{r.study_instance_uid[-10:]}: the PACS holds {r.arrived}", highlight=False)
    out.print("result images (as the PACS received them): " + ", ".join(str(p) for r in rows for p in r.pngs))
    _console_hint(cfg, out_dir / "node")
    out.print("AI triage aid - not for diagnostic use.")


def _console_hint(cfg, root: Path) -> None:
    """The demo's store stays: give it a console user with a fresh random password, say how to open it."""
    import secrets

    from node.store import Store, database_url
    from node.web import users

    store = Store(database_url(root, None))
    password = secrets.token_urlsafe(12)
    if users.get(store, "demo") is None:
        users.add(store, "demo", "admin", password)
    else:
        users.set_password(store, "demo", password)
    store.engine.dispose()
    out.print(f"web console on the demo's store: [bold].venv/bin/petriage --set storage.root={root} web[/bold], then "
              f"http://127.0.0.1:{cfg.web.port}/ as user [bold]demo[/bold], password [bold]{password}[/bold] "
              "(new at every demo)", soft_wrap=True, highlight=False)
