"""One synthetic CTPA study: draw the patient, render its series, write them as DICOM."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node.errors import PhantomError
from node.phantom.anatomy import Anatomy, build_anatomy
from node.phantom.render import Grid, Rendered, render
from node.phantom.spec import Structure
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
    embolus_levels: tuple[str, ...] = ("central", "lobar", "segmental")  # where emboli may sit
    noise: bool = True

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
        if not self.embolus_levels or set(self.embolus_levels) - {"central", "lobar", "segmental"}:
            problems.append(f"embolus levels {list(self.embolus_levels)} (expected some of central, lobar, segmental)")
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
        return SeriesSpec("ctpa", 3, f"CTPA {t:.1f} mm", "STANDARD", True, t, (100.0, 700.0))


def _records(anatomy: Anatomy, image: Rendered) -> list[EmbolusRecord]:
    return [EmbolusRecord(emb.artery, emb.level, emb.side, round(emb.size_mm, 1), emb.occlusive,
                          round(emb.hu, 1), voxels, slices)
            for emb, voxels, slices in zip(anatomy.emboli, image.emboli_voxels, image.emboli_slices,
                                           strict=True) if voxels]


def generate_study(seed: int, *, pe: bool, options: PhantomOptions | None = None) -> PhantomStudy:
    """Draw and render one study.

    A positive study is redrawn (deterministically, from the same seed) while every embolus is too
    small to cover a voxel of the grid, so a study labelled positive always shows a filling defect.
    """
    options = options or PhantomOptions()
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
