"""Training data: the RSNA-STR PE layout with sparse masks, patient-level splits, a slice cache.

``read_rsna`` reads ``train.csv`` (study label ``1 - negative_exam_for_pe``, image labels
``pe_present_on_image``) and finds the DICOM files and, for the sparsely annotated studies,
``masks/<StudyInstanceUID>.npz`` (format in docs/phantom.md). ``split_by_patient`` keeps every
study of a patient in one split. ``build_cache`` decodes each series once, sorts it along the slice
normal, preprocesses it with :mod:`node.preprocess` and stores uint8 slices (and masks) in
memory-mapped files, so epochs never decode DICOM again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import zipfile
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from node.preprocess import (
    PreprocessSpec,
    average_slabs,
    context_offsets,
    input_pixel_mm,
    preprocess,
    resize_mask,
    slab_size,
    study_bolus_hu,
    to_grid,
    window,
)
from node.series import index_series, read_volume
from training import TrainingError

Progress = Callable[[int, int, str], None]
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class StudyRecord:
    """One study of the dataset, before any pixel is read."""

    study_instance_uid: str
    series_instance_uid: str
    files: tuple[Path, ...]
    label: int  # 1: PE present
    image_labels: dict[str, int]  # SOPInstanceUID -> pe_present_on_image
    mask_file: Path | None
    patient_id: str


def read_rsna(root: Path) -> list[StudyRecord]:
    """Read an RSNA-STR PE style dataset folder (``train.csv``, ``train/``, optional ``masks/``)."""
    root = Path(root)
    csv_path = root / "train.csv"
    if not csv_path.is_file():
        raise TrainingError(f"{csv_path}: no train.csv (expected the RSNA-STR PE layout)")
    rows: dict[str, list[dict[str, str]]] = defaultdict(list)
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        need = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "pe_present_on_image",
                "negative_exam_for_pe"}
        missing = need - set(reader.fieldnames or ())
        if missing:
            raise TrainingError(f"{csv_path}: missing columns {sorted(missing)}")
        for row in reader:
            rows[row["StudyInstanceUID"]].append(row)
    studies = []
    for study_uid, study_rows in rows.items():
        series = {r["SeriesInstanceUID"] for r in study_rows}
        if len(series) != 1:
            raise TrainingError(f"study {study_uid}: {len(series)} series in train.csv (expected one CTPA)")
        series_uid = series.pop()
        folder = root / "train" / study_uid / series_uid
        files = tuple(folder / f"{r['SOPInstanceUID']}.dcm" for r in study_rows)
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise TrainingError(f"study {study_uid}: {len(absent)} of {len(files)} files missing, e.g. {absent[0]}")
        label = 1 - int(study_rows[0]["negative_exam_for_pe"])
        mask = root / "masks" / f"{study_uid}.npz"
        patient = str(pydicom.dcmread(files[0], stop_before_pixels=True).get("PatientID", "")) or study_uid
        studies.append(StudyRecord(study_uid, series_uid, files, label,
                                   {r["SOPInstanceUID"]: int(r["pe_present_on_image"]) for r in study_rows},
                                   mask if mask.is_file() else None, patient))
    return sorted(studies, key=lambda s: s.study_instance_uid)


def read_datasets(root: Path, train_extra: list[Path] | tuple[Path, ...] = ()) -> list[StudyRecord]:
    """Every study of the main dataset and of the training-only ones (``data.train_extra``), sorted;
    the same list for training, export and any tool that opens the run's slice cache."""
    return with_training_only(read_rsna(root), train_extra)


def with_training_only(studies: list[StudyRecord], train_extra: list[Path] | tuple[Path, ...]) -> list[StudyRecord]:
    """``studies`` and those of each training-only dataset, sorted; a study read twice is refused."""
    for extra in train_extra:
        more = read_rsna(extra)
        clash = {s.study_instance_uid for s in more} & {s.study_instance_uid for s in studies}
        if clash:
            raise TrainingError(f"{extra}: {len(clash)} studies already read from another dataset, "
                                f"e.g. {sorted(clash)[0]}")
        studies = studies + more
    return sorted(studies, key=lambda s: s.study_instance_uid)


