"""``petriage phantom``: write synthetic CTPA studies in the RSNA-STR PE layout."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from node.errors import PhantomError
from node.phantom import COMPANIONS, ORDERS, TRANSFER_SYNTAXES, PhantomOptions, write_rsna_dataset

out = Console()


def _companions(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if names == ("all",):
        return COMPANIONS
    return names


def phantom_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write (train.csv, train/, masks/).")],
    studies: Annotated[int, typer.Option(min=1, help="Number of studies.")] = 10,
    positive_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of PE-positive studies.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same studies.")] = 0,
    matrix: Annotated[int, typer.Option(help="Rows and columns of each image.")] = 512,
    slices: Annotated[int, typer.Option(help="Slices per CTPA series.")] = 300,
    slice_spacing: Annotated[float, typer.Option(help="Slice spacing in mm.")] = 1.0,
    transfer_syntax: Annotated[str, typer.Option(help=f"One of: {', '.join(TRANSFER_SYNTAXES)}.")] = "explicit",
    order: Annotated[str, typer.Option(help=f"InstanceNumber order: {', '.join(ORDERS)}.")] = "ascending",
    companions: Annotated[str, typer.Option(help=f"Extra series: comma list of {', '.join(COMPANIONS)}, "
                                            "or 'all'.")] = "",
    annotated_fraction: Annotated[float, typer.Option(min=0.0, max=1.0,
                                                      help="Share of positive studies given pixel masks.")] = 0.3,
    annotated_slice_fraction: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of a masked study's positive slices that are annotated.")] = 0.5,
    min_embolus_mm: Annotated[float, typer.Option(
        help="Smallest embolus drawn, mm along the vessel (2-20); emboli are drawn up to 20 mm.")] = 2.0,
    embolus_levels: Annotated[str, typer.Option(
        help="Artery levels emboli may sit in: comma list of central, lobar, segmental (and subsegmental with "
             "--style varied or shifted, which draw every level by default).")] = "central,lobar,segmental",
    style: Annotated[str, typer.Option(
        help="classic (fixed scanner settings from the options above), varied (domain-randomised training "
             "family: matrix, field, slice spacing and thickness, kernel, noise, contrast, anatomy and emboli "
             "drawn per study; --matrix/--slices/--slice-spacing/--min-embolus-mm are not used) or shifted "
             "(the held-out test family).")] = "classic",
    matrix_cap: Annotated[int | None, typer.Option(
        help="With --style varied or shifted: the largest matrix rendered (the field of view is kept).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Processes generating studies in parallel.")] = 1,
) -> None:
    """Write synthetic CTPA studies (RSNA-STR PE layout, sparse masks) - synthetic, not patient data."""
    try:
        options = PhantomOptions(matrix=matrix, slices=slices, slice_spacing_mm=slice_spacing,
                                 transfer_syntax=transfer_syntax, order=order,
                                 companions=_companions(companions), min_embolus_mm=min_embolus_mm,
                                 embolus_levels=tuple(v.strip() for v in embolus_levels.split(",") if v.strip()),
                                 style=style, matrix_cap=matrix_cap)
    except PhantomError as exc:
        raise typer.BadParameter(str(exc)) from exc
    start = time.perf_counter()
    columns = (TextColumn("[bold]phantom[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=out) as progress:
        task = progress.add_task("starting", total=studies)

        def advance(done: int, total: int, message: str) -> None:
            progress.update(task, completed=done, description=message)
            if not out.is_terminal and (done % max(1, total // 20) == 0 or done == total):
                # a log file gets no live bar: one plain line every 5 %
                out.print(f"phantom {done}/{total} studies, {time.perf_counter() - start:.0f} s: {message}")

        csv_path = write_rsna_dataset(out_dir, studies=studies, positive_fraction=positive_fraction, seed=seed,
                                      options=options, annotated_fraction=annotated_fraction,
                                      annotated_slice_fraction=annotated_slice_fraction, workers=workers,
                                      progress=advance)
    out.print(f"wrote {studies} studies in {time.perf_counter() - start:.1f} s: {csv_path}, "
              f"{out_dir / 'train'}, {out_dir / 'masks'}, {out_dir / 'phantom.json'}")
