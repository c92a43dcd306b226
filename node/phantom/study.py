"""One synthetic CTPA study: draw the patient, render its series, write them as DICOM."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from node.errors import PhantomError
from node.phantom.anatomy import Anatomy, build_anatomy
from node.phantom.render import EMBOLUS_SHARE, Grid, Rendered, add_noise, reconstruct, render, shown_mask
from node.phantom.spec import CLASSIC_LEVELS, EMBOLUS_LEVELS, Structure
from node.phantom.styles import STYLES, Variation, draw_variation
from node.phantom.writer import (
    ORDERS,
    TRANSFER_SYNTAXES,
    SeriesSpec,
    StudyIdentity,
    axial_series,
    localizer,
    save,
)

COMPANIONS = ("localizer", "lung", "noncontrast")
#: Draws per seed before giving up on emboli that the grid is too coarse to show.
MAX_ATTEMPTS = 8


@dataclass(frozen=True)
class PhantomOptions:
    """How a study is sampled and written (the patient itself comes from the seed)."""

    matrix: int = 512
    fov_mm: float = 360.0
    slices: int = 300
    slice_spacing_mm: float = 1.0
    slice_thickness_mm: float | None = None  # defaults to the spacing
    transfer_syntax: str = "explicit"
    order: str = "ascending"
    companions: tuple[str, ...] = ()
    n_emboli: int | None = None
    min_embolus_mm: float = 2.0  # smallest embolus drawn (extent along the vessel); the largest is 20 mm
    embolus_levels: tuple[str, ...] = CLASSIC_LEVELS  # where emboli may sit
    noise: bool = True
    #: ``classic``, or a style family (``varied``, ``shifted``: node.phantom.styles) that draws the scanner
    #: settings (matrix, field, slice spacing and thickness, coverage) per study instead of taking them from here.
    style: str = "classic"
    #: Styled families only: the largest matrix rendered (a drawn matrix above it is lowered, the field of
    #: view kept), for quick looks and fast tests; None renders what the family draws.
    matrix_cap: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not 32 <= self.matrix <= 1024:
            problems.append(f"matrix {self.matrix} (expected 32-1024)")
        if not 1 <= self.slices <= 2000:
            problems.append(f"slices {self.slices} (expected 1-2000)")
        if not 0.1 <= self.slice_spacing_mm <= 20.0:
            problems.append(f"slice spacing {self.slice_spacing_mm} mm (expected 0.1-20)")
        if not 2.0 <= self.min_embolus_mm <= 20.0:
            problems.append(f"smallest embolus {self.min_embolus_mm} mm (expected 2-20)")
        if self.matrix_cap is not None and not 32 <= self.matrix_cap <= 1024:
            problems.append(f"matrix cap {self.matrix_cap} (expected 32-1024)")
        if self.style not in STYLES:
            problems.append(f"style {self.style!r} (expected one of {', '.join(STYLES)})")
        known = set(EMBOLUS_LEVELS) if self.style != "classic" else set(CLASSIC_LEVELS)
        if not self.embolus_levels or set(self.embolus_levels) - known:
            problems.append(f"embolus levels {list(self.embolus_levels)} (expected some of {', '.join(sorted(known))}"
                            + ("; subsegmental needs a styled family" if "subsegmental" in self.embolus_levels
                               and self.style == "classic" else "") + ")")
        if self.transfer_syntax not in TRANSFER_SYNTAXES:
            problems.append(f"transfer syntax {self.transfer_syntax!r} (expected one of "
                            f"{', '.join(TRANSFER_SYNTAXES)})")
        if self.order not in ORDERS:
            problems.append(f"order {self.order!r} (expected one of {', '.join(ORDERS)})")
        unknown = set(self.companions) - set(COMPANIONS)
        if unknown:
            problems.append(f"companions {sorted(unknown)} (expected some of {', '.join(COMPANIONS)})")
        if problems:
            raise PhantomError("invalid phantom options: " + "; ".join(problems))

    @property
    def thickness_mm(self) -> float:
        return self.slice_thickness_mm or self.slice_spacing_mm


@dataclass(frozen=True)
class EmbolusRecord:
    """Ground truth of one visible embolus, for manifests and reports."""

    artery: str
    level: str
    side: str
    size_mm: float
    occlusive: bool
    hu: float
    voxels: int
    slices: list[int]  # slice indices (superior first) where the embolus is visible
    kind: str = ""  # occlusive, partial, mural or saddle (styled families)


@dataclass
class PhantomStudy:
    """A rendered synthetic study with its ground truth."""

    seed: int
    anatomy: Anatomy
    grid: Grid
    image: Rendered
    identity: StudyIdentity
    options: PhantomOptions
    emboli: list[EmbolusRecord] = field(default_factory=list)

    @property
    def pe_present(self) -> bool:
        return bool(self.image.mask.any())

    @property
    def slice_labels(self) -> np.ndarray:
        """Per-slice PE label (superior first): True where any embolus voxel lies in the slice."""
        return np.asarray(self.image.mask.any(axis=(1, 2)))

    def structure_hu(self) -> dict[Structure, tuple[float, float, int]]:
        """Mean HU, standard deviation and voxel count of each structure's core.

        The core leaves out voxels with a differently labelled neighbour (6-connected), so
        partial-volume edges do not bias the means.
        """
        lab, hu = self.image.labels, self.image.hu
        core = np.zeros(lab.shape, dtype=bool)
        inner = (slice(1, -1),) * 3
        core[inner] = True
        for axis in range(3):
            for step in (-1, 1):
                core[inner] &= lab[inner] == np.roll(lab, step, axis=axis)[inner]
        codes, values = lab[core], hu[core].astype(np.float64)
        n = np.bincount(codes, minlength=len(Structure))
        total = np.bincount(codes, weights=values, minlength=len(Structure))
        squares = np.bincount(codes, weights=values * values, minlength=len(Structure))
        out = {}
        for code in Structure:
            if n[code]:
                mean = total[code] / n[code]
                out[code] = (float(mean), float(np.sqrt(max(squares[code] / n[code] - mean * mean, 0.0))),
                             int(n[code]))
        return out

    def ctpa_spec(self) -> SeriesSpec:
        t = self.options.thickness_mm
        v = self.anatomy.variation
        if v is not None and v.family == "shifted":
            return SeriesSpec("ctpa", 601, f"CTA PULM {t:.2f} {v.kernel_name}", v.kernel_name, True, round(t, 2),
                              (150.0, 800.0))
        return SeriesSpec("ctpa", 3, f"CTPA {t:.1f} mm", v.kernel_name if v else "STANDARD", True, round(t, 2),
                          (100.0, 700.0))


def _records(anatomy: Anatomy, image: Rendered) -> list[EmbolusRecord]:
    return [EmbolusRecord(emb.artery, emb.level, emb.side, round(emb.size_mm, 1), emb.occlusive,
                          round(emb.hu, 1), voxels, slices, emb.kind)
            for emb, voxels, slices in zip(anatomy.emboli, image.emboli_voxels, image.emboli_slices,
                                           strict=True) if voxels]


def generate_study(seed: int, *, pe: bool, options: PhantomOptions | None = None) -> PhantomStudy:
    """Draw and render one study.

    A positive study is redrawn (deterministically, from the same seed) while every embolus is too
    small to cover a voxel of the grid, so a study labelled positive always shows a filling defect.
    """
    options = options or PhantomOptions()
    if options.style != "classic":
        return _generate_styled(seed, pe, options)
    for attempt in range(MAX_ATTEMPTS):
        anatomy = build_anatomy(seed, pe=pe, n_emboli=options.n_emboli, attempt=attempt,
                                min_embolus_mm=options.min_embolus_mm, embolus_levels=options.embolus_levels)
        grid = Grid.axial(matrix=options.matrix, fov_mm=options.fov_mm, slices=options.slices,
                          spacing_mm=options.slice_spacing_mm, center_z=anatomy.scan_center_z)
        image = render(anatomy, grid, noise=options.noise)
        if not pe or image.mask.any():
            return PhantomStudy(seed, anatomy, grid, image, StudyIdentity.from_seed(seed), options,
                                _records(anatomy, image))
    raise PhantomError(f"seed {seed}: no embolus covered a voxel in {MAX_ATTEMPTS} draws; "
                       "use a finer matrix or thinner slices")


def _styled_options(options: PhantomOptions, v: Variation) -> PhantomOptions:
    """The options a styled study is written with: its drawn scanner settings."""
    slices = max(8, int(round(v.coverage_mm / v.slice_spacing_mm)))
    matrix = min(v.matrix, options.matrix_cap) if options.matrix_cap else v.matrix
    return replace(options, matrix=matrix, fov_mm=round(v.fov_mm, 1), slices=slices,
                   slice_spacing_mm=round(v.slice_spacing_mm, 3),
                   slice_thickness_mm=round(v.slice_spacing_mm * v.thickness_ratio, 3))


def _generate_styled(seed: int, pe: bool, options: PhantomOptions) -> PhantomStudy:
    """Draw and render a study of a style family: scanner settings per study, slices of real thickness.

    Slices are rendered on a fine grid (at most 1.5 mm apart) and averaged over each slice's thickness,
    so a thick slice shows an embolus with the partial-volume dilution a scanner gives it; the mask
    keeps voxels at least 40 % inside an embolus.
    """
    variation = draw_variation(seed, options.style)
    opts = _styled_options(options, variation)
    levels = tuple(options.embolus_levels)
    if levels == CLASSIC_LEVELS:  # the default: every level the family draws
        levels = tuple(EMBOLUS_LEVELS)
    for attempt in range(MAX_ATTEMPTS):
        anatomy = build_anatomy(seed, pe=pe, n_emboli=options.n_emboli, attempt=attempt,
                                embolus_levels=levels, variation=variation)
        dx, dy, dz = variation.offset_mm
        grid = Grid.axial(matrix=opts.matrix, fov_mm=opts.fov_mm, slices=opts.slices,
                          spacing_mm=opts.slice_spacing_mm, center_z=anatomy.scan_center_z + dz,
                          center_x=-dx, center_y=-dy)
        image = _render_thick(anatomy, grid, opts.thickness_mm, noise=options.noise)
        if not pe or image.mask.any():
            return PhantomStudy(seed, anatomy, grid, image, StudyIdentity.from_seed(seed), opts,
                                _records(anatomy, image))
    raise PhantomError(f"seed {seed}: no embolus covered a voxel in {MAX_ATTEMPTS} draws")


def _render_thick(anatomy: Anatomy, grid: Grid, thickness_mm: float, *, noise: bool) -> Rendered:
    """Render on sub-slices at most 1.5 mm apart, then average each slice over its thickness."""
    spacing = abs(float(grid.zs[0] - grid.zs[1])) if len(grid.zs) > 1 else thickness_mm
    step = spacing / max(1, int(np.ceil(spacing / 1.5 - 1e-9)))
    if step >= spacing - 1e-9 and thickness_mm <= spacing * 1.05:
        return render(anatomy, grid, noise=noise)
    top, bottom = grid.zs[0] + thickness_mm / 2, grid.zs[-1] - thickness_mm / 2
    n_fine = int(np.ceil((top - bottom) / step)) + 1
    fine_z = top - step / 2 - np.arange(n_fine) * step
    fine = render(anatomy, Grid(grid.xs, grid.ys, fine_z), noise=False, reconstruction=False)
    # Overlap of each slice's thickness with each sub-slice.
    lo = np.maximum((grid.zs - thickness_mm / 2)[:, None], (fine_z - step / 2)[None, :])
    hi = np.minimum((grid.zs + thickness_mm / 2)[:, None], (fine_z + step / 2)[None, :])
    w = np.clip(hi - lo, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    hu = np.tensordot(w.astype(np.float32), fine.hu, axes=1)
    inside = fine.owner > 0  # voxels at least half inside a clot, shown or not
    frac = np.tensordot(w.astype(np.float32), inside.astype(np.float32), axes=1)
    shown = np.tensordot(w.astype(np.float32), fine.shown, axes=1)
    labels = fine.labels[np.argmax(w, axis=1)]
    owner = np.stack([fine.owner[w[i] > 0].max(axis=0) for i in range(len(w))])  # a clot in any sub-slice
    mask, voxels, slices = shown_mask(frac >= EMBOLUS_SHARE, shown, owner, len(anatomy.emboli))
    out = Rendered(hu.astype(np.float32), labels, mask, voxels, slices, shown, owner)
    if noise:  # noise of the reconstructed slice, not averaged away with the sub-slices
        add_noise(out.hu, anatomy, grid)
    reconstruct(out.hu, anatomy, grid)
    np.clip(out.hu, -1024.0, 3071.0, out=out.hu)
    return out


def write_study(study: PhantomStudy, out_dir: Path) -> dict[str, list[Path]]:
    """Write the CTPA series (and any companions) as ``out_dir/<study>/<series>/<sop>.dcm``.

    Returns the written paths by series kind, each list in the order the files were written.
    """
    opts, ident = study.options, study.identity
    written: dict[str, list[Path]] = {}

    def put(kind: str, datasets) -> None:
        paths = []
        for ds in datasets:
            path = Path(out_dir) / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
            save(ds, path, opts.transfer_syntax)
            paths.append(path)
        written[kind] = paths

    put("ctpa", axial_series(study.image.hu, study.grid, ident, study.ctpa_spec(), opts.order))
    if "localizer" in opts.companions:
        put("localizer", [localizer(study.image.hu, study.grid, ident)])
    if "lung" in opts.companions:
        hu, grid = thick_slabs(study.image.hu, study.grid, 5.0)
        t = round(abs(float(grid.zs[0] - grid.zs[1])), 2) if len(grid.zs) > 1 else 5.0
        spec = SeriesSpec("lung", 4, f"Lung {t:.1f} mm", "LUNG", True, t, (-600.0, 1500.0), time_offset_s=30)
        put("lung", axial_series(hu, grid, ident, spec, opts.order))
    if "noncontrast" in opts.companions:
        grid = Grid.axial(matrix=opts.matrix, fov_mm=opts.fov_mm,
                          slices=max(1, round(len(study.grid.zs) * opts.slice_spacing_mm / 5.0)),
                          spacing_mm=5.0, center_z=float(study.grid.zs.mean()))
        plain = render(study.anatomy, grid, contrast=False, noise=opts.noise)
        spec = SeriesSpec("noncontrast", 2, "Chest w/o contrast 5.0 mm", "STANDARD", False, 5.0,
                          (40.0, 400.0), time_offset_s=-180)
        put("noncontrast", axial_series(plain.hu, grid, ident, spec, opts.order))
    return written


def thick_slabs(hu: np.ndarray, grid: Grid, thickness_mm: float) -> tuple[np.ndarray, Grid]:
    """Average consecutive slices into slabs of about the given thickness."""
    spacing = abs(float(grid.zs[0] - grid.zs[1])) if len(grid.zs) > 1 else thickness_mm
    n = max(1, round(thickness_mm / spacing))
    usable = (len(grid.zs) // n) * n
    if usable == 0:
        return hu, grid
    slabs = hu[:usable].reshape(usable // n, n, *hu.shape[1:]).mean(axis=1)
    zs = grid.zs[:usable].reshape(-1, n).mean(axis=1)
    return slabs.astype(np.float32), Grid(grid.xs, grid.ys, zs)