def split_by_patient(studies: list[StudyRecord], *, val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, list[StudyRecord]]:
    """Assign whole patients to train/val/test, stratified by whether the patient has PE."""
    by_patient: dict[str, list[StudyRecord]] = defaultdict(list)
    for s in studies:
        by_patient[s.patient_id].append(s)
    rng = np.random.default_rng(seed)
    out: dict[str, list[StudyRecord]] = {name: [] for name in SPLITS}
    for positive in (True, False):
        patients = sorted(p for p, ss in by_patient.items() if any(s.label for s in ss) == positive)
        rng.shuffle(patients)
        n_test = round(len(patients) * test_fraction)
        n_val = round(len(patients) * val_fraction)
        for i, patient in enumerate(patients):
            name = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            out[name] += by_patient[patient]
    for name in SPLITS:
        out[name].sort(key=lambda s: s.study_instance_uid)
    return out


@dataclass
class SliceCache:
    """Preprocessed slices of every study, memory-mapped, with an index."""

    folder: Path
    images: np.ndarray  # (N, C, S, S) uint8
    masks: np.ndarray  # (M, S, S) uint8, fraction of each pixel inside an embolus
    studies: list[dict]  # per study: uid, patient, label, start, count, image_labels, mask_rows, ...
    skipped: dict[str, str] = field(default_factory=dict)  # StudyInstanceUID -> why it is not in the cache

    def study(self, uid: str) -> dict:
        if uid in self.skipped:
            raise TrainingError(f"study {uid} is not in the cache: {self.skipped[uid]}")
        return next(s for s in self.studies if s["study_instance_uid"] == uid)


class ContextImages:
    """A cache's slabs with their neighbours stacked as extra channels, indexed like the memory map.

    Index with a row, a slice or an array of rows (optionally followed by channel and pixel indices);
    each row gets ``context`` neighbours per side from its own study, the nearest slab standing in
    past either end (node.preprocess.add_context does the same for a whole series)."""

    def __init__(self, images: np.ndarray, studies: list[dict], context: int):
        self.images, self.context = images, context
        self.first = np.zeros(len(images), dtype=np.int64)
        self.last = np.zeros(len(images), dtype=np.int64)
        for st in studies:
            self.first[st["start"]:st["start"] + st["count"]] = st["start"]
            self.last[st["start"]:st["start"] + st["count"]] = st["start"] + st["count"] - 1
        n, c, h, w = images.shape
        self.shape = (n, c + 2 * context, h, w)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        rows = np.arange(self.shape[0])[key] if isinstance(key, slice) else np.asarray(key, dtype=np.int64)
        single = rows.ndim == 0
        rows = np.atleast_1d(rows)
        parts = [self.images[rows]]
        for d in context_offsets(self.context):
            parts.append(self.images[np.clip(rows + d, self.first[rows], self.last[rows])][:, :1])
        out = np.concatenate(parts, axis=1)
        if single:
            return out[0][rest] if rest else out[0]
        return out[(slice(None), *rest)] if rest else out


def with_context(cache: SliceCache, context: int) -> SliceCache:
    """The cache as the model sees it: per-slab images, plus neighbours when the spec has context."""
    if not context:
        return cache
    return SliceCache(cache.folder, ContextImages(cache.images, cache.studies, context),  # type: ignore[arg-type]
                      cache.masks, cache.studies, cache.skipped)


def _cache_key(studies: list[StudyRecord], spec: PreprocessSpec) -> str:
    h = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
    for s in studies:
        h.update(s.study_instance_uid.encode())
        h.update(str(len(s.files)).encode())
        h.update(str(s.mask_file is not None).encode())
    return h.hexdigest()[:16]


def _spacing(positions_mm) -> float:
    """A series' slice spacing: the median step between its slice positions (0 for one slice)."""
    return float(np.median(np.abs(np.diff(positions_mm)))) if len(positions_mm) > 1 else 0.0


