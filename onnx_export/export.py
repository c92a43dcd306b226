"""A trained run to a verified model bundle.

Steps: export both stages (``graphs``), compare torch and onnxruntime on whole validation studies
(refuse the bundle if a study probability differs by more than ``PARITY_TOLERANCE``), make the
variants (int8 for CPUs, optionally fp16 for GPUs) and accept each only if its study probabilities
stay within ``VARIANT_TOLERANCE`` of fp32, then write ``model.json`` with every file's sha256. The
bundle is assembled in a temporary folder and renamed into place, so a failed export leaves nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import torch

from node.bundle import (
    INTENDED_USE,
    MANIFEST,
    SYNTHETIC_WARNING,
    Manifest,
    ModelFile,
    OperatingPoint,
    load_bundle,
    sha256_of,
)
from node.inference import sigmoid
from node.preprocess import PreprocessSpec, to_float
from onnx_export import ExportError
from onnx_export.graphs import export_stage1, export_stage2, tensor_infos
from onnx_export.variants import convert_fp16, quantize_int8
from training import provenance
from training.config import TrainConfig, load_train_config
from training.data import SliceCache, build_cache, read_datasets
from training.engine import load_slice_net, load_study_net

PARITY_TOLERANCE = 1e-4
VARIANT_TOLERANCE = 0.01
Say = Callable[[str], None]


class _Runner:
    """Study probabilities from torch or from an onnxruntime stage-1 file (stage 2 in fp32 ONNX)."""

    def __init__(self, cache: SliceCache, stage2: Path, threads: int):
        self.cache = cache
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.options = options
        self.stage2 = ort.InferenceSession(str(stage2), options, providers=["CPUExecutionProvider"])

    def _slices(self, uid: str) -> np.ndarray:
        st = self.cache.study(uid)
        return self.cache.images[st["start"]:st["start"] + st["count"]]

    def onnx(self, stage1: Path, uids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        session = ort.InferenceSession(str(stage1), self.options, providers=["CPUExecutionProvider"])
        probs, logits = [], []
        for uid in uids:
            images = self._slices(uid)
            feats, lg = [], []
            for lo in range(0, len(images), 32):
                out = session.run(None, {"image": to_float(images[lo:lo + 32])})
                lg.append(out[0])
                feats.append(out[1])
            study, _ = self.stage2.run(None, {"features": np.concatenate(feats)[None]})
            probs.append(float(sigmoid(study[0])))
            logits.append(np.concatenate(lg))
        return np.array(probs), np.concatenate(logits)

    def torch(self, slice_net, study_net, uids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        probs, logits = [], []
        with torch.no_grad():
            for uid in uids:
                images = self._slices(uid)
                feats, lg = [], []
                for lo in range(0, len(images), 32):
                    logit, feat, _ = slice_net(torch.from_numpy(to_float(images[lo:lo + 32])))
                    lg.append(logit.numpy())
                    feats.append(feat)
                study, _ = study_net(torch.cat(feats)[None])
                probs.append(float(torch.sigmoid(study[0])))
                logits.append(np.concatenate(lg))
        return np.array(probs), np.concatenate(logits)


def _pick_studies(cache: SliceCache, uids: list[str], n: int) -> list[str]:
    """Up to ``n`` studies, positives and negatives alternating, in a fixed order."""
    pos = [u for u in uids if cache.study(u)["label"] == 1]
    neg = [u for u in uids if cache.study(u)["label"] != 1]
    out: list[str] = []
    while len(out) < n and (pos or neg):
        for group in (pos, neg):
            if group and len(out) < n:
                out.append(group.pop(0))
    return out


def _calibration(cache: SliceCache, uids: list[str], n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for uid in uids:
        st = cache.study(uid)
        rows += [st["start"] + k for k, lab in enumerate(st["image_labels"]) if lab == 1]
    positives = rng.permutation(rows)[: n // 2].tolist()
    others = rng.choice(len(cache.images), min(n - len(positives), len(cache.images)), replace=False).tolist()
    return to_float(cache.images[sorted(set(positives + others))])


def export_run(run_dir: Path, out_dir: Path, *, name: str, version: str, int8: bool = True, fp16: bool = False,
               parity_studies: int = 8, check_studies: int = 16, calibration_slices: int = 256, threads: int = 2,
               command: str = "", say: Say = print) -> Manifest:
    """Export ``run_dir`` (a finished ``petriage-train all`` run) to the bundle folder ``out_dir``."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    for need in ("config.yaml", "splits.json", "stage1.pt", "stage2.pt", "report.json"):
        if not (run_dir / need).is_file():
            raise ExportError(f"{run_dir / need}: missing (export needs a run that finished `petriage-train all`)")
    torch.set_num_threads(threads)
    cfg: TrainConfig = load_train_config(run_dir / "config.yaml")
    report = json.loads((run_dir / "report.json").read_text())
    splits = json.loads((run_dir / "splits.json").read_text())
    spec = cfg.preprocess.spec()
    slice_net, ckpt = load_slice_net(run_dir / "stage1.pt", torch.device("cpu"))
    if PreprocessSpec.from_dict(ckpt["preprocess"]) != spec:
        raise ExportError("the stage-1 checkpoint's preprocessing differs from the run's config.yaml")
    study_net = load_study_net(run_dir / "stage2.pt", torch.device("cpu"))
    if not (Path(cfg.data.root) / "train.csv").is_file():
        raise ExportError(f"{cfg.data.root}: the run's training data is needed for the parity check and the "
                          "int8 calibration (regenerate it with the command in the run's config)")
    say("reading the run's dataset (slice cache)")
    cache = build_cache(read_datasets(cfg.data.root, cfg.data.train_extra), spec,
                        cfg.data.cache_folder)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _build(tmp, cfg, report, splits, cache, slice_net, study_net, ckpt, spec, name=name,
                          version=version, int8=int8, fp16=fp16, parity_studies=parity_studies,
                          check_studies=check_studies, calibration_slices=calibration_slices, threads=threads,
                          command=command, run_name=run_dir.name,
                          trained_at=provenance.recorded(run_dir), say=say)
        load_bundle(tmp)  # the node's own verification, before the bundle is put in place
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _build(tmp: Path, cfg: TrainConfig, report: dict, splits: dict, cache: SliceCache, slice_net, study_net,
           ckpt: dict, spec: PreprocessSpec, *, name: str, version: str, int8: bool, fp16: bool,
           parity_studies: int, check_studies: int, calibration_slices: int, threads: int, command: str,
           run_name: str, trained_at: str | None, say: Say) -> Manifest:
    t0 = time.perf_counter()
    say("exporting stage 1 and stage 2 to ONNX")
    export_stage1(slice_net, spec, tmp / "stage1.onnx")
    export_stage2(study_net, int(ckpt["feature_dim"]), tmp / "stage2.onnx")
    runner = _Runner(cache, tmp / "stage2.onnx", threads)
    val = splits["val"]
    parity_uids = _pick_studies(cache, val, parity_studies)
    say(f"parity: torch against onnxruntime on {len(parity_uids)} validation studies")
    p_torch, l_torch = runner.torch(slice_net, study_net, parity_uids)
    p_onnx, l_onnx = runner.onnx(tmp / "stage1.onnx", parity_uids)
    parity_diff = float(np.max(np.abs(p_torch - p_onnx)))
    if parity_diff > PARITY_TOLERANCE:
        raise ExportError(f"parity failed: study probabilities differ by up to {parity_diff:.2e} between torch and "
                          f"onnxruntime (limit {PARITY_TOLERANCE:g}); no bundle written")
    parity = {"studies": len(parity_uids), "slices": int(len(l_torch)),
              "max_abs_study_probability_difference": parity_diff,
              "max_abs_slice_logit_difference": float(np.max(np.abs(l_torch - l_onnx))),
              "tolerance": PARITY_TOLERANCE}
    say(f"parity ok: largest study probability difference {parity_diff:.2e}")

    check_uids = _pick_studies(cache, val, check_studies)
    reference: np.ndarray | None = None
    entries = [_entry(tmp, "stage1.onnx", "stage1", "fp32"), _entry(tmp, "stage2.onnx", "stage2", "fp32")]
    variants: list[tuple[Literal["int8", "fp16"], str]] = []
    if int8:
        variants.append(("int8", "stage1.int8.onnx"))
    if fp16:
        variants.append(("fp16", "stage1.fp16.onnx"))
    for precision, filename in variants:
        if reference is None:
            reference, _ = runner.onnx(tmp / "stage1.onnx", check_uids)
        say(f"{precision}: making and checking it on {len(check_uids)} validation studies")
        if precision == "int8":
            train_uids = splits["train"]
            quantize_int8(tmp / "stage1.onnx", tmp / filename,
                          _calibration(cache, train_uids, calibration_slices, cfg.seed))
        else:
            convert_fp16(tmp / "stage1.onnx", tmp / filename)
        probs, _ = runner.onnx(tmp / filename, check_uids)
        diff = float(np.max(np.abs(probs - reference)))
        accepted = diff <= VARIANT_TOLERANCE
        say(f"{precision}: largest study probability difference from fp32 {diff:.4f} "
            f"({'accepted' if accepted else f'not used: over {VARIANT_TOLERANCE}'})")
        entries.append(_entry(tmp, filename, "stage1", precision, diff, accepted))
    op = report["operating_point"]
    synthetic = bool(report.get("synthetic_data", False))
    manifest = Manifest(
        format="petriage-bundle/1", name=name, version=version,
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        intended_use=INTENDED_USE, synthetic_training_data=synthetic,
        warning=SYNTHETIC_WARNING if synthetic else None, preprocess=spec.to_dict(),
        cam_stride=cfg.stage1.output_stride, key_slices=3,
        operating_points=[OperatingPoint(name=f"sensitivity-{op['target_sensitivity']:g}", threshold=op["threshold"],
                                         target_sensitivity=op["target_sensitivity"],
                                         val_sensitivity=op["val_sensitivity"],
                                         val_specificity=op["val_specificity"],
                                         chosen_on=op.get("chosen_on"), val_studies=op.get("val_studies"),
                                         val_sensitivity_ci95=op.get("val_sensitivity_ci95"),
                                         val_specificity_ci95=op.get("val_specificity_ci95"))],
        default_operating_point=f"sensitivity-{op['target_sensitivity']:g}",
        files=entries,
        training={"run": run_name, "seed": cfg.seed, "data_root": str(cfg.data.root),
                  "split_sizes": report.get("split_sizes"), "test_studies": report.get("test_studies"),
                  "test_study_auc": report.get("study_auc"), "test_study_auc_ci95": report.get("study_auc_ci95"),
                  "test_operating_point": op, "pointing_game": report.get("pointing_game"),
                  "stage1": {"depth": cfg.stage1.depth, "width": cfg.stage1.width,
                             "attention_weight": cfg.stage1.attention_weight,
                             "attention_loss": cfg.stage1.attention_loss, "crop": cfg.stage1.crop,
                             "feature_scores": cfg.stage1.feature_scores,
                             "enhancement": cfg.stage1.enhancement},
                  "stage2": {"rnn": cfg.stage2.rnn, "hidden": cfg.stage2.hidden, "inputs": cfg.stage2.inputs},
                  # the code that trained it (recorded by the run; None for runs older than that record)
                  "code_commit": trained_at, "export_commit": provenance.current_commit(),
                  "export_command": command,
                  "export_seconds": round(time.perf_counter() - t0, 1)},
        parity=parity,
    )
    (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=1) + "\n")
    return manifest


def _entry(folder: Path, filename: str, stage: Literal["stage1", "stage2"],
           precision: Literal["fp32", "fp16", "int8"], diff: float | None = None,
           accepted: bool = True) -> ModelFile:
    inputs, outputs = tensor_infos(folder / filename)
    path = folder / filename
    return ModelFile(path=filename, sha256=sha256_of(path), bytes=path.stat().st_size, stage=stage,
                     precision=precision, inputs=inputs, outputs=outputs, max_abs_study_difference=diff,
                     accepted=accepted)
