"""Per-study latency of the model: onnxruntime (fp32, int8) against torch eager on the same weights.

    .venv/bin/python benchmarks/inference.py [--bundle models/demo] [--run RUN] [--slices 300] [--threads 2]

The weights: those of ``--run`` (a petriage-train run; its stage1.pt/stage2.pt) exported afresh, or,
without ``--run``, the bundle's architecture with seeded random weights exported afresh (latency does not
depend on the values). Both paths then run the same weights on the same preprocessed 300-slice study.
The baseline is torch eager; the script prints seconds per study for each path and the ratio to it,
the end-to-end time of ``Engine.analyze`` (DICOM decode + preprocessing + model) from files, the peak
memory traced in a second, untimed run of it, and the int8 variant's largest probability difference from fp32 on the
phantom studies it ran. It needs the train extra (torch, onnx).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from node.bundle import Bundle, read_manifest
from node.inference import Engine
from node.phantom import PhantomOptions, generate_study, write_study
from node.preprocess import PreprocessSpec, add_context, preprocess, to_float
from node.series import index_series, read_volume
from onnx_export.graphs import export_stage1, export_stage2
from onnx_export.variants import quantize_int8
from training.models import SliceNet, StudyNet


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_study(s1: ort.InferenceSession, s2: ort.InferenceSession, images: np.ndarray, batch: int) -> float:
    feats = [s1.run(None, {"image": to_float(images[lo:lo + batch])})[1] for lo in range(0, len(images), batch)]
    study, _ = s2.run(None, {"features": np.concatenate(feats)[None]})
    return float(1 / (1 + np.exp(-study[0])))


def _torch_study(net: SliceNet, study: StudyNet, images: np.ndarray, batch: int) -> float:
    with torch.inference_mode():
        feats = [net(torch.from_numpy(to_float(images[lo:lo + batch])))[1] for lo in range(0, len(images), batch)]
        return float(torch.sigmoid(study(torch.cat(feats)[None])[0])[0])


def _best_of(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/demo"))
    parser.add_argument("--run", type=Path, default=None, help="training run whose weights to use")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest = read_manifest(args.bundle)
    spec = PreprocessSpec.from_dict(manifest.preprocess)
    arch = manifest.training["stage1"]
    if args.run:
        from training.engine import load_slice_net, load_study_net

        net, _ = load_slice_net(args.run / "stage1.pt", torch.device("cpu"))
        study_net = load_study_net(args.run / "stage2.pt", torch.device("cpu"))
        weights = f"run {args.run}"
    else:
        torch.manual_seed(0)
        net = SliceNet(depth=arch["depth"], width=arch["width"], in_channels=spec.channels,
                       output_stride=manifest.cam_stride, feature_scores=arch.get("feature_scores", False)).eval()
        study_net = StudyNet(net.feature_dim, manifest.training["stage2"]["hidden"],
                             rnn=manifest.training["stage2"]["rnn"],
                             inputs=manifest.training["stage2"].get("inputs", "all")).eval()
        weights = "seeded random weights of the bundle's architecture"
    print(f"weights: {weights}; input {spec.size} px, {spec.channels} channels; {args.threads} threads; "
          f"onnxruntime {ort.__version__}, torch {torch.__version__}")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print(f"making a {args.slices}-slice 512x512 phantom study and a second, negative one ...")
        studies = {}
        for seed, pe in ((7, True), (8, False)):
            st = generate_study(seed, pe=pe, options=PhantomOptions(slices=args.slices))
            studies[pe] = write_study(st, tmp / f"s{seed}")["ctpa"]
        volume = read_volume(studies[True])
        images = add_context(preprocess(volume.hu, spec, volume.pixel_spacing_mm), spec.context)
        del volume
        export_stage1(net, spec, tmp / "stage1.onnx")
        export_stage2(study_net, net.feature_dim, tmp / "stage2.onnx")
        quantize_int8(tmp / "stage1.onnx", tmp / "stage1.int8.onnx", to_float(images[:: max(1, len(images) // 64)]))
        s2 = _session(tmp / "stage2.onnx", args.threads)
        fp32, int8 = _session(tmp / "stage1.onnx", args.threads), _session(tmp / "stage1.int8.onnx", args.threads)
        t_torch, p_torch = _best_of(lambda: _torch_study(net, study_net, images, args.batch), args.repeats)
        t_fp32, p_fp32 = _best_of(lambda: _onnx_study(fp32, s2, images, args.batch), args.repeats)
        t_int8, p_int8 = _best_of(lambda: _onnx_study(int8, s2, images, args.batch), args.repeats)
        diffs = [abs(float(p_int8) - float(p_fp32))]  # type: ignore[arg-type]
        other = read_volume(studies[False])
        other_images = add_context(preprocess(other.hu, spec, other.pixel_spacing_mm), spec.context)
        diffs.append(abs(_onnx_study(int8, s2, other_images, args.batch) - _onnx_study(fp32, s2, other_images,
                                                                                       args.batch)))
        rows = [("torch eager (baseline)", t_torch, 1.0), ("onnxruntime fp32", t_fp32, t_torch / t_fp32),
                ("onnxruntime int8", t_int8, t_torch / t_int8)]
        print(f"\nmodel only, {len(images)} preprocessed slices, best of {args.repeats}:")
        print(f"{'path':<24} {'s/study':>8} {'speed-up vs torch':>18}")
        for name, t, r in rows:
            print(f"{name:<24} {t:8.2f} {r:17.2f}x")
        print(f"parity fp32 vs torch: {abs(float(p_fp32) - float(p_torch)):.1e}; "  # type: ignore[arg-type]
              f"int8 vs fp32, largest of 2 studies: {max(diffs):.4f}")

        # End to end through the node's engine, from DICOM files (a bundle folder made from these files).
        bundle_dir = tmp / "bundle"
        bundle_dir.mkdir()
        for name in ("stage1.onnx", "stage1.int8.onnx", "stage2.onnx"):
            shutil.copy(tmp / name, bundle_dir / name)
        ends = {}
        for precision in ("fp32", "int8"):
            engine = Engine(Bundle(bundle_dir, _local_manifest(manifest, bundle_dir)), device="cpu",
                            precision=precision, threads=args.threads, batch=args.batch)
            index = index_series(studies[True])
            engine.analyze(index)  # warm
            start = time.perf_counter()
            engine.analyze(index)
            ends[precision] = time.perf_counter() - start
            tracemalloc.start()  # a second, untimed run: tracing slows every allocation
            engine.analyze(index)
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            print(f"end to end (decode + preprocess + model), {precision}: {ends[precision]:.2f} s, "
                  f"peak traced memory {peak:.0f} MiB")
        if args.json:
            args.json.write_text(json.dumps({
                "threads": args.threads, "slices": len(images), "torch_s": t_torch, "onnx_fp32_s": t_fp32,
                "onnx_int8_s": t_int8, "speedup_fp32": t_torch / t_fp32, "speedup_int8": t_torch / t_int8,
                "int8_max_abs_diff": max(diffs), "end_to_end_s": ends, "weights": weights}, indent=1))
    return 0


def _local_manifest(manifest, folder: Path):
    """The bundle's manifest pointed at the freshly exported files (new hashes, same spec)."""
    from node.bundle import sha256_of

    files = []
    for f in manifest.files:
        if f.precision in ("fp32", "int8") and (folder / f.path).is_file():
            files.append(f.model_copy(update={"sha256": sha256_of(folder / f.path), "accepted": True}))
    return manifest.model_copy(update={"files": files})


if __name__ == "__main__":
    raise SystemExit(main())