def _slab_volume(study: StudyRecord, spec: PreprocessSpec):
    """(volume, slices per slab, slab HU): the study decoded, sorted and averaged into slabs.

    Thin slices are averaged into slabs as the node does at inference (node.inference); a slab's
    label is positive when any of its slices is, its mask the union of its slices' masks."""
    volume = read_volume(study.files)
    k = slab_size(_spacing(volume.positions_mm), spec)
    return volume, k, average_slabs(volume.hu, k)


def _preprocessed(hu: np.ndarray, spec: PreprocessSpec, pixel_mm):
    """(first slab, model input) 64 slabs at a time: bounded memory for long series.

    A spec that normalises the bolus measures it on the whole study's input grid first, as the node
    does (node.inference), so every chunk is windowed with the study's number, not its own."""
    if spec.bolus_reference_hu is None:
        for lo in range(0, len(hu), 64):
            yield lo, preprocess(hu[lo:lo + 64], spec, pixel_mm)
        return
    grid = np.concatenate([to_grid(hu[lo:lo + 64], spec, pixel_mm) for lo in range(0, len(hu), 64)])
    bolus_hu = study_bolus_hu(grid)
    for lo in range(0, len(grid), 64):
        yield lo, window(grid[lo:lo + 64], spec, bolus_hu)


