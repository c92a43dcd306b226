"""The attention-map SEG of a 300-slice study: size and build time, against the uncompressed encoding
and the model's own analysis time in the same run.

    .venv/bin/python benchmarks/seg.py [--slices 300] [--matrix 512]

Two phantom studies (PE and no PE, classic style) are written and analysed by the demo bundle on the
CPU; then for each:

- baseline sizes: the same SEG decompressed (Explicit VR Little Endian), and the CT series itself;
- the SEG as the node writes it (RLE Lossless, frames only above ``outputs.seg_floor``): frames, bytes,
  and the seconds ``node.outputs.seg.make_seg`` takes, with its ratio to the analysis time.

Prints one line per study. Sizes do not depend on the machine; times do: compare ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.bundle import load_bundle  # noqa: E402
from node.config import OutputSettings  # noqa: E402
from node.inference import Engine  # noqa: E402
from node.outputs.seg import make_seg  # noqa: E402
from node.phantom import PhantomOptions, generate_study, write_study  # noqa: E402
from node.series import index_series  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


def _size(ds: pydicom.Dataset) -> int:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return len(out.getvalue())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--matrix", type=int, default=512)
    a = ap.parse_args()
    options = PhantomOptions(matrix=a.matrix, slices=a.slices, slice_spacing_mm=1.0, min_embolus_mm=10.0,
                             embolus_levels=("central", "lobar"))
    engine = Engine(DEMO, device="cpu")
    manifest = load_bundle(DEMO).manifest
    floor = OutputSettings().seg_floor
    with tempfile.TemporaryDirectory() as tmp:
        for seed, pe in ((960001, True), (960002, False)):
            print(f"writing and analysing a {a.slices}-slice {a.matrix}x{a.matrix} study ({'PE' if pe else 'no PE'})",
                  flush=True)
            paths = write_study(generate_study(seed, pe=pe, options=options), Path(tmp) / str(seed))["ctpa"]
            ct_bytes = sum(p.stat().st_size for p in paths)
            index = index_series(paths)
            start = time.perf_counter()
            result = engine.analyze(index)
            analysis = time.perf_counter() - start
            headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in index.paths]
            start = time.perf_counter()
            segs = make_seg(result, index, headers, model_sha256="0" * 64, spec=manifest.spec(),
                            cam_stride=manifest.cam_stride, floor=floor)
            build = time.perf_counter() - start
            seg = segs[0]
            rle = _size(seg)
            plain = pydicom.dcmread(BytesIO(_one(seg)))
            plain.decompress(generate_instance_uid=False)
            explicit = _size(plain)
            print(f"{'PE' if pe else 'no PE'}: p={result.probability:.3f}; SEG {int(seg.NumberOfFrames)} of "
                  f"{len(index)} frames above {floor}: {rle / 1e6:.2f} MB RLE, {explicit / 1e6:.1f} MB uncompressed "
                  f"(x{explicit / rle:.0f}), CT {ct_bytes / 1e6:.0f} MB; built in {build:.2f} s = "
                  f"{build / analysis:.2f} x the analysis ({analysis:.2f} s)", flush=True)
    return 0


def _one(ds: pydicom.Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())
