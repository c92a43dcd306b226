"""Run a model bundle through the node's engine on phantom studies it never saw; report each test apart.

    .venv/bin/python scripts/check_bundle.py --bundle models/demo \\
        --test in-distribution=data/varied:runs/demo/splits.json \\
        --test shifted=data/shifted --out var/check-bundle

Each ``--test NAME=DATASET[:SPLITS[@SPLIT]]`` is a folder in the RSNA-STR PE layout written by ``petriage
phantom`` (``train.csv``, ``train/``, ``masks/``, ``phantom.json``); with ``:SPLITS`` (a training run's
``splits.json``) only that run's ``test`` split is used, so the in-distribution test holds studies
the model was not trained or tuned on; ``@val`` takes the validation split instead, to compare two
bundles where choosing is allowed. Every study is analysed from its DICOM files by
``node.inference.Engine`` exactly as ``petriage analyze`` would. Per test it reports:

- study AUC with a 95 % bootstrap interval; sensitivity and specificity at the bundle's operating
  point with 95 % Wilson intervals;
- sensitivity by the most central level of a study's emboli and by the size of its largest embolus;
- the pointing game: the attention peak of the top key slice lies within 10 mm (in-plane) of an
  embolus voxel of that slice's slab, over positive studies with masks, overall and per level;

and writes ``NAME-roc.png``, ``NAME-cams.png`` (top key slice of positive studies: PE window, embolus
outline, attention peak) and ``results.json`` under ``--out``. Without ``--test`` it draws
``--studies`` fresh studies of ``--style`` (default: varied) from seeds after ``--seed``.
Needs only the runtime (and matplotlib for the PNGs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from node.bundle import load_bundle
from node.inference import Engine
from node.phantom import write_rsna_dataset
from node.phantom.spec import EMBOLUS_LEVELS, most_central_level
from node.series import index_series
from training.metrics import wilson_interval  # numpy only: no torch needed

LEVELS = list(EMBOLUS_LEVELS)
SIZES = [("< 8 mm", 0.0, 8.0), ("8-15 mm", 8.0, 15.0), (">= 15 mm", 15.0, 1e9)]


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def bootstrap_auc(labels: np.ndarray, scores: np.ndarray, n: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    boots = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        if 0 < labels[idx].sum() < len(idx):
            boots.append(auc(labels[idx], scores[idx]))
    return float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def proportion(k: int, n: int) -> dict:
    lo, hi = wilson_interval(k, n)
    return {"value": k / n if n else None, "k": k, "n": n, "ci95": [lo, hi]}


def _studies(dataset: Path, splits: Path | None, split: str = "test") -> list[dict]:
    truth = json.loads((dataset / "phantom.json").read_text())["studies"]
    if splits is not None:
        keep = set(json.loads(splits.read_text())[split])
        truth = [t for t in truth if t["study_instance_uid"] in keep]
    return truth


def _series_files(dataset: Path, study_uid: str) -> list[Path]:
    folders = [p for p in (dataset / "train" / study_uid).iterdir() if p.is_dir()]
    return sorted(f for folder in folders for f in folder.glob("*.dcm"))


def _hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def _pointing(result, index, masks: dict[str, np.ndarray], slab: int, tolerance_mm: float,
              embolus_slices: set[int]):
    """(hit, key slice, mask of the key slab) for the top key slice; None when that cannot be told.

    A key slab with no embolus in any of its slices (phantom.json) is a miss; one with emboli but
    without an annotated mask (sparse annotation) cannot be judged.
    """
    if not result.key_slices:
        return None
    key = result.key_slices[0]
    j = key.index // slab
    members = range(j * slab, min((j + 1) * slab, len(index)))
    uids = [index.sop_instance_uids[i] for i in members]
    if not embolus_slices & set(members):
        return False, key, np.zeros(index.shape, dtype=bool)
    slab_masks = [masks[u] for u in uids if u in masks]
    if not slab_masks:
        return None
    union = np.maximum.reduce(slab_masks) > 0
    if not union.any():
        return False, key, union
    rows, cols = np.nonzero(union)
    dr = (rows + 0.5 - key.peak_row) * index.pixel_spacing_mm[0]
    dc = (cols + 0.5 - key.peak_column) * index.pixel_spacing_mm[1]
    return bool(np.min(np.hypot(dr, dc)) <= tolerance_mm), key, union


def run_test(engine: Engine, name: str, dataset: Path, splits: Path | None, out: Path,
             tolerance_mm: float = 10.0, split: str = "test") -> dict:
    truth = _studies(dataset, splits, split)
    rows, tiles = [], []
    for i, t in enumerate(truth, 1):
        uid = t["study_instance_uid"]
        index = index_series(_series_files(dataset, uid))
        start = time.perf_counter()
        result = engine.analyze(index)
        seconds = time.perf_counter() - start
        emboli = t["emboli"]
        level = most_central_level(emboli)
        largest = max((e["size_mm"] for e in emboli), default=0.0)
        row = {"study_instance_uid": uid, "seed": t["seed"], "pe": bool(t["pe_present"]),
               "probability": result.probability, "positive": result.positive, "level": level,
               "largest_embolus_mm": largest, "seconds": seconds, "slices": len(index),
               "slab": result.model.get("slab_slices", 1), "hit": None}
        mask_file = dataset / "masks" / f"{uid}.npz"
        if row["pe"] and mask_file.is_file():
            with np.load(mask_file) as npz:
                masks = {str(u): m for u, m in zip(npz["sop_instance_uid"], npz["mask"], strict=True)}
            slices = {k for e in emboli for k in e["slices"]}
            pointed = _pointing(result, index, masks, row["slab"], tolerance_mm, slices)
            if pointed is not None:
                row["hit"] = pointed[0]
                if len(tiles) < 16:
                    key = pointed[1]
                    tiles.append((_hu(index.paths[key.index]), pointed[2], key, pointed[0], result.probability))
        rows.append(row)
        print(f"[{name}] {i:3d}/{len(truth)} truth {'PE' if row['pe'] else 'no PE':5s} "
              f"{(level or ''):12s} p={result.probability:.3f} -> "
              f"{'PE suspected' if result.positive else 'not suspected'}"
              + ("" if row["hit"] is None else f"; attention {'on' if row['hit'] else 'off'} the clot"), flush=True)
    labels = np.array([r["pe"] for r in rows], dtype=int)
    scores = np.array([r["probability"] for r in rows])
    decided = np.array([r["positive"] for r in rows])
    pos = [r for r in rows if r["pe"]]
    report = {
        "test": name, "dataset": str(dataset), "split": split if splits else "all",
        "studies": {"positive": int(labels.sum()), "negative": int(len(labels) - labels.sum())},
        "auc": auc(labels, scores), "auc_ci95": bootstrap_auc(labels, scores),
        "threshold": float(engine.bundle.manifest.operating_point(None).threshold),
        "sensitivity": proportion(int(decided[labels == 1].sum()), int(labels.sum())),
        "specificity": proportion(int((~decided[labels == 0]).sum()), int((labels == 0).sum())),
        "sensitivity_by_level": {lv: proportion(sum(r["positive"] for r in pos if r["level"] == lv),
                                                sum(1 for r in pos if r["level"] == lv)) for lv in LEVELS},
        "sensitivity_by_size": {s: proportion(sum(r["positive"] for r in pos if lo <= r["largest_embolus_mm"] < hi),
                                              sum(1 for r in pos if lo <= r["largest_embolus_mm"] < hi))
                                for s, lo, hi in SIZES},
        "pointing_game": proportion(sum(1 for r in pos if r["hit"]), sum(1 for r in pos if r["hit"] is not None)),
        "pointing_by_level": {lv: proportion(sum(1 for r in pos if r["level"] == lv and r["hit"]),
                                             sum(1 for r in pos if r["level"] == lv and r["hit"] is not None))
                              for lv in LEVELS},
        "pointing_tolerance_mm": tolerance_mm,
        "seconds_per_study": float(np.mean([r["seconds"] for r in rows])),
        "rows": rows,
    }
    _pictures(report, labels, scores, tiles, out / f"{name}-roc.png", out / f"{name}-cams.png")
    return report


def _pictures(report: dict, labels, scores, tiles, roc_path: Path, cams_path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    order = np.argsort(-scores)
    tpr = np.concatenate([[0], np.cumsum(labels[order]) / labels.sum()])
    fpr = np.concatenate([[0], np.cumsum(1 - labels[order]) / (len(labels) - labels.sum())])
    sens, spec = report["sensitivity"]["value"], report["specificity"]["value"]
    lo, hi = report["auc_ci95"]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot(fpr, tpr, lw=2, label=f"AUC {report['auc']:.3f} (95% CI {lo:.3f}-{hi:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.scatter([1 - spec], [sens], c="red", zorder=3,
               label=f"threshold {report['threshold']:.3f}: sens {sens:.2f}, spec {spec:.2f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"{report['test']}: {report['studies']['positive']} PE / {report['studies']['negative']} no PE "
                 "(node.inference)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.text(0.02, 0.98, "synthetic data - not for clinical use", transform=ax.transAxes, va="top", fontsize=7)
    fig.tight_layout()
    fig.savefig(roc_path)
    plt.close(fig)
    if not tiles:
        return
    cols = 4
    fig, axes = plt.subplots((len(tiles) + cols - 1) // cols, cols, figsize=(12, 3 * ((len(tiles) + cols - 1) // cols)),
                             dpi=90, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (hu, mask, key, hit, p) in zip(axes.flat, tiles, strict=False):
        ax.imshow(np.clip((hu + 250.0) / 700.0, 0, 1), cmap="gray")
        ax.contour(mask, levels=[0.5], colors="red", linewidths=0.8)
        ax.plot([key.peak_column], [key.peak_row], "+", ms=14, mew=2, c="lime" if hit else "magenta")
        ax.set_title(f"p={p:.2f} {'hit' if hit else 'miss'}", fontsize=8)
    fig.suptitle(f"{report['test']}: top key slice, embolus outline (red), attention peak (+) - synthetic", fontsize=10)
    fig.tight_layout()
    fig.savefig(cams_path)
    plt.close(fig)


def _line(r: dict) -> str:
    s, p = r["sensitivity"], r["specificity"]
    return (f"{r['test']}: AUC {r['auc']:.3f} ({r['auc_ci95'][0]:.3f}-{r['auc_ci95'][1]:.3f}); at threshold "
            f"{r['threshold']:.3f} sensitivity {s['value']:.2f} ({s['ci95'][0]:.2f}-{s['ci95'][1]:.2f}), "
            f"specificity {p['value']:.2f} ({p['ci95'][0]:.2f}-{p['ci95'][1]:.2f}); pointing "
            f"{r['pointing_game']['value'] if r['pointing_game']['n'] else float('nan'):.2f} "
            f"({r['pointing_game']['k']}/{r['pointing_game']['n']}); {r['seconds_per_study']:.2f} s per study")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/demo"))
    parser.add_argument("--test", action="append", default=[], metavar="NAME=DATASET[:SPLITS]")
    parser.add_argument("--studies", type=int, default=40, help="fresh studies when no --test is given")
    parser.add_argument("--style", default="varied", help="style of the fresh studies")
    parser.add_argument("--seed", type=int, default=900001, help="seed of the fresh studies")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", type=Path, default=Path("var/check-bundle"))
    parser.add_argument("--record", action="store_true",
                        help="write each test's summary into the bundle's model.json (evaluations)")
    args = parser.parse_args()
    engine = Engine(args.bundle, device="cpu", precision=args.precision, threads=2)
    print(f"bundle {args.bundle}: {engine.describe()}")
    args.out.mkdir(parents=True, exist_ok=True)
    tests: list[tuple[str, Path, Path | None, str]] = []
    scratch = None
    for spec in args.test:
        name, _, where = spec.partition("=")
        dataset, _, splits = where.partition(":")
        splits, _, split = splits.partition("@")
        if not name or not Path(dataset, "phantom.json").is_file() or split not in ("", "train", "val", "test"):
            print(f"--test {spec}: expected NAME=DATASET[:SPLITS[@train|val|test]] with DATASET/phantom.json",
                  file=sys.stderr)
            return 2
        tests.append((name, Path(dataset), Path(splits) if splits else None, split or "test"))
    if not tests:
        from node.phantom import PhantomOptions

        scratch = Path(tempfile.mkdtemp(prefix="check-bundle-"))
        write_rsna_dataset(scratch, studies=args.studies, seed=args.seed, options=PhantomOptions(style=args.style),
                           annotated_fraction=1.0, annotated_slice_fraction=1.0)
        tests.append((f"fresh-{args.style}", scratch, None, "test"))
    reports = [run_test(engine, name, dataset, splits, args.out, split=split) for name, dataset, splits, split in tests]
    if scratch is not None:
        shutil.rmtree(scratch)
    for r in reports:
        print(_line(r))
    (args.out / "results.json").write_text(json.dumps({"bundle": str(args.bundle), "engine": engine.describe(),
                                                       "tests": reports}, indent=1))
    print(f"wrote {args.out / 'results.json'} and the PNGs beside it")
    if args.record:
        manifest_path = args.bundle / "model.json"
        manifest = json.loads(manifest_path.read_text())
        names = {r["test"] for r in reports}
        kept = [e for e in manifest.get("evaluations", []) if e["test"] not in names]
        manifest["evaluations"] = kept + [{k: v for k, v in r.items() if k != "rows"} for r in reports]
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        load_bundle(args.bundle)  # still a valid bundle
        print(f"recorded {len(reports)} test(s) in {manifest_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
