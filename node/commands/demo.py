"""``petriage demo``: the main job on the embedded defaults, shown end to end.

For now (the node itself is not built yet) it makes one PE-positive and one PE-negative synthetic
CTPA study with their companion series, writes them as DICOM under the storage root, validates every
file with dciodvfy when it is installed, writes PNG views, and prints what it did.
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
    ctpa: list[tuple[bool, list[Path]]] = []
    stats = []
    for pe, study_seed in ((True, seed), (False, seed + 1)):
        start = time.perf_counter()
        with out.status(f"rendering {'PE-positive' if pe else 'PE-negative'} study ({matrix}x{matrix}x{slices})"):
            study = generate_study(study_seed, pe=pe, options=options)
            written = write_study(study, out_dir / "dicom")
            pngs += write_previews(study, out_dir / "png", prefix="positive" if pe else "negative")
        seconds = time.perf_counter() - start
        files += [p for paths in written.values() for p in paths]
        ctpa.append((study.pe_present, written["ctpa"]))
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
    _analyse(cfg, ctpa)
    out.print("The DICOM listener stores what it receives (node/scp.py); study assembly, the worker and sending "
              "SC + SR back come next. This demo runs the model offline, as `petriage analyze` does.")
    return status


def _analyse(cfg, ctpa: list[tuple[bool, list[Path]]]) -> None:
    """Run the configured bundle on each CTPA series, as `petriage analyze` would."""
    from node.inference import Engine
    from node.series import index_series

    engine = Engine(cfg.model.bundle, device=cfg.model.device, precision=cfg.model.precision,
                    threads=cfg.model.threads or None)
    m = engine.describe()
    out.print(f"model {m['name']} {m['version']} ({m['stage1_precision']}, {', '.join(m['providers'])})"
              + (" - synthetic training data, not for clinical use" if m["synthetic_training_data"] else ""),
              soft_wrap=True)
    table = Table(title="the bundled model on each CTPA series")
    for col in ("truth", "slices", "probability", "threshold", "decision", "key slices", "seconds"):
        table.add_column(col)
    for pe, paths in ctpa:
        with out.status("analysing the CTPA series"):
            result = engine.analyze(index_series(paths))
        table.add_row("PE" if pe else "no PE", str(len(paths)), f"{result.probability:.3f}", f"{result.threshold:.3f}",
                      "PE suspected" if result.positive else "not suspected",
                      ", ".join(f"#{k.index}" for k in result.key_slices), f"{result.seconds:.1f}")
    out.print(table)
    out.print("AI triage aid - not for diagnostic use.")
