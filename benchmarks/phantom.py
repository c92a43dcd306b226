"""Cost of making a synthetic CTPA study, against reading the same series back (the baseline).

    .venv/bin/python benchmarks/phantom.py [--sizes 256x100,512x300]

For each size: seconds to draw and render the study, to write it (explicit little endian and
JPEG 2000 lossless), and -- the baseline, run in the same process -- to read and decode that series
with pydicom. Prints each time and its ratio to the baseline, and the peak memory traced while
rendering (numpy's allocations are visible to tracemalloc), measured in a second, untimed render.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom

from node.phantom import PhantomOptions, generate_study, write_study


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def read_series(paths: list[Path]) -> np.ndarray:
    return np.stack([pydicom.dcmread(p).pixel_array for p in paths])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256x100,512x300", help="matrix x slices, comma separated")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"{'size':>10} {'render s':>9} {'peak MiB':>9} {'write s':>8} {'j2k s':>7} {'read s':>7} "
          f"{'render/read':>11} {'write/read':>10} {'j2k/read':>9}")
    for size in args.sizes.split(","):
        matrix, slices = (int(v) for v in size.split("x"))
        options = PhantomOptions(matrix=matrix, slices=slices, slice_spacing_mm=300.0 / slices)
        study, render_s = timed(lambda options=options: generate_study(args.seed, pe=True, options=options))
        tracemalloc.start()  # a second render for memory: tracing slows Python allocations
        generate_study(args.seed, pe=True, options=options)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        with tempfile.TemporaryDirectory() as tmp:
            written, write_s = timed(lambda study=study, tmp=tmp: write_study(study, Path(tmp) / "e"))
            study.options = PhantomOptions(**{**options.__dict__, "transfer_syntax": "jpeg2000"})
            _, j2k_s = timed(lambda study=study, tmp=tmp: write_study(study, Path(tmp) / "j"))
            _, read_s = timed(lambda written=written: read_series(written["ctpa"]))
        print(f"{size:>10} {render_s:9.2f} {peak:9.0f} {write_s:8.2f} {j2k_s:7.2f} {read_s:7.2f} "
              f"{render_s / read_s:11.2f} {write_s / read_s:10.2f} {j2k_s / read_s:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
