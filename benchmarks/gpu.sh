#!/usr/bin/env bash
# Model latency on a CUDA machine, in one short call (see README "GPU").
#
#   bash benchmarks/gpu.sh [BUNDLE] [RUN]   # default models/demo; RUN: a training run folder
#
# With RUN (its stage1.pt and stage2.pt, e.g. the run the bundle was exported from) the bundle's own
# trained weights are timed and the probabilities compared; without it, seeded weights of the same
# architecture.
#
# The lent GPU machines have torch with CUDA and a CPU onnxruntime, and cannot download the
# onnxruntime-gpu wheel (~256 MB). So this measures, on the same seeded weights of the bundle's
# architecture and a 300-slice preprocessed phantom study: torch eager on CUDA in fp32 and in fp16
# (autocast), torch eager on the CPU as the baseline, and onnxruntime with every provider it finds
# (it says which). Missing pydicom/pydantic are installed from ./.whl when present (carried wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE="${1:-models/demo}"
RUN="${2:-}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install --quiet --no-index --no-deps .whl/*.whl 2>/dev/null || true
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" python3 - "$BUNDLE" "$RUN" <<'PY'
import sys, time
import numpy as np, torch, onnxruntime as ort
from node.bundle import read_manifest
from node.preprocess import PreprocessSpec, add_context, preprocess, to_float
from node.phantom import PhantomOptions, generate_study
from training.models import SliceNet, StudyNet

manifest = read_manifest(sys.argv[1])
spec = PreprocessSpec.from_dict(manifest.preprocess)
arch, s2 = manifest.training["stage1"], manifest.training["stage2"]
torch.manual_seed(0)
net = SliceNet(depth=arch["depth"], width=arch["width"], in_channels=spec.channels, output_stride=manifest.cam_stride).eval()
study = StudyNet(net.feature_dim, s2["hidden"], rnn=s2["rnn"]).eval()
if sys.argv[2]:
    from pathlib import Path
    from training.engine import load_slice_net, load_study_net
    net, _ = load_slice_net(Path(sys.argv[2]) / "stage1.pt", torch.device("cpu"))
    study = load_study_net(Path(sys.argv[2]) / "stage2.pt", torch.device("cpu"))
    print(f"weights: {sys.argv[2]} (trained)")
else:
    print("weights: seeded (untrained), the bundle's architecture")
st = generate_study(7, pe=True, options=PhantomOptions(slices=300))
px = float(st.grid.xs[1] - st.grid.xs[0])
x = torch.from_numpy(to_float(add_context(preprocess(st.image.hu, spec, (px, px)), spec.context)))
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, onnxruntime {ort.__version__} providers {ort.get_available_providers()}")

def run(device, dtype=None, batch=64, repeats=5):
    n, s = net.to(device), study.to(device)
    xs = x.to(device)
    def once():
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            f = torch.cat([n(xs[i:i + batch])[1] for i in range(0, len(xs), batch)])
            p = torch.sigmoid(s(f.float()[None])[0])[0].item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return p
    once()
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); p = once(); times.append(time.perf_counter() - t)
    return min(times), p

torch.set_num_threads(2)
base, p_cpu = run(torch.device("cpu"), batch=16, repeats=2)
print(f"torch eager CPU (2 threads, baseline): {base:.3f} s/study, probability {p_cpu:.4f}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name(0)}")
    for name, dtype in (("fp32", None), ("fp16 autocast", torch.float16)):
        t, p = run(torch.device("cuda"), dtype)
        print(f"torch eager CUDA {name}: {t:.4f} s/study ({base / t:.0f}x the CPU baseline; |p - p_cpu| {abs(p - p_cpu):.1e})")
import tempfile, pathlib
from onnx_export.graphs import export_stage1
with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "stage1.onnx"
    export_stage1(net.cpu(), spec, path)
    for providers in ([p] for p in ort.get_available_providers() if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider")):
        sess = ort.InferenceSession(str(path), providers=providers)
        xn = x.numpy()
        sess.run(None, {"image": xn[:16]})
        t = time.perf_counter()
        for i in range(0, len(xn), 16):
            sess.run(None, {"image": xn[i:i + 16]})
        print(f"onnxruntime stage 1 on {sess.get_providers()[0]}: {time.perf_counter() - t:.3f} s/study")
PY
