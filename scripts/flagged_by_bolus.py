"""Which studies a bundle flags, by the arterial enhancement the phantom drew (validation sets only).

Reads check_bundle.py's results.json files and the datasets' phantom.json (``artery_hu`` per study) and
prints, per test and per lumen band, the PE-negative studies flagged and the PE-positive studies found
at the bundle's own threshold (the rows' decisions), and the rank correlation of a negative's
probability with its lumen HU and with its drawn vein-to-artery HU ratio (the style's variation, redrawn
from the study's seed). The table in docs/training.md, "Which PE-negative studies bundle 0.4.0
flags", and each later run's weak-bolus line come from it:

    .venv/bin/python scripts/flagged_by_bolus.py runs/choose-040/results.json runs/choose-v19-val/results.json \\
        --phantom data/varied/phantom.json data/varied-segmental-val/phantom.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import spearmanr

from node.phantom.styles import draw_variation

BANDS = ((0.0, 250.0, "under 250 HU"), (250.0, 350.0, "250-350 HU"), (350.0, 450.0, "350-450 HU"),
         (450.0, 10_000.0, "450 HU and more"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="check_bundle.py results.json files")
    parser.add_argument("--phantom", nargs="+", required=True, help="the tests' phantom.json files")
    args = parser.parse_args()
    drawn: dict[str, float] = {}
    vein_over_artery: dict[str, float] = {}  # the style's drawn vein and artery HU, redrawn from the study's seed
    for path in args.phantom:
        for s in json.loads(Path(path).read_text())["studies"]:
            drawn[s["study_instance_uid"]] = s["artery_hu"]
            if s.get("style") in ("varied", "shifted"):
                v = draw_variation(s["seed"], s["style"])
                vein_over_artery[s["study_instance_uid"]] = v.hu_vein / v.hu_artery
    for path in args.results:
        for test in json.loads(Path(path).read_text())["tests"]:
            rows = [r for r in test["rows"] if r["study_instance_uid"] in drawn]
            if len(rows) < len(test["rows"]):
                missing = len(test["rows"]) - len(rows)
                print(f"{path} {test['test']}: {missing} studies not in the phantom.json files given")
            print(f"{path} {test['test']} (threshold {test['threshold']:.3f}): negatives flagged / positives found")
            for lo, hi, name in BANDS:
                band = [r for r in rows if lo <= drawn[r["study_instance_uid"]] < hi]
                neg, pos = [r for r in band if not r["pe"]], [r for r in band if r["pe"]]
                flagged, found = sum(r["positive"] for r in neg), sum(r["positive"] for r in pos)
                print(f"  {name:>16}: {flagged}/{len(neg)} / {found}/{len(pos)}")
            neg = [r for r in rows if not r["pe"]]
            rho = spearmanr([drawn[r["study_instance_uid"]] for r in neg], [r["probability"] for r in neg]).statistic
            print(f"  negatives: probability against lumen HU, Spearman {rho:+.2f}")
            ratio = [r for r in neg if r["study_instance_uid"] in vein_over_artery]
            if ratio:
                rho = spearmanr([vein_over_artery[r["study_instance_uid"]] for r in ratio],
                                [r["probability"] for r in ratio]).statistic
                print(f"  negatives: probability against the drawn vein / artery HU, Spearman {rho:+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
