"""The one definition of preprocessing, shared by training and inference (numpy only).

HU slices are centre-cropped (or padded with air) to a square field of ``field_mm`` millimetres, when
set, then resampled to ``size`` x ``size`` with an area (box) filter and become ``len(windows)``
channels, each the slice seen through one display window scaled to 0-255. The spec is a plain value that
travels in the model bundle, so the node preprocesses exactly as the model was trained.

With ``bolus_reference_hu`` set, the study's contrast bolus is normalised first, as a reader re-windows a
weakly or strongly enhanced CTPA: the study's arterial enhancement is measured on its own slabs
(:func:`study_bolus_hu`) and every HU above ``BOLUS_PIVOT_HU`` (enhanced blood) is rescaled so that it
reads ``bolus_reference_hu``; soft tissue, clot, fat and lung stay where they are. The statistic needs
the whole study, so :func:`to_grid` and :func:`window` are the two halves of :func:`preprocess`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import numpy as np

from node.errors import NodeError


class PreprocessError(NodeError):
    """A preprocessing spec or input that cannot be used."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How slices are turned into model input."""

    #: (centre, width) in HU of each channel: PE window, mediastinal window, lung window.
    windows: tuple[tuple[float, float], ...] = ((100.0, 700.0), (40.0, 400.0), (-600.0, 1500.0))
    size: int = 192
    field_mm: float | None = None  # square field of view kept around the image centre; None keeps all
    #: Slices thinner than this are averaged into slabs about this thick before anything else (the
    #: slice spacing the model was trained on), so a 1 mm series looks like the 4.5 mm training data.
    slab_mm: float | None = None
    #: Neighbouring slabs on each side added as channels, each through the first (PE) window, so the
    #: model sees whether a dark spot continues along the vessel. Channel order: the windows of the slab
    #: itself, then its neighbours from the nearest above to the nearest below (add_context).
    context: int = 0
    resample: str = "area"
    version: int = 1
    #: HU the study's measured arterial enhancement is brought to before windowing; None: no normalisation.
    bolus_reference_hu: float | None = None

    def __post_init__(self) -> None:
        if not self.windows or any(w <= 0 for _, w in self.windows):
            raise PreprocessError(f"windows need positive widths, got {self.windows}")
        if not 16 <= self.size <= 1024:
            raise PreprocessError(f"size {self.size} is outside 16-1024")
        if self.field_mm is not None and not 50.0 <= self.field_mm <= 1000.0:
            raise PreprocessError(f"field_mm {self.field_mm} is outside 50-1000")
        if self.slab_mm is not None and not 0.5 <= self.slab_mm <= 20.0:
            raise PreprocessError(f"slab_mm {self.slab_mm} is outside 0.5-20")
        if not 0 <= self.context <= 3:
            raise PreprocessError(f"context {self.context} is outside 0-3 neighbouring slabs per side")
        if self.bolus_reference_hu is not None and not BOLUS_FLOOR_HU < self.bolus_reference_hu <= BOLUS_CAP_HU:
            raise PreprocessError(f"bolus_reference_hu {self.bolus_reference_hu} is outside "
                                  f"{BOLUS_FLOOR_HU:g}-{BOLUS_CAP_HU:g} HU")
        if self.resample != "area" or self.version != 1:
            raise PreprocessError(f"unknown preprocessing (resample={self.resample!r}, version={self.version})")

    @property
    def channels(self) -> int:
        return len(self.windows) + 2 * self.context

    def slab_spec(self) -> PreprocessSpec:
        """The same spec without context: how each slab on its own becomes input (what a cache stores)."""
        return replace(self, context=0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["windows"] = [list(w) for w in self.windows]
        # specs without these keep the form that bundles and caches already hold (and their cache keys)
        if not self.context:
            del d["context"]
        if self.bolus_reference_hu is None:
            del d["bolus_reference_hu"]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        try:
            field, slab, bolus = data.get("field_mm"), data.get("slab_mm"), data.get("bolus_reference_hu")
            return cls(windows=tuple((float(c), float(w)) for c, w in data["windows"]), size=int(data["size"]),
                       field_mm=None if field is None else float(field), slab_mm=None if slab is None else float(slab),
                       context=int(data.get("context", 0)), resample=str(data.get("resample", "area")),
                       version=int(data.get("version", 1)),
                       bolus_reference_hu=None if bolus is None else float(bolus))
        except (KeyError, TypeError, ValueError) as exc:
            raise PreprocessError(f"not a preprocessing spec: {data!r}") from exc


#: Enhanced blood is what lies above this (HU): soft tissue, clot, fat and lung are never rescaled.
BOLUS_PIVOT_HU = 80.0
#: The study statistic: among the pixels between these (HU) in the central 60 % of the field and the
#: middle half of the slabs, the 75th percentile. On 80 studies of the varied training split it
#: rank-correlates with the drawn arterial lumen HU at +0.95 and reads 0.99-1.04 of it (interquartile);
#: the cap leaves cortical bone and metal out, the floor soft tissue.
BOLUS_FLOOR_HU, BOLUS_CAP_HU, BOLUS_PERCENTILE = 120.0, 1000.0, 75.0
#: The rescaling factor's bounds: a study whose statistic is off (no contrast, a metal-heavy chest) is
#: changed at most this much.
BOLUS_FACTOR = (0.5, 3.0)


def bolus_region(slabs: np.ndarray) -> np.ndarray:
    """Where a study's pulmonary arteries are: the middle half of its slabs (N, S, S), central 60 % of the field."""
    n, size = slabs.shape[0], slabs.shape[-1]
    lo, hi = int(size * 0.2), int(size * 0.8)
    return slabs[n // 4:max(n // 4 + 1, 3 * n // 4), lo:hi, lo:hi]


def study_bolus_hu(grid: np.ndarray) -> float | None:
    """A study's arterial enhancement in HU from its slabs on the input grid (N, S, S) float HU.

    None when no pixel lies in the enhanced range (a study without contrast): it is left as it is."""
    middle = bolus_region(grid)
    blood = middle[(middle > BOLUS_FLOOR_HU) & (middle < BOLUS_CAP_HU)]
    return float(np.percentile(blood, BOLUS_PERCENTILE)) if blood.size else None


def bolus_factor(bolus_hu: float | None, spec: PreprocessSpec) -> float:
    """How much the enhancement above the pivot is scaled so that ``bolus_hu`` reads the reference."""
    if spec.bolus_reference_hu is None or bolus_hu is None:
        return 1.0
    raw = (spec.bolus_reference_hu - BOLUS_PIVOT_HU) / max(bolus_hu - BOLUS_PIVOT_HU, 1.0)
    return float(np.clip(raw, *BOLUS_FACTOR))


@lru_cache(maxsize=16)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights averaging the input interval each output sample covers."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    w = np.zeros((n_out, n_in), dtype=np.float32)
    for i in range(n_out):
        lo, hi = edges[i], edges[i + 1]
        for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
            w[i, j] = min(hi, j + 1) - max(lo, j)
        w[i] /= w[i].sum()
    return w


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resample (..., H, W) float arrays to (..., size, size) with an area filter."""
    h, w = images.shape[-2:]
    return area_matrix(h, size) @ images.astype(np.float32) @ area_matrix(w, size).T


def crop_to_field(images: np.ndarray, pixel_mm: tuple[float, float], field_mm: float,
                  fill: float = -1000.0) -> np.ndarray:
    """Centre-crop (or pad with ``fill``) (..., H, W) images to a square field of ``field_mm``."""
    out = images
    for axis, spacing in ((-2, pixel_mm[0]), (-1, pixel_mm[1])):
        n = out.shape[axis]
        want = max(1, int(round(field_mm / spacing)))
        if want < n:
            lo = (n - want) // 2
            out = np.take(out, np.arange(lo, lo + want), axis=axis)
        elif want > n:
            before = (want - n) // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, want - n - before)
            out = np.pad(out, pad, constant_values=fill)
    return out


def input_pixel_mm(shape: tuple[int, int], pixel_mm: tuple[float, float], spec: PreprocessSpec) -> float:
    """Size in mm of one model-input pixel (along rows) for slices of this shape and spacing."""
    extent = spec.field_mm if spec.field_mm is not None else shape[0] * pixel_mm[0]
    return extent / spec.size


def to_grid(hu: np.ndarray, spec: PreprocessSpec, pixel_mm: tuple[float, float] | None = None) -> np.ndarray:
    """HU slices (N, H, W) to float32 HU on the input grid (N, size, size): the field crop and the resize.

    ``pixel_mm`` (row, column spacing) is needed when the spec crops to a field of view."""
    if hu.ndim != 3:
        raise PreprocessError(f"expected slices as (N, H, W), got shape {hu.shape}")
    if spec.field_mm is not None:
        if pixel_mm is None:
            raise PreprocessError("this preprocessing crops to a field of view: pass the pixel spacing")
        hu = crop_to_field(hu, pixel_mm, spec.field_mm)
    return resize(hu.astype(np.float32), spec.size)


def window(grid: np.ndarray, spec: PreprocessSpec, bolus_hu: float | None = None) -> np.ndarray:
    """HU on the input grid (N, size, size) to model input (N, windows, size, size) uint8.

    A spec with ``bolus_reference_hu`` needs the study's ``bolus_hu`` (:func:`study_bolus_hu` over all
    of its slabs); the HU above the pivot are rescaled by :func:`bolus_factor` before the windows."""
    if spec.bolus_reference_hu is not None:
        factor = bolus_factor(bolus_hu, spec)
        if factor != 1.0:
            grid = np.where(grid > BOLUS_PIVOT_HU, BOLUS_PIVOT_HU + (grid - BOLUS_PIVOT_HU) * factor, grid)
    out = np.empty((grid.shape[0], len(spec.windows), spec.size, spec.size), dtype=np.uint8)
    for c, (center, width) in enumerate(spec.windows):
        out[:, c] = np.rint(np.clip((grid - (center - width / 2.0)) / width, 0.0, 1.0) * 255.0)
    return out


def preprocess(hu: np.ndarray, spec: PreprocessSpec, pixel_mm: tuple[float, float] | None = None,
               bolus_hu: float | None = None) -> np.ndarray:
    """HU slices (N, H, W) to model input (N, windows, size, size) uint8, one channel per window.

    ``pixel_mm`` (row, column spacing) is needed when the spec crops to a field of view; ``bolus_hu``
    when it normalises the bolus (the whole study's :func:`study_bolus_hu`, not this chunk's). A spec
    with context needs the neighbours' channels added for the whole series after this (add_context).
    """
    return window(to_grid(hu, spec, pixel_mm), spec, bolus_hu)


def context_offsets(context: int) -> list[int]:
    """Slab offsets of the context channels, in channel order: -1, ..., -k, then +1, ..., +k."""
    return [-d for d in range(1, context + 1)] + list(range(1, context + 1))


def add_context(images: np.ndarray, context: int) -> np.ndarray:
    """One series' consecutive slab inputs (N, C, S, S) -> (N, C + 2 * context, S, S).

    Each neighbour adds its first channel (the PE window); at the ends of the series the nearest slab
    stands in for a missing neighbour.
    """
    if not context:
        return images
    n = len(images)
    extra = [images[np.clip(np.arange(n) + d, 0, n - 1), :1] for d in context_offsets(context)]
    return np.concatenate([images, *extra], axis=1)


def to_float(batch: np.ndarray) -> np.ndarray:
    """uint8 model input to the float32 the networks take (0-1)."""
    return batch.astype(np.float32) / 255.0


def resize_mask(mask: np.ndarray, spec: PreprocessSpec, pixel_mm: tuple[float, float] | None = None) -> np.ndarray:
    """Masks (N, H, W) to the input grid as the covered fraction of each pixel, uint8 0-255."""
    mask = mask.astype(np.float32)
    if spec.field_mm is not None:
        if pixel_mm is None:
            raise PreprocessError("this preprocessing crops to a field of view: pass the pixel spacing")
        mask = crop_to_field(mask, pixel_mm, spec.field_mm, fill=0.0)
    return np.rint(np.clip(resize(mask, spec.size), 0.0, 1.0) * 255.0).astype(np.uint8)


def input_to_pixel(points: np.ndarray, shape: tuple[int, int], pixel_mm: tuple[float, float],
                   spec: PreprocessSpec) -> np.ndarray:
    """Map (..., 2) (row, column) positions on the model input to positions on the original slice.

    Positions are continuous (0.0 is the first pixel's top-left edge), the inverse of the centre
    crop or pad and the resize that :func:`preprocess` applies.
    """
    points = np.asarray(points, dtype=float)
    out = np.empty_like(points)
    for axis, spacing in ((0, pixel_mm[0]), (1, pixel_mm[1])):
        n = shape[axis]
        want = n if spec.field_mm is None else max(1, int(round(spec.field_mm / spacing)))
        offset = (n - want) // 2 if want < n else -((want - n) // 2)
        out[..., axis] = points[..., axis] * want / spec.size + offset
    return out


def slab_size(spacing_mm: float, spec: PreprocessSpec) -> int:
    """How many consecutive slices of this spacing make one slab of about ``spec.slab_mm``."""
    if spec.slab_mm is None or spacing_mm <= 0:
        return 1
    return max(1, int(round(spec.slab_mm / spacing_mm)))


def average_slabs(hu: np.ndarray, k: int) -> np.ndarray:
    """(N, H, W) slices to (ceil(N / k), H, W) slabs: the mean of each run of ``k`` slices (the last may be shorter)."""
    if k == 1:
        return hu
    starts = np.arange(0, len(hu), k)
    return np.add.reduceat(hu.astype(np.float32), starts, axis=0) / np.diff(np.append(starts, len(hu)))[:, None, None]
