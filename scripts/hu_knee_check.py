"""Test-time check: does the PE window's clipping at 450 HU hide clots in strongly enhanced arteries?

Runs ``scripts/check_bundle.py`` with the node's preprocessing changed for this process only: every HU
above ``--knee`` is pulled towards it by ``--factor`` before the windows (a 600 HU artery reads 450 with
the defaults, nothing below 300 HU moves). Compare its results.json with an unchanged run on the same
studies (``scripts/compare_bundles.py``, or by the phantom's artery_hu). Measurement only; the node's
preprocessing is not changed by it.

    python scripts/hu_knee_check.py --knee 300 --factor 0.5 -- --bundle models/demo \\
        --test val=data/varied:runs/v10/splits.json@val --out runs/tt-030-300-05
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import node.inference as inference  # noqa: E402
import node.preprocess as preprocess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--knee", type=float, default=300.0)
    ap.add_argument("--factor", type=float, default=0.5)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then check_bundle.py's arguments")
    a = ap.parse_args()
    original = preprocess.preprocess

    def kneed(hu, spec, pixel_mm=None):
        hu = hu.astype(np.float32)
        return original(np.where(hu > a.knee, a.knee + a.factor * (hu - a.knee), hu), spec, pixel_mm)

    inference.preprocess = kneed  # the engine's own reference
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    sys.argv = ["check_bundle.py", *rest]
    runpy.run_path(str(Path(__file__).resolve().parent / "check_bundle.py"), run_name="__main__")


if __name__ == "__main__":
    main()
