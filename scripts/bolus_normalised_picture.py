"""The same slabs without and with the bolus normalised (docs/training-bolus-normalised.png).

Reads one training-split study each of the weakest, a middling and the strongest drawn bolus from two slab
caches of the same studies, one built without and one with ``preprocess.bolus_reference_hu``, and shows the PE window of
the middle slab of each, with the drawn lumen HU (phantom.json), the one the node measures and the factor
it applies:

    .venv/bin/python scripts/bolus_normalised_picture.py data/varied/.cache/8e78324b57e4c310 \\
        data/varied/.cache/32382ee7f83272e1 --phantom data/varied/phantom.json --splits runs/v19/splits.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from node.preprocess import PreprocessSpec, bolus_factor, study_bolus_hu, to_grid  # noqa: E402
from training.data import _slab_volume, open_cache, read_datasets  # noqa: E402

CAPTION = "AI triage aid, not for diagnostic use; synthetic phantom studies"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plain", type=Path, help="slab cache built without the normalisation")
    ap.add_argument("normalised", type=Path, help="slab cache of the same studies built with it")
    ap.add_argument("--phantom", type=Path, required=True)
    ap.add_argument("--splits", type=Path, required=True, help="a run's splits.json: its training split only")
    ap.add_argument("--out", type=Path, default=Path("docs/training-bolus-normalised.png"))
    a = ap.parse_args()
    plain, normalised = open_cache(a.plain), open_cache(a.normalised)
    spec = PreprocessSpec.from_dict(json.loads((a.normalised / "layout.json").read_text())["spec"])
    records = {r.study_instance_uid: r for r in read_datasets(a.phantom.parent)}
    drawn = {s["study_instance_uid"]: s for s in json.loads(a.phantom.read_text())["studies"]}
    train = set(json.loads(a.splits.read_text())["train"]) & drawn.keys()
    by_hu = sorted((drawn[s["study_instance_uid"]]["artery_hu"], i) for i, s in enumerate(plain.studies)
                   if s["study_instance_uid"] in train)
    picks = [by_hu[0], by_hu[len(by_hu) // 2], by_hu[-1]]
    fig, ax = plt.subplots(2, 3, figsize=(12, 9.4))
    for col, (hu, i) in enumerate(picks):
        st = plain.studies[i]
        other = normalised.study(st["study_instance_uid"])
        volume, _, hu_slabs = _slab_volume(records[st["study_instance_uid"]], spec)
        measured = study_bolus_hu(to_grid(hu_slabs, spec, volume.pixel_spacing_mm))  # as the node measures it
        factor = bolus_factor(measured, spec)
        for row, (cache, entry, name) in enumerate([(plain, st, "as drawn"), (normalised, other, "normalised")]):
            mid = entry["start"] + entry["count"] // 2
            size = cache.images.shape[-1]
            lo, hi = size // 5, size - size // 5
            ax[row, col].imshow(cache.images[mid, 0, lo:hi, lo:hi], cmap="gray", vmin=0, vmax=255)
            ax[row, col].set_xticks([])
            ax[row, col].set_yticks([])
            extra = f"measured {measured:.0f} HU" if row == 0 else f"x {factor:.2f} above 80 HU"
            ax[row, col].set_title(f"lumen drawn {hu:.0f} HU, {name}\n{extra}", fontsize=10)
    fig.suptitle(f"PE window, middle slab: bolus normalised to {spec.bolus_reference_hu:g} HU (node/preprocess.py)\n"
                 + CAPTION, fontsize=11)
    fig.tight_layout(h_pad=2.5)
    fig.savefig(a.out, dpi=60)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