def _fill(args: tuple[StudyRecord, int, int, str, str, dict, int]) -> dict:
    """Decode, sort and preprocess one study into the shared memory maps (runs in a worker)."""
    study, start, mask_start, images_path, masks_path, spec_dict, n_total = args
    spec = PreprocessSpec.from_dict(spec_dict)
    volume, k, hu = _slab_volume(study, spec)
    n = len(hu)
    groups = [list(range(i, min(i + k, len(volume.hu)))) for i in range(0, len(volume.hu), k)]
    images = np.memmap(images_path, dtype=np.uint8, mode="r+",
                       shape=(n_total, spec.channels, spec.size, spec.size))
    for lo, chunk in _preprocessed(hu, spec, volume.pixel_spacing_mm):
        images[start + lo:start + lo + len(chunk)] = chunk
    images.flush()
    mask_rows: dict[int, int] = {}
    if study.mask_file is not None:
        with np.load(study.mask_file) as npz:
            uids, masks = [str(u) for u in npz["sop_instance_uid"]], npz["mask"]
        index = {uid: i for i, uid in enumerate(volume.sop_instance_uids)}
        unknown = [u for u in uids if u not in index]
        if unknown:
            raise TrainingError(f"{study.mask_file}: {len(unknown)} masks for images not in the study")
        by_slab: dict[int, np.ndarray] = {}
        for j, uid in enumerate(uids):
            slab = index[uid] // k
            by_slab[slab] = masks[j] if slab not in by_slab else np.maximum(by_slab[slab], masks[j])
        slabs = sorted(by_slab)
        if slabs:
            small = resize_mask(np.stack([by_slab[i] for i in slabs]), spec, volume.pixel_spacing_mm)
            n_masks = os.path.getsize(masks_path) // (spec.size * spec.size)
            mm = np.memmap(masks_path, dtype=np.uint8, mode="r+", shape=(n_masks, spec.size, spec.size))
            for j, slab in enumerate(slabs):
                mm[mask_start + j] = small[j]
                mask_rows[slab] = mask_start + j
            mm.flush()
    labels = [study.image_labels.get(u, -1) for u in volume.sop_instance_uids]
    slab_labels = [max(labels[i] for i in g) if any(labels[i] >= 0 for i in g) else -1 for g in groups]
    return {
        "study_instance_uid": study.study_instance_uid, "patient_id": study.patient_id, "label": study.label,
        "start": start, "count": n, "slab": k,
        "sop_instance_uids": [volume.sop_instance_uids[g[len(g) // 2]] for g in groups],
        "image_labels": slab_labels,
        "mask_rows": {str(i): v for i, v in mask_rows.items()},
        "pixel_mm": input_pixel_mm(volume.hu.shape[1:], volume.pixel_spacing_mm, spec),
    }


def preprocess_sample(study: StudyRecord, spec: PreprocessSpec) -> int:
    """Decode and preprocess one study without storing it (the cache's time estimate); returns its slabs."""
    volume, _, hu = _slab_volume(study, spec.slab_spec())
    for _ in _preprocessed(hu, spec.slab_spec(), volume.pixel_spacing_mm):
        pass
    return len(hu)


def _slab_plan(study: StudyRecord, spec: PreprocessSpec) -> tuple[int, int]:
    """(slabs, annotated slabs) a study will take in the cache, read from its headers only."""
    index = index_series(study.files)
    k = slab_size(_spacing(index.positions_mm), spec)
    n = -(-len(index) // k)
    if study.mask_file is None:
        return n, 0
    rank = {uid: r for r, uid in enumerate(index.sop_instance_uids)}
    with np.load(study.mask_file) as npz:
        slabs = {rank[str(u)] // k for u in npz["sop_instance_uid"] if str(u) in rank}
    return n, len(slabs)


#: What a study that cannot be cached raises: it is reported and left out, the others go on.
UNREADABLE = (TrainingError, OSError, ValueError, KeyError, IndexError, AttributeError, EOFError,
              zipfile.BadZipFile, pydicom.errors.InvalidDicomError)


def _fill_or_reason(job: tuple) -> dict:
    """_fill, or {"error": reason} when the study cannot be decoded (runs in a worker)."""
    try:
        return _fill(job)
    except UNREADABLE as exc:
        return {"study_instance_uid": job[0].study_instance_uid, "error": f"{type(exc).__name__}: {exc}"}


@dataclass(frozen=True)
class CachePlan:
    """What a cache build will write, known from the headers alone (``plan_cache``)."""

    folder: Path
    slabs: dict[str, tuple[int, int]]  # StudyInstanceUID -> (slabs, annotated slabs)
    skipped: dict[str, str]  # StudyInstanceUID -> why its headers could not be read
    images: int
    spec: PreprocessSpec

    @property
    def bytes(self) -> int:
        masks = sum(m for _, m in self.slabs.values())
        return (self.images * self.spec.channels + max(masks, 1)) * self.spec.size * self.spec.size

    @property
    def complete(self) -> bool:
        return (self.folder / "index.json").is_file()


def plan_cache(studies: list[StudyRecord], spec: PreprocessSpec, cache_dir: Path,
               progress: Progress | None = None) -> CachePlan:
    """Read every study's headers: the cache's folder, its size, and the studies it must leave out."""
    spec = spec.slab_spec()
    folder = Path(cache_dir) / _cache_key(studies, spec)
    slabs, skipped = {}, {}
    for i, s in enumerate(studies, 1):
        try:
            slabs[s.study_instance_uid] = _slab_plan(s, spec)
        except UNREADABLE as exc:
            skipped[s.study_instance_uid] = f"{type(exc).__name__}: {exc}"
        if progress and i % 50 == 0:
            progress(i, len(studies), "reading headers")
    return CachePlan(folder, slabs, skipped, sum(n for n, _ in slabs.values()), spec)


def build_cache(studies: list[StudyRecord], spec: PreprocessSpec, cache_dir: Path, *, workers: int = 1,
                progress: Progress | None = None, plan: CachePlan | None = None) -> SliceCache:
    """Build (or reuse, or finish) the slice cache for these studies and this preprocessing.

    The cache holds each slab on its own (the spec without context); the returned cache adds a
    context spec's neighbouring slabs as channels when indexed (with_context). A study whose headers
    or pixels cannot be read is left out and named in ``SliceCache.skipped`` with the reason; the
    others are cached. Every finished study is recorded in ``done.jsonl`` as it completes, so a build
    that was killed continues with the studies it had not reached (same studies, same spec).
    """
    context = spec.context
    if plan is None:
        folder = Path(cache_dir) / _cache_key(studies, spec.slab_spec())
        if (folder / "index.json").is_file():
            return with_context(open_cache(folder), context)
        plan = plan_cache(studies, spec, cache_dir, progress)
    spec, folder = plan.spec, plan.folder
    if plan.complete:
        return with_context(open_cache(folder), context)
    if not plan.slabs:
        raise TrainingError(f"no study could be read ({len(plan.skipped)} skipped), e.g. "
                            f"{next(iter(plan.skipped.values()), 'no studies given')}")
    folder.mkdir(parents=True, exist_ok=True)
    n_total = plan.images
    annotated = {uid: m for uid, (_, m) in plan.slabs.items() if m}
    n_masks = sum(annotated.values())
    images_path, masks_path, done_path = folder / "images.u8", folder / "masks.u8", folder / "done.jsonl"
    layout = {"spec": spec.to_dict(), "n_images": n_total, "n_masks": n_masks}
    layout_path = folder / "layout.json"
    resumed: dict[str, dict] = {}
    if layout_path.is_file() and json.loads(layout_path.read_text()) == layout and images_path.is_file():
        for line in done_path.read_text().splitlines() if done_path.is_file() else []:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the line being written when the build was killed
                continue
            resumed[entry["study_instance_uid"]] = entry
    else:
        np.memmap(images_path, dtype=np.uint8, mode="w+", shape=(n_total, spec.channels, spec.size, spec.size)).flush()
        np.memmap(masks_path, dtype=np.uint8, mode="w+", shape=(max(n_masks, 1), spec.size, spec.size)).flush()
        done_path.write_text("")
        layout_path.write_text(json.dumps(layout))
    jobs, start, mask_start = [], 0, 0
    for s in studies:
        if s.study_instance_uid not in plan.slabs:
            continue
        if s.study_instance_uid not in resumed:
            jobs.append((s, start, mask_start, str(images_path), str(masks_path), spec.to_dict(), n_total))
        start += plan.slabs[s.study_instance_uid][0]
        mask_start += annotated.get(s.study_instance_uid, 0)
    skipped = dict(plan.skipped)
    index = [e for e in resumed.values() if "error" not in e]
    skipped.update({u: e["error"] for u, e in resumed.items() if "error" in e})
    with done_path.open("a") as log:
        def record(entry: dict, i: int) -> None:
            log.write(json.dumps(entry) + "\n")
            log.flush()
            os.fsync(log.fileno())
            if "error" in entry:
                skipped[entry["study_instance_uid"]] = entry["error"]
            else:
                index.append(entry)
            if progress:
                progress(len(resumed) + i, len(resumed) + len(jobs), "caching slices")

        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for i, entry in enumerate(pool.map(_fill_or_reason, jobs), 1):
                    record(entry, i)
        else:
            for i, job in enumerate(jobs, 1):
                record(_fill_or_reason(job), i)
    if not index:
        raise TrainingError(f"no study could be cached ({len(skipped)} skipped), e.g. {next(iter(skipped.values()))}")
    index.sort(key=lambda e: e["start"])
    tmp = folder / "index.json.tmp"
    tmp.write_text(json.dumps({"spec": spec.to_dict(), "n_images": n_total, "n_masks": n_masks,
                               "studies": index, "skipped": skipped}))
    os.replace(tmp, folder / "index.json")  # the cache exists only once it is complete
    return with_context(open_cache(folder), context)


def open_cache(folder: Path) -> SliceCache:
    index = json.loads((Path(folder) / "index.json").read_text())
    spec = PreprocessSpec.from_dict(index["spec"])
    images = np.memmap(Path(folder) / "images.u8", dtype=np.uint8, mode="r",
                       shape=(index["n_images"], spec.channels, spec.size, spec.size))
    masks = np.memmap(Path(folder) / "masks.u8", dtype=np.uint8, mode="r",
                      shape=(max(index["n_masks"], 1), spec.size, spec.size))
    return SliceCache(Path(folder), images, masks, index["studies"], index.get("skipped", {}))
