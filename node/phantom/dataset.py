"""Many phantom studies in the RSNA-STR Pulmonary Embolism layout, with sparse pixel masks.

Layout written under ``out_dir``::

    train.csv                       one row per image, RSNA-STR PE columns (see RSNA_COLUMNS)
    train/<Study>/<Series>/<SOP>.dcm
    masks/<Study>.npz               only for the sparsely annotated studies (format below)
    phantom.json                    ground truth per study (emboli, confounders, seeds)

Mask format (``masks/<StudyInstanceUID>.npz``, numpy ``savez_compressed``):

- ``sop_instance_uid``: (N,) str, the annotated images of the study;
- ``mask``: (N, Rows, Columns) uint8, 1 inside an embolus, in the image's own row/column order.

Only N of the study's PE-positive images are annotated (the paper's *sparse* annotation); an image
not listed has no pixel annotation, which says nothing about whether it shows PE (``train.csv``
says that).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from node.phantom.study import PhantomOptions, PhantomStudy, generate_study, write_study
from node.phantom.writer import uid_for

#: Study-level columns of the RSNA-STR PE ``train.csv``, in its order.
RSNA_STUDY_COLUMNS = (
    "negative_exam_for_pe", "qa_motion", "qa_contrast", "flow_artifact", "rv_lv_ratio_gte_1",
    "rv_lv_ratio_lt_1", "leftsided_pe", "chronic_pe", "true_filling_defect_not_pe", "rightsided_pe",
    "acute_and_chronic_pe", "central_pe", "indeterminate",
)
RSNA_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "pe_present_on_image",
                *RSNA_STUDY_COLUMNS)

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class _Job:
    index: int
    seed: int
    pe: bool
    annotate: bool
    annotated_slice_fraction: float
    options: PhantomOptions
    out_dir: Path


def study_labels(study: PhantomStudy) -> dict[str, int]:
    """The RSNA study-level columns for a phantom study."""
    emboli = study.emboli
    positive = int(study.pe_present)
    return {
        "negative_exam_for_pe": 1 - positive,
        "qa_motion": 0,
        "qa_contrast": 0,
        "flow_artifact": int(bool(study.anatomy.flow_artefacts)),
        "rv_lv_ratio_gte_1": 0,
        "rv_lv_ratio_lt_1": positive,  # the phantom heart shows no right-ventricular strain
        "leftsided_pe": int(any(e.side == "L" for e in emboli)),
        "chronic_pe": 0,
        "true_filling_defect_not_pe": 0,
        "rightsided_pe": int(any(e.side == "R" for e in emboli)),
        "acute_and_chronic_pe": 0,
        "central_pe": int(any(e.level == "central" for e in emboli)),
        "indeterminate": 0,
    }


def _make_one(job: _Job) -> dict:
    study = generate_study(job.seed, pe=job.pe, options=job.options)
    written = write_study(study, job.out_dir / "train")
    ctpa = written["ctpa"]
    # Files are listed in InstanceNumber order; map each back to its slice by SOP Instance UID.
    slice_of = {uid_for(job.seed, "instance", "ctpa", k): k for k in range(len(study.grid.zs))}
    labels = study.slice_labels
    study_cols = study_labels(study)
    rows = []
    for path in ctpa:
        k = slice_of[path.stem]
        rows.append({"StudyInstanceUID": study.identity.study_instance_uid,
                     "SeriesInstanceUID": path.parent.name, "SOPInstanceUID": path.stem,
                     "pe_present_on_image": int(labels[k]), **study_cols})
    annotated: list[int] = []
    if job.annotate and study.pe_present:
        positive = np.nonzero(labels)[0]
        rng = np.random.default_rng([job.seed, 31337])
        n = max(1, round(len(positive) * job.annotated_slice_fraction))
        annotated = sorted(int(k) for k in rng.choice(positive, size=n, replace=False))
        uids = {k: u for u, k in slice_of.items()}
        masks_dir = job.out_dir / "masks"
        masks_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(masks_dir / f"{study.identity.study_instance_uid}.npz",
                            sop_instance_uid=np.array([uids[k] for k in annotated]),
                            mask=study.image.mask[annotated].astype(np.uint8))
    truth = {
        "index": job.index, "seed": job.seed, "study_instance_uid": study.identity.study_instance_uid,
        "pe_present": study.pe_present, "slices": len(study.grid.zs),
        "positive_slices": int(labels.sum()), "annotated_slices": len(annotated),
        "emboli": [asdict(e) for e in study.emboli],
        "flow_artefacts": len(study.anatomy.flow_artefacts),
        "noise_sigma_hu": round(study.anatomy.noise_sigma, 1),
        "artery_hu": round(study.anatomy.hu_artery, 1), "patient_size": round(study.anatomy.size, 3),
        "style": job.options.style, "matrix": study.options.matrix, "fov_mm": study.options.fov_mm,
        "slice_spacing_mm": study.options.slice_spacing_mm, "slice_thickness_mm": study.options.thickness_mm,
        "emboli_kinds": [e.kind for e in study.anatomy.emboli],
    }
    return {"rows": rows, "truth": truth}


def write_rsna_dataset(out_dir: Path, *, studies: int, positive_fraction: float = 0.5, seed: int = 0,
                       options: PhantomOptions | None = None, annotated_fraction: float = 0.3,
                       annotated_slice_fraction: float = 0.5, workers: int = 1,
                       progress: Progress | None = None) -> Path:
    """Write ``studies`` phantom studies in the RSNA-STR PE layout; returns the path of train.csv.

    Parameters
    ----------
    positive_fraction
        Share of PE-positive studies (rounded to a whole number of studies).
    seed
        Seeds every study (study ``i`` gets its own seed derived from this one).
    annotated_fraction
        Share of positive studies that get pixel masks.
    annotated_slice_fraction
        Share of a mask-bearing study's positive slices that are annotated (at least one).
    workers
        Processes generating studies in parallel.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = options or PhantomOptions()
    rng = np.random.default_rng([seed, 4242])
    n_pos = round(studies * positive_fraction)
    pe = rng.permutation(np.arange(studies) < n_pos)
    seeds = rng.choice(2**31 - 1, size=studies, replace=False)
    annotate = rng.random(studies) < annotated_fraction
    jobs = [_Job(i, int(seeds[i]), bool(pe[i]), bool(annotate[i]), annotated_slice_fraction, options, out_dir)
            for i in range(studies)]
    results: list[dict] = []

    def done(result: dict) -> None:
        results.append(result)
        if progress:
            t = result["truth"]
            progress(len(results), studies, f"study {t['index']}: {'PE' if t['pe_present'] else 'no PE'}")

    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for result in pool.map(_make_one, jobs):
                done(result)
    else:
        for job in jobs:
            done(_make_one(job))
    results.sort(key=lambda r: r["truth"]["index"])
    csv_path = out_dir / "train.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RSNA_COLUMNS)
        writer.writeheader()
        for r in results:
            writer.writerows(r["rows"])
    manifest = {"generator": "petriage phantom", "seed": seed, "options": asdict(options),
                "note": "synthetic data - not patient data", "studies": [r["truth"] for r in results]}
    (out_dir / "phantom.json").write_text(json.dumps(manifest, indent=1))
    return csv_path
