"""``petriage analyze PATH``: run the model bundle on one study folder, offline, and print the result.

The check an ML engineer or an administrator runs before turning the node on: no network, the CTPA
series chosen as the node chooses it (``node.selection``), the bundle verified (``node.bundle``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from node.errors import NodeError

out = Console()
err = Console(stderr=True)


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise NodeError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise NodeError(f"{path}: no files")
    return files


def analyze_cmd(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A folder with the DICOM files of one study (searched recursively).")],
    bundle: Annotated[Path | None, typer.Option(help="Model bundle folder (default: model.bundle).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: model.device).")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32, int8 or fp16 (default: model.precision).")] = None,
) -> None:
    """Run the model on one study (offline) and print probability, decision, series and key slices."""
    from node.inference import Engine  # onnxruntime loads here, not for --help
    from node.selection import SeriesRules, choose_ctpa
    from node.series import check_spacing, index_series

    config = ctx.obj.config
    cfg = config.model
    files = _files(path)
    engine = Engine(bundle or cfg.bundle, device=device or cfg.device, precision=precision or cfg.precision,
                    threads=cfg.threads or None)
    choice = choose_ctpa(files, SeriesRules.from_settings(config.series))
    index = index_series(choice.paths, choice.headers)
    check_spacing(index, config.series.max_gap_factor)
    if as_json:
        result = engine.analyze(index)
    else:
        with Progress(TextColumn("[bold]analyze[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True) as progress:
            task = progress.add_task("slices", total=len(index))
            result = engine.analyze(index, progress=lambda done, total: progress.update(task, completed=done))
    summary = result.summary()
    summary["series"] = {"series_instance_uid": choice.series_instance_uid, "description": choice.description,
                         "reason": choice.reason, "other_series": choice.rejected}
    if as_json:
        print(json.dumps(summary, indent=1))
        return
    m = summary["model"]
    colour = "red" if result.positive else "green"
    out.print(f"[bold {colour}]{summary['decision']}[/bold {colour}]: probability {result.probability:.3f} "
              f"(threshold {result.threshold:.3f}, operating point {result.operating_point})")
    out.print(f"series: {choice.description or '(no description)'} - {choice.reason}")
    for uid, why in choice.rejected.items():
        out.print(f"  not used: {uid[-24:]}: {why}", highlight=False)
    out.print("key slices (head first index, slice probability, attention peak row/column):")
    for k in result.key_slices:
        frame = f" frame {k.frame_number}" if k.frame_number else ""
        out.print(f"  #{k.index}: {k.probability:.3f} at ({k.peak_row:.0f}, {k.peak_column:.0f})  "
                  f"{k.sop_instance_uid}{frame}",
                  highlight=False)
    out.print(f"model {m['name']} {m['version']} (stage 1 {m['stage1_precision']}, {', '.join(m['providers'])}) in "
              f"{result.seconds:.1f} s" + (" - [bold]synthetic training data, not for clinical use[/bold]"
                                          if m["synthetic_training_data"] else ""))
    out.print("AI triage aid - not for diagnostic use.")
