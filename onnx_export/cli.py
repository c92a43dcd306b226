"""``petriage-export RUN_DIR --out BUNDLE_DIR``: a trained run to a verified model bundle."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from node.bundle import BundleError
from node.cli_runner import run_app
from onnx_export import ExportError
from training import TrainingError

console = Console()
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Export a trained run (petriage-train all) to an ONNX model bundle the node loads.")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by `petriage-train all`.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle folder to write (replaced if it exists).")],
    name: Annotated[str, typer.Option(help="Model name in the manifest.")] = "petriage-pe",
    version: Annotated[str, typer.Option(help="Model version in the manifest.")] = "0.1.0",
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="Also make the int8 stage 1 for CPUs.")] = True,
    fp16: Annotated[bool, typer.Option("--fp16/--no-fp16", help="Also make an fp16 stage 1 for GPUs.")] = False,
    parity_studies: Annotated[int, typer.Option(min=1, help="Validation studies for the torch/ONNX parity.")] = 8,
    check_studies: Annotated[int, typer.Option(min=1, help="Validation studies for checking variants.")] = 16,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads.")] = 2,
) -> None:
    """Export both stages, check parity and variants, write model.json with sha256 of every file."""
    from onnx_export.export import export_run  # torch and onnx load here, not for --help

    start = time.perf_counter()
    command = "petriage-export " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    manifest = export_run(run_dir, out, name=name, version=version, int8=int8, fp16=fp16,
                          parity_studies=parity_studies, check_studies=check_studies, threads=threads,
                          command=command, say=lambda m: console.print(f"[bold]export[/bold] {m}"))
    size = sum((out / f.path).stat().st_size for f in manifest.files)
    used = ", ".join(f"{f.stage} {f.precision}" for f in manifest.files if f.accepted)
    console.print(f"wrote {out} ({size / 1e6:.1f} MB: {used}) in {time.perf_counter() - start:.0f} s; "
                  f"parity {manifest.parity['max_abs_study_probability_difference']:.1e}")


def main(argv: list[str] | None = None) -> int:
    """Run petriage-export; returns the exit code (0 ok, 1 failure, 2 bad usage)."""
    return run_app(app, argv, "petriage-export", (ExportError, BundleError, TrainingError))


if __name__ == "__main__":
    raise SystemExit(main())
