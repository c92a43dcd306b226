"""The model bundle: ONNX files plus ``model.json``, verified before anything runs (onnxruntime only).

A bundle folder holds::

    model.json            the manifest (``Manifest`` below)
    stage1.onnx           slice network, fp32: image (B, C, S, S) -> slice_logit (B), feature (B, F), cam (B, h, w)
    stage2.onnx           study network, fp32: features (B, T, F) -> study_logit (B), slice_logits (B, T)
    stage1.int8.onnx      optional, CPU variant, used only if the manifest says it passed its check
    *.fp16.onnx           optional, GPU variants
    COMMANDS.md           how it was made (not read by the node)

``load_bundle`` refuses a bundle whose files do not match their sha256, whose manifest is not this
format, or whose preprocessing spec differs from the one written into the stage-1 ONNX file itself
(the manifest is plain text; the ONNX files are hashed, so the spec they carry is the reference).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from node.errors import NodeError
from node.preprocess import PreprocessError, PreprocessSpec

FORMAT = "petriage-bundle/1"
MANIFEST = "model.json"
#: metadata_props key under which the stage-1 ONNX file carries its preprocessing spec (JSON).
SPEC_METADATA_KEY = "petriage.preprocess"
INTENDED_USE = ("AI triage aid for CT pulmonary angiography: flags studies likely to show pulmonary embolism "
                "so that a radiologist reads them sooner. Not for diagnostic use; every finding needs a "
                "radiologist's read.")
SYNTHETIC_WARNING = "synthetic training data - not for clinical use"


class BundleError(NodeError):
    """A model bundle that is missing, altered or inconsistent; the message says which file and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorInfo(_Strict):
    name: str
    shape: list[str | int]  # a str is a symbolic dimension
    dtype: str


class ModelFile(_Strict):
    """One ONNX file of the bundle."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int
    stage: Literal["stage1", "stage2"]
    precision: Literal["fp32", "fp16", "int8"]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    #: For variants: largest study-probability difference from fp32 on the validation split.
    max_abs_study_difference: float | None = None
    accepted: bool = True  # a variant that failed its check is listed (for the record) but never used


class OperatingPoint(_Strict):
    """A decision threshold on the study probability and what it gave on the validation split."""

    name: str
    threshold: float = Field(ge=0.0, le=1.0)
    target_sensitivity: float
    val_sensitivity: float
    val_specificity: float
    #: Where it was chosen and how sure the validation figures are (bundles from 0.2 on).
    chosen_on: str | None = None
    val_studies: dict | None = None  # {"positive": n, "negative": n}
    val_sensitivity_ci95: list[float] | None = None
    val_specificity_ci95: list[float] | None = None


class Manifest(_Strict):
    format: Literal["petriage-bundle/1"]
    name: str
    version: str
    created: str  # ISO 8601, UTC
    intended_use: str
    synthetic_training_data: bool
    warning: str | None = None
    preprocess: dict
    cam_stride: int  # model-input pixels per CAM cell
    key_slices: int = Field(default=3, ge=1)
    operating_points: list[OperatingPoint]
    default_operating_point: str
    files: list[ModelFile]
    training: dict  # run, data summary, test metrics: for people, not read by the node
    parity: dict  # what the export measured, for people
    #: Tests run on the exported bundle through the node's engine (scripts/check_bundle.py --record):
    #: name, data, AUC, and sensitivity/specificity at the default operating point. For people.
    evaluations: list[dict] = Field(default_factory=list)

    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocess)

    def operating_point(self, name: str | None = None) -> OperatingPoint:
        want = name or self.default_operating_point
        for op in self.operating_points:
            if op.name == want:
                return op
        raise BundleError(f"operating point {want!r} is not in the bundle (it has "
                          f"{', '.join(o.name for o in self.operating_points)})")

    def file(self, stage: str, precision: str) -> ModelFile | None:
        return next((f for f in self.files if f.stage == stage and f.precision == precision), None)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Bundle:
    """A verified bundle: its folder and manifest."""

    def __init__(self, folder: Path, manifest: Manifest):
        self.folder, self.manifest = Path(folder), manifest

    def path(self, entry: ModelFile) -> Path:
        return self.folder / entry.path

    @property
    def spec(self) -> PreprocessSpec:
        return self.manifest.spec()


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST} (not a model bundle; make one with petriage-export)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not readable JSON ({exc})") from exc
    if isinstance(data, dict) and data.get("format") != FORMAT:
        raise BundleError(f"{path}: format {data.get('format')!r}, this node reads {FORMAT!r}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{path}: {where}: {first['msg']}") from exc


def load_bundle(folder: Path) -> Bundle:
    """Read and verify a bundle: manifest format, every file's sha256, the preprocessing spec."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    try:
        spec = manifest.spec()
    except PreprocessError as exc:
        raise BundleError(f"{folder / MANIFEST}: preprocess: {exc}") from exc
    for stage in ("stage1", "stage2"):
        if manifest.file(stage, "fp32") is None:
            raise BundleError(f"{folder / MANIFEST}: no fp32 {stage} file listed")
    for entry in manifest.files:
        path = folder / entry.path
        if not path.is_file():
            raise BundleError(f"{path}: listed in {MANIFEST} but missing")
        digest = sha256_of(path)
        if digest != entry.sha256:
            raise BundleError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                              f"{entry.sha256[:12]}... (the file was altered or damaged; re-export the bundle)")
    manifest.operating_point()
    stage1 = manifest.file("stage1", "fp32")
    assert stage1 is not None
    embedded = _embedded_spec(folder / stage1.path)
    if embedded != spec:
        raise BundleError(f"{folder / MANIFEST}: preprocessing spec {spec.to_dict()} differs from the one the "
                          f"stage-1 model was exported with {embedded.to_dict() if embedded else None}")
    image = stage1.inputs[0].shape
    if image[1:] != [spec.channels, spec.size, spec.size]:
        raise BundleError(f"{folder / MANIFEST}: stage-1 input {image} does not fit the spec "
                          f"({spec.channels} channels, {spec.size} px)")
    return Bundle(folder, manifest)


def _embedded_spec(onnx_path: Path) -> PreprocessSpec | None:
    """The spec in the ONNX file's metadata, read with onnxruntime (the node does not need onnx)."""
    import onnxruntime as ort  # local: keeps `import node.bundle` light for the CLI

    try:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        meta = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"]).get_modelmeta()
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        raise BundleError(f"{onnx_path}: onnxruntime cannot load it ({exc})") from exc
    text = meta.custom_metadata_map.get(SPEC_METADATA_KEY)
    if text is None:
        return None
    try:
        return PreprocessSpec.from_dict(json.loads(text))
    except (json.JSONDecodeError, PreprocessError) as exc:
        raise BundleError(f"{onnx_path}: metadata {SPEC_METADATA_KEY} is not a spec ({exc})") from exc
