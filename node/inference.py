"""The inference engine: a verified bundle run with onnxruntime on one CT series (numpy only, no torch).

Slices stream from disk in batches: decoded, preprocessed (``node.preprocess``, the spec from the
bundle), run through stage 1, and only the feature vectors and the small CAMs are kept. Stage 2 then
reads the whole study's feature sequence. Peak memory is one batch of slices plus O(slices x features);
a spec with context (neighbouring slabs as channels) also holds the uint8 input of every slab (110 kB
each at 192 px) until stage 1 has run.

Providers: ``cpu``; ``cuda`` (refused with a clear message when onnxruntime cannot really run on
CUDA, e.g. a missing CUDA or cuDNN library: onnxruntime would otherwise fall back to the CPU quietly);
``auto`` (CUDA when it really loads, else CPU). ``providers`` reports what the sessions really use.

Precision: ``auto`` takes the bundle's int8 stage 1 on CPU and its fp16 files on CUDA, when the
manifest lists them as accepted (the export checks them against fp32), else fp32.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node.bundle import Bundle, ModelFile, load_bundle
from node.errors import NodeError
from node.preprocess import (
    add_context,
    average_slabs,
    input_to_pixel,
    slab_size,
    study_bolus_hu,
    to_float,
    to_grid,
    window,
)
from node.series import SeriesIndex, iter_hu

log = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
#: On every result the node makes: report, key images, summary, HL7 message, webhook.
NOTICE = "AI triage aid - not for diagnostic use"
Progress = Callable[[int, int], None]


class InferenceError(NodeError):
    """The model cannot run as configured (providers, bundle, input); the message says what to change."""


@dataclass(frozen=True)
class KeySlice:
    """A slice the model found most suspicious, with where its attention peaks."""

    index: int  # position in the head-first sorted series
    sop_instance_uid: str
    probability: float  # stage-2 per-slice probability
    peak_row: float  # CAM peak on the original image (pixel units, continuous)
    peak_column: float
    frame_number: int | None = None  # 1-based frame of a multi-frame source instance; None for single-frame


@dataclass
class StudyResult:
    """What the model says about one series."""

    study_instance_uid: str
    series_instance_uid: str
    probability: float
    positive: bool
    threshold: float
    operating_point: str
    sop_instance_uids: tuple[str, ...]
    slice_probabilities: np.ndarray  # (n,) stage 2, head first
    slice_scores: np.ndarray  # (n,) stage-1 probabilities
    cams: np.ndarray  # (n, h, w) float32, stage-1 CAM (of the slice's slab) in logit units, model-input grid
    key_slices: list[KeySlice]
    model: dict = field(default_factory=dict)  # name, version, synthetic flag, precision, providers
    seconds: float = 0.0

    def summary(self) -> dict:
        """A JSON-able summary (no arrays, no patient data)."""
        return {
            "study_instance_uid": self.study_instance_uid, "series_instance_uid": self.series_instance_uid,
            "slices": len(self.sop_instance_uids), "probability": round(self.probability, 6),
            "decision": "PE suspected" if self.positive else "PE not suspected", "positive": self.positive,
            "threshold": self.threshold, "operating_point": self.operating_point,
            "key_slices": [{"index": k.index, "sop_instance_uid": k.sop_instance_uid,
                            **({"frame_number": k.frame_number} if k.frame_number else {}),
                            "probability": round(k.probability, 6),
                            "peak_row_column": [round(k.peak_row, 1), round(k.peak_column, 1)]}
                           for k in self.key_slices],
            "model": self.model, "seconds": round(self.seconds, 3),
            "notice": NOTICE,
        }


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def pick_key_slices(probabilities: np.ndarray, k: int, gap: int = 3) -> list[int]:
    """Indices of the ``k`` most probable slices, at least ``gap`` slices apart (one per finding)."""
    chosen: list[int] = []
    for i in np.argsort(-probabilities, kind="stable"):
        if all(abs(int(i) - j) >= gap for j in chosen):
            chosen.append(int(i))
        if len(chosen) == k:
            break
    return chosen


class Engine:
    """Runs a bundle on series; build once, reuse for every study."""

    def __init__(self, bundle: Bundle | Path, *, device: str = "auto", precision: str = "auto",
                 threads: int | None = None, batch: int = 16, key_slices: int | None = None):
        import onnxruntime as ort  # imported here so that `import node.inference` stays cheap

        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(Path(bundle))
        self.spec, self.batch = self.bundle.spec, batch
        self.key_slices = key_slices or self.bundle.manifest.key_slices
        if device not in ("auto", "cpu", "cuda"):
            raise InferenceError(f"device {device!r} (expected auto, cpu or cuda)")
        if precision not in ("auto", "fp32", "int8", "fp16"):
            raise InferenceError(f"precision {precision!r} (expected auto, fp32, int8 or fp16)")
        available = ort.get_available_providers()
        if device == "cuda" and CUDA not in available:
            raise InferenceError("device 'cuda' asked for, but this onnxruntime has no CUDA provider "
                                 f"(it has {', '.join(available)}); install petriage[gpu] or set model.device")
        want_cuda = device == "cuda" or (device == "auto" and CUDA in available)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Slices are decoded in Python between runs: spinning intra-op threads would take those
        # cores (measured, benchmarks/inference.py, 300 slices, 2 threads: fp32 end to end 3.73 s -> 2.66 s).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._ort, self._options = ort, options
        self.stage1_file = self._choose("stage1", precision, want_cuda)
        self.stage2_file = self._choose("stage2", precision, want_cuda)
        self.stage1 = self._session(self.stage1_file, want_cuda, device)
        self.stage2 = self._session(self.stage2_file, want_cuda, device)
        self.providers = self.stage1.get_providers()
        self.on_cuda = self.providers[0] == CUDA
        if want_cuda and not self.on_cuda and device == "auto":
            # fp16/fp32 choice was made for CUDA; on the CPU fall back to the CPU choice
            self.stage1_file = self._choose("stage1", precision, False)
            self.stage2_file = self._choose("stage2", precision, False)
            self.stage1 = self._session(self.stage1_file, False, device)
            self.stage2 = self._session(self.stage2_file, False, device)
            self.providers = self.stage1.get_providers()
        log.info("model %s %s: stage 1 %s, stage 2 %s, providers %s", self.bundle.manifest.name,
                 self.bundle.manifest.version, self.stage1_file.precision, self.stage2_file.precision, self.providers)

    def _choose(self, stage: str, precision: str, cuda: bool) -> ModelFile:
        """The file to run for a stage. Explicit int8/fp16 must exist for stage 1 (stage 2 has no int8)."""
        m = self.bundle.manifest
        if precision == "auto":
            order = ["fp16" if cuda else "int8", "fp32"]
        else:
            order = [precision] if stage == "stage1" else [precision, "fp32"]
        for p in order:
            entry = m.file(stage, p)
            if entry is not None and entry.accepted:
                return entry
        raise InferenceError(f"precision {precision!r}: the bundle has no accepted {' or '.join(order)} "
                             f"{stage} file")

    def _session(self, entry: ModelFile, cuda: bool, device: str):
        providers = [CUDA, CPU] if cuda else [CPU]
        try:
            session = self._ort.InferenceSession(str(self.bundle.path(entry)), self._options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise InferenceError(f"{entry.path}: onnxruntime cannot load it ({exc})") from exc
        if device == "cuda" and session.get_providers()[0] != CUDA:
            raise InferenceError(f"device 'cuda' asked for, but onnxruntime runs {entry.path} on "
                                 f"{session.get_providers()} (a CUDA or cuDNN library is missing or does not "
                                 "match; see the onnxruntime-gpu requirements)")
        return session

    # ------------------------------------------------------------------ running
    def run_slices(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 model input (N, C, S, S) -> slice logits (N,), features (N, F), CAMs (N, h, w)."""
        x = to_float(images)  # every variant takes and gives float32 (fp16 files convert inside)
        logit, feature, cam = self.stage1.run(None, {self.stage1.get_inputs()[0].name: x})
        return logit.astype(np.float32), feature.astype(np.float32), cam.astype(np.float32)

    def run_study(self, features: np.ndarray) -> tuple[float, np.ndarray]:
        """Features (T, F) of one study -> study probability, per-slice probabilities (T,)."""
        x = features[None].astype(np.float32)
        study_logit, slice_logits = self.stage2.run(None, {self.stage2.get_inputs()[0].name: x})
        return float(sigmoid(study_logit[0])), sigmoid(slice_logits[0]).astype(np.float32)

    def analyze(self, index: SeriesIndex, *, operating_point: str | None = None,
                progress: Progress | None = None) -> StudyResult:
        """Run both stages on one sorted series.

        Thin slices are first averaged into slabs of the spec's ``slab_mm`` (the model's training
        spacing); per-slice outputs are given for every source slice (each slice gets its slab's value)
        and a key slice is the middle slice of its slab.
        """
        start = time.perf_counter()
        n = len(index)
        if n < 2:
            raise InferenceError(f"series has {n} slice(s); the model needs a volume")
        spacing = float(np.median(np.abs(np.diff(index.positions_mm))))
        k = slab_size(spacing, self.spec)
        m_slabs = -(-n // k)
        logits = np.zeros(m_slabs, dtype=np.float32)
        state: dict[str, np.ndarray] = {}
        inputs: list[np.ndarray] = []  # uint8 model input of every slab (110 kB each at 192 px)
        grids: list[np.ndarray] = []  # or, to normalise the bolus, float HU on the input grid (147 kB each)
        whole_study = self.spec.context or self.spec.bolus_reference_hu is not None
        bolus_hu = None
        for lo, hu in iter_hu(index, self.batch * k):
            grid = to_grid(average_slabs(hu, k), self.spec, index.pixel_spacing_mm)
            if self.spec.bolus_reference_hu is not None:  # windowed once the whole study's bolus is known
                grids.append(grid)
            else:
                inputs.append(window(grid, self.spec))
            if not whole_study:  # no neighbours and no study statistic needed: run each chunk as it is read
                self._run_chunk(inputs.pop(), lo // k, logits, state)
            if progress:
                progress(lo + len(hu), n)
        if grids:
            study_grid = np.concatenate(grids)
            bolus_hu = study_bolus_hu(study_grid)
            inputs = [window(study_grid, self.spec, bolus_hu)]
        if whole_study:
            study_input = add_context(np.concatenate(inputs), self.spec.context)
            for j in range(0, m_slabs, self.batch):
                self._run_chunk(study_input[j:j + self.batch], j, logits, state)
        feats, cams = state.get("feats"), state.get("cams")
        assert feats is not None and cams is not None
        probability, slab_probs = self.run_study(feats)
        m = self.bundle.manifest
        op = m.operating_point(operating_point)
        stride = m.cam_stride
        keys = []
        for j in pick_key_slices(slab_probs, self.key_slices):
            i = min(n - 1, j * k + (min(n, (j + 1) * k) - j * k) // 2)  # the middle slice of slab j
            r, c = np.unravel_index(int(np.argmax(cams[j])), cams[j].shape)
            row, col = input_to_pixel(np.array([(r + 0.5) * stride, (c + 0.5) * stride]), index.shape,
                                      index.pixel_spacing_mm, self.spec)
            keys.append(KeySlice(i, index.sop_instance_uids[i], float(slab_probs[j]), float(row), float(col),
                                 index.frame_numbers[i]))
        per_slice = np.repeat(np.arange(m_slabs), k)[:n]
        return StudyResult(
            index.study_instance_uid, index.series_instance_uid, probability, probability >= op.threshold,
            op.threshold, op.name, index.sop_instance_uids, slab_probs[per_slice],
            sigmoid(logits[per_slice]).astype(np.float32), cams[per_slice], keys,
            model=self.describe() | {"slab_slices": k} | ({} if bolus_hu is None else {"bolus_hu": round(bolus_hu, 1)}),
            seconds=time.perf_counter() - start)

    def _run_chunk(self, images: np.ndarray, j: int, logits: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Stage 1 on slabs j, j + 1, ...: their logits, features and CAMs into the study's arrays."""
        lg, ft, cm = self.run_slices(images)
        if "feats" not in state:
            state["feats"] = np.zeros((len(logits), ft.shape[1]), dtype=np.float32)
            state["cams"] = np.zeros((len(logits), *cm.shape[1:]), dtype=np.float32)
        logits[j:j + len(images)], state["feats"][j:j + len(images)], state["cams"][j:j + len(images)] = lg, ft, cm

    def describe(self) -> dict:
        m = self.bundle.manifest
        return {"name": m.name, "version": m.version, "synthetic_training_data": m.synthetic_training_data,
                "stage1_precision": self.stage1_file.precision, "stage2_precision": self.stage2_file.precision,
                "providers": list(self.providers)}
