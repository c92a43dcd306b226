"""Make the phantom figures and figures of merit under docs/ (a full-size 512x512x300 study).

    .venv/bin/python scripts/phantom_figures.py [--seed 2031] [--out docs]

Prints the generation time, dciodvfy's verdict on every file and HU statistics per structure, and
writes docs/phantom-{axial,coronal,overlay,overlay-zoom}.png and docs/phantom-figures.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from node.phantom import COMPANIONS, HU_RANGE, PhantomOptions, generate_study, write_study
from node.phantom.preview import write_previews
from node.validation import dciodvfy, dciodvfy_available


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2031)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    start = time.perf_counter()
    study = generate_study(args.seed, pe=True, options=PhantomOptions(companions=COMPANIONS))
    generated = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        written = write_study(study, Path(tmp))
        wrote = time.perf_counter() - start
        files = [p for paths in written.values() for p in paths]
        verdicts = [dciodvfy(p) for p in files] if dciodvfy_available() else []
    hu = {s.name: {"mean": round(m, 1), "std": round(sd, 1), "voxels": n,
                   "spec": HU_RANGE.get(s)} for s, (m, sd, n) in study.structure_hu().items()}
    figures = {
        "seed": args.seed, "matrix": 512, "slices": 300, "slice_spacing_mm": 1.0,
        "seconds_generate_ctpa": round(generated, 2), "seconds_write_all_series": round(wrote, 2),
        "files": {k: len(v) for k, v in written.items()},
        "dciodvfy": {"files": len(verdicts), "errors": sum(len(v.errors) for v in verdicts),
                     "warnings": sum(len(v.warnings) for v in verdicts)} if verdicts else "not installed",
        "emboli": [e.__dict__ | {"slices": [e.slices[0], e.slices[-1]]} for e in study.emboli],
        "hu": hu,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    pngs = write_previews(study, args.out, prefix="phantom")
    (args.out / "phantom-figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps({k: v for k, v in figures.items() if k != "hu"}, indent=1))
    for name, s in hu.items():
        print(f"{name:20s} {s['mean']:8.1f} +/- {s['std']:6.1f}  n={s['voxels']:>9}  spec={s['spec']}")
    print("wrote", *pngs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
