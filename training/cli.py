"""``petriage-train``: stage 1, feature extraction, stage 2 and evaluation of the two-stage model.

Every subcommand takes ``--config FILE`` (YAML, see training/configs/) and ``--set key=value``
overrides, writes the effective config to ``RUN/config.yaml`` and the split to ``RUN/splits.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from node.cli_runner import run_app
from training import TrainingError, distributed, provenance
from training.config import TrainConfig, load_train_config
from training.data import (
    SliceCache,
    build_cache,
    plan_cache,
    preprocess_sample,
    read_rsna,
    split_by_patient,
    with_training_only,
)
from training.engine import extract_features, train_stage1, train_stage2
from training.evaluate import evaluate

console = Console()
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Train the two-stage PE model (Shi et al., MIDL 2020) on an RSNA-STR PE style dataset.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Training config YAML.")]
# --run-dir too: under torchrun, whose own parser reads a bare --run as its --run-path
RunOpt = Annotated[Path, typer.Option("--run", "--run-dir", help="Run folder (checkpoints, logs, report).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override: section.key=value.")]


def _cache_progress(*, remaining: bool = False, disable: bool = False) -> Progress:
    """The cache's progress bar (with a time-remaining column where the build is the whole command)."""
    columns = [TextColumn("[bold]cache[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return Progress(*columns, *([TimeRemainingColumn()] if remaining else []), TextColumn("{task.description}"),
                    console=console, disable=disable)


def _prepare(config: Path | None, run: Path, overrides: list[str] | None) -> tuple[TrainConfig, SliceCache, dict]:
    cfg = load_train_config(config, overrides or [])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    r = distributed.init(cfg.device)  # under torchrun: join the process group (one process otherwise)
    if not r.main:  # rank 0 writes the run folder and builds the cache; the others read them
        distributed.barrier()
    run.mkdir(parents=True, exist_ok=True)
    if r.main:
        (run / "config.yaml").write_text(cfg.to_yaml())
        provenance.record(run)
    own = read_rsna(cfg.data.root)
    parts = split_by_patient(own, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction,
                             seed=cfg.data.split_seed)
    studies = with_training_only(own, cfg.data.train_extra)
    held_out = {s.study_instance_uid for name in ("val", "test") for s in parts[name]}
    parts["train"] = [s for s in studies if s.study_instance_uid not in held_out]
    splits = {k: [s.study_instance_uid for s in v] for k, v in parts.items()}
    if r.main:
        (run / "splits.json").write_text(json.dumps(splits, indent=1))
    cache_dir = cfg.data.cache_folder
    with _cache_progress(disable=not r.main) as progress:
        task = progress.add_task("reading studies", total=len(studies))
        cache = build_cache(studies, cfg.preprocess.spec(), cache_dir, workers=max(1, min(4, torch.get_num_threads())),
                            progress=lambda i, n, msg: progress.update(task, completed=i, description=msg))
    if cache.skipped:  # studies that could not be read: out of every split, named with the reason
        splits = {k: [u for u in v if u not in cache.skipped] for k, v in splits.items()}
        if r.main:
            for uid, why in sorted(cache.skipped.items()):
                console.print(f"[yellow]study {uid} left out: {why}[/yellow]")
            (run / "splits.json").write_text(json.dumps(splits, indent=1))
    if r.main:
        distributed.barrier()  # the cache and the run folder exist: the other processes go on
    masked = sum(1 for s in studies if s.mask_file)
    if r.main:
        console.print(f"{len(studies)} studies ({sum(s.label for s in studies)} PE, {masked} with sparse masks); "
                  f"split train/val/test = {len(splits['train'])}/{len(splits['val'])}/{len(splits['test'])} "
                  f"studies by patient; {len(cache.images)} slices cached at {cache.folder}")
    return cfg, cache, splits


@app.command("cache")
def cache_cmd(config: ConfigOpt = None, set_: SetOpt = None,
              workers: Annotated[int, typer.Option(help="Processes decoding studies.")] = 2,
              estimate_only: Annotated[bool, typer.Option("--estimate", help="Print the estimate and stop.")] = False
              ) -> None:
    """Build the slice cache ahead of training: its size and time first, then the build; a killed build
    continues where it stopped, and a study that cannot be read is named and left out."""
    cfg = load_train_config(config, set_ or [])
    studies = with_training_only(read_rsna(cfg.data.root), cfg.data.train_extra)
    cache_dir = cfg.data.cache_folder
    spec = cfg.preprocess.spec()
    with _cache_progress(remaining=True) as progress:
        task = progress.add_task("reading headers", total=len(studies))
        plan = plan_cache(studies, spec, cache_dir,
                          lambda i, n, msg: progress.update(task, completed=i, description=msg))
    if plan.complete:
        console.print(f"the cache is complete: {plan.folder}")
        return
    readable = [s for s in studies if s.study_instance_uid in plan.slabs]
    if not readable:
        raise TrainingError(f"no study could be read ({len(plan.skipped)} skipped)")
    t0 = time.perf_counter()
    sample = readable[0]
    preprocess_sample(sample, spec)
    per_image = (time.perf_counter() - t0) / max(1, len(sample.files))
    images = sum(len(s.files) for s in readable)
    seconds = per_image * images / max(1, workers)
    size = f"{plan.bytes / 1e9:.1f} GB" if plan.bytes >= 1e9 else f"{plan.bytes / 1e6:.1f} MB"
    took = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
    n_bad = len(plan.skipped)
    console.print(f"{len(readable)} studies, {images} images -> {plan.images} slabs of {spec.size} px: "
                  f"{size} in {plan.folder}; about {took} with {workers} workers (measured on one study: "
                  f"{per_image * 1000:.0f} ms per image)"
                  + (f"; {n_bad} {'study' if n_bad == 1 else 'studies'} cannot be read and will be left out"
                     if n_bad else ""))
    if estimate_only:
        return
    with _cache_progress(remaining=True) as progress:
        task = progress.add_task("caching slices", total=len(readable))
        cache = build_cache(studies, spec, cache_dir, workers=workers, plan=plan,
                            progress=lambda i, n, msg: progress.update(task, completed=i, total=n, description=msg))
    for uid, why in sorted(cache.skipped.items()):
        console.print(f"[yellow]study {uid} left out: {why}[/yellow]")
    console.print(f"{len(cache.studies)} studies cached ({len(cache.skipped)} left out) at {cache.folder}")


@app.command()
def stage1(run: RunOpt, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Train the slice ResNet (classification + attention loss); resumes from RUN/stage1_last.pt."""
    cfg, cache, splits = _prepare(config, run, set_)
    train_stage1(cfg, cache, splits, run)
    distributed.finish()


@app.command()
def features(run: RunOpt, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Extract stage-1 features of every slice (RUN/features.npy)."""
    cfg, cache, _ = _prepare(config, run, set_)
    extract_features(cfg, cache, run)
    distributed.finish()


@app.command()
def stage2(run: RunOpt, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Train the recurrent study model on the frozen features."""
    cfg, cache, splits = _prepare(config, run, set_)
    train_stage2(cfg, cache, splits, run)
    distributed.finish()


@app.command("evaluate")
def evaluate_cmd(run: RunOpt, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Evaluate on the held-out test split: RUN/report.json, roc.png, cam_grid.png."""
    cfg, cache, splits = _prepare(config, run, set_)
    if distributed.ranks().main:
        _show(evaluate(cfg, cache, splits, run), run)
    distributed.finish()


@app.command("all")
def all_cmd(run: RunOpt, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Stage 1, features, stage 2 and evaluation in one go."""
    start = time.perf_counter()
    cfg, cache, splits = _prepare(config, run, set_)
    train_stage1(cfg, cache, splits, run)
    extract_features(cfg, cache, run)
    train_stage2(cfg, cache, splits, run)
    if distributed.ranks().main:
        report = evaluate(cfg, cache, splits, run)
        report["seconds_total"] = round(time.perf_counter() - start, 1)
        report["processes"] = distributed.ranks().world
        (run / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        _show(report, run)
    distributed.finish()


@app.command("import")
def import_cmd(
    dataset: Annotated[str, typer.Argument(help="cad-pe or fumpe")],
    src: Annotated[Path, typer.Argument(help="The public set's folder, unpacked (layouts in docs/training.md).")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write in the RSNA-STR PE layout.")],
    mask_order: Annotated[str, typer.Option(help="fumpe: instance (mask planes in InstanceNumber order) or "
                                                  "reversed.")] = "instance",
    copy: Annotated[bool, typer.Option(help="fumpe: copy the DICOM files instead of linking them.")] = False,
    hu_offset: Annotated[float, typer.Option(help="cad-pe: added to every voxel (0 when the volumes hold HU).")] = 0.0,
) -> None:
    """Import CAD-PE or FUMPE with their reference masks; a rerun continues where the last one stopped."""
    from training.public_sets import cadpe, fumpe
    from training.public_sets.layout import RsnaLayout

    if dataset not in ("cad-pe", "fumpe"):
        raise TrainingError(f"dataset {dataset!r} is not cad-pe or fumpe")
    cases = (cadpe if dataset == "cad-pe" else fumpe).find_cases(src)
    layout = RsnaLayout(out, dataset)
    skipped: list[tuple[str, str]] = []
    imported = earlier = 0
    with Progress(TextColumn(f"[bold]import {dataset}[/bold]"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.description}"), console=console) as progress:
        task = progress.add_task("", total=len(cases))
        for name, first, second in cases:
            progress.update(task, description=name)
            if layout.done(name):
                earlier += 1
            else:
                try:
                    if dataset == "cad-pe":
                        cadpe.import_case(name, first, second, layout, hu_offset)
                    else:
                        fumpe.import_case(name, first, second, layout, mask_order=mask_order, copy=copy)
                    imported += 1
                except TrainingError as exc:
                    skipped.append((name, str(exc)))
                    console.print(f"[yellow]skipped {name}: {exc}[/yellow]")
            progress.advance(task)
    csv_path = layout.finish(skipped)
    console.print(f"{imported} studies imported, {earlier} from an earlier run, {len(skipped)} skipped; "
                  f"wrote {csv_path} and {out / 'import.json'}")


def _show(report: dict, run: Path) -> None:
    pg = report["pointing_game"]
    console.print(f"study AUC {report['study_auc']:.3f} (95% CI {report['study_auc_ci95'][0]:.3f}-"
                  f"{report['study_auc_ci95'][1]:.3f}); sensitivity {report['operating_point']['test_sensitivity']:.2f}"
                  f", specificity {report['operating_point']['test_specificity']:.2f} at threshold "
                  f"{report['operating_point']['threshold']:.3f} (chosen on val); slice AUC "
                  f"{report['slice_auc_stage1']:.3f}; pointing game {pg['score']:.2f} within {pg['tolerance_mm']} mm "
                  f"({pg['score_strict_inside_mask']:.2f} strictly inside) on {pg['slices']} annotated slices")
    for name, top in report.get("stage1_max_slice_study_auc", {}).items():
        if top["all"] is None:
            continue
        levels = ", ".join(f"{lv} {v['auc']:.2f} ({v['positive']})"
                           for lv, v in top.get("by_most_central_level", {}).items() if v["auc"] is not None)
        console.print(f"largest stage-1 slice logit, study AUC on {name}: {top['all']:.3f}"
                      + (f"; by most central level: {levels}" if levels else ""))
    console.print(f"wrote {run / 'report.json'}, {run / 'roc.png'}, {run / 'cam_grid.png'}")


def main(argv: list[str] | None = None) -> int:
    """Run petriage-train; returns the exit code (0 ok, 1 failure, 2 bad usage or configuration)."""
    return run_app(app, argv, "petriage-train", (TrainingError,))


if __name__ == "__main__":
    raise SystemExit(main())
