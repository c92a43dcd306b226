"""Style families of the phantom: what varies from one synthetic study to the next besides the finding.

``classic``
    The original generator: one anatomy model, fixed scanner settings from :class:`PhantomOptions`.
``varied``
    Domain randomisation for training. Everything that is not the finding is drawn per study over
    ranges wider than real scanners produce: habitus (per-axis scale), position in the field, the
    arterial tree (branch count, spread, length, tortuosity), contrast timing and strength (arterial
    lumen 150-600 HU), noise level and grain, reconstruction kernel (blur or sharpening), field of
    view 250-450 mm, matrix 256-512 (smaller ones more often: they cost less to render), slice spacing
    0.6-5 mm with thickness up to 1.6 x the spacing,
    streak and motion artefacts, more mimics (flow artefacts in any artery, lymph nodes). Emboli at
    every level (central, lobar, segmental, subsegmental), 3-25 mm, occlusive, partial, mural or
    saddle, round or elongated, 1-6 per positive study.
``shifted``
    A held-out family that training never sees, the stand-in for a hospital's data. Other shape
    primitives (emboli built from overlapping ellipsoid blobs instead of swept capsules; vessels
    with soft, wide edges), another intensity model (arteries dimming towards the periphery,
    Laplace-distributed noise that grows with attenuation, patchy lung texture), another tree
    (fewer, straighter, longer branches), a wider habitus and other scanner settings (512 matrix,
    340-420 mm field, 1.0-1.5 mm slices, sharp kernel), other body and organ shapes (a boxy chest and
    lungs drawn as superellipses, a larger heart lying further left and lower, hila higher and further
    back) and emboli drawn towards segmental arteries.

Every draw comes from the study seed, so a seed gives the same study in every family run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STYLES = ("classic", "varied", "shifted")


@dataclass(frozen=True)
class Variation:
    """One study's draw of everything a style family varies."""

    family: str
    # anatomy
    axis_scale: tuple[float, float, float]  # habitus: x (left-right), y (front-back), z (head-foot)
    jitter_gain: float  # multiplies the landmark jitter (3 mm in the classic model)
    hu_artery: float
    aorta_ratio: float  # aortic HU / pulmonary arterial HU (contrast timing)
    hu_vein: float
    artery_taper: float  # fraction of enhancement lost from the trunk to subsegmental arteries
    branch_count: tuple[int, int]  # segmental branches per lobar artery (low, high exclusive)
    branch_spread: float  # multiplies the random spread of branch directions
    branch_length: float  # multiplies branch lengths
    tortuosity_mm: float  # random displacement of each branch's midpoint
    tree_depth: int
    lymph_nodes: tuple[int, int]
    flow_probability: float
    # findings
    emboli_count: tuple[int, int]  # inclusive
    embolus_mm: tuple[float, float]
    embolus_hu: tuple[float, float]
    level_weights: tuple[float, float, float, float]  # central, lobar, segmental, subsegmental
    embolus_primitive: str  # "capsule" or "blobs"
    # scanner
    matrix: int
    fov_mm: float
    slice_spacing_mm: float
    thickness_ratio: float  # slice thickness / spacing
    coverage_mm: float  # head-foot extent of the series
    offset_mm: tuple[float, float, float]  # where the patient lies in the field (x, y) and scan centre (z)
    noise_sigma: float
    noise_grain: int  # passes of a [1, 2, 1] blur on the noise (0: white)
    noise_model: str  # "gaussian" or "laplace-attenuation"
    kernel_sigma_mm: float  # Gaussian blur of the reconstruction (0: none)
    sharpen: float  # unsharp-mask gain (0: none)
    edge_mm: float  # width of vessel edges (partial volume); 0 = one pixel
    streak_gain: float
    motion: float  # share of heart-level slices with a motion ghost
    lung_texture: tuple[float, float]  # (correlation mm, amplitude HU)
    kernel_name: str
    # other primitives (the shifted family's; the defaults are the classic and varied shapes)
    body_power: float = 2.0  # exponent of the body and lung outlines: 2 an ellipse, 3 a rounded box
    heart_shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    heart_scale: float = 1.0
    hilum_shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # moves the trunk's bifurcation and hila
    branch_heading: float = 0.45  # weight of the parent's direction in a branch's (more: straighter tree)


def draw_variation(seed: int, family: str) -> Variation:
    """Draw a study's variation for the ``varied`` or ``shifted`` family."""
    rng = np.random.default_rng([seed, 271828, STYLES.index(family)])
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    if family == "varied":
        spacing = float(np.exp(rng.uniform(np.log(0.6), np.log(5.0))))
        sharpen = u(0.2, 0.9) if rng.random() < 0.35 else 0.0
        return Variation(
            family=family,
            axis_scale=(u(0.85, 1.18), u(0.82, 1.2), u(0.88, 1.12)), jitter_gain=u(0.6, 2.2),
            hu_artery=u(150.0, 600.0), aorta_ratio=u(0.3, 1.1), hu_vein=u(70.0, 220.0),
            artery_taper=u(0.0, 0.2), branch_count=(int(rng.integers(2, 5)), int(rng.integers(5, 9))),
            branch_spread=u(0.5, 1.6), branch_length=u(0.7, 1.35), tortuosity_mm=u(1.0, 9.0), tree_depth=4,
            lymph_nodes=(1, 8), flow_probability=0.6,
            emboli_count=(1, 6), embolus_mm=(3.0, 25.0), embolus_hu=(0.0, 90.0),
            level_weights=(0.2, 0.3, 0.3, 0.2), embolus_primitive="capsule",
            matrix=int(rng.choice([256, 320, 384, 448, 512], p=[0.3, 0.25, 0.2, 0.15, 0.1])),
            fov_mm=u(250.0, 450.0), slice_spacing_mm=spacing,
            thickness_ratio=u(1.0, 1.6), coverage_mm=u(200.0, 320.0),
            offset_mm=(u(-35.0, 35.0), u(-30.0, 30.0), u(-25.0, 25.0)),
            noise_sigma=u(4.0, 45.0), noise_grain=int(rng.integers(0, 4)), noise_model="gaussian",
            kernel_sigma_mm=0.0 if sharpen else u(0.0, 1.0), sharpen=sharpen, edge_mm=0.0,
            streak_gain=u(0.0, 2.0), motion=u(0.1, 0.6) if rng.random() < 0.3 else 0.0,
            lung_texture=(u(5.0, 14.0), u(5.0, 30.0)),
            kernel_name=str(rng.choice(["STANDARD", "SOFT", "B30f", "FC08", "LUNG", "SHARP"])),
        )
    if family == "shifted":
        return Variation(
            family=family,
            axis_scale=(u(1.1, 1.25), u(0.95, 1.1), u(0.95, 1.05)), jitter_gain=u(1.0, 1.6),
            hu_artery=u(230.0, 420.0), aorta_ratio=u(0.5, 0.8), hu_vein=u(110.0, 170.0),
            artery_taper=u(0.25, 0.4), branch_count=(2, 4), branch_spread=0.35, branch_length=u(1.3, 1.6),
            tortuosity_mm=0.5, tree_depth=3,
            lymph_nodes=(2, 5), flow_probability=0.4,
            emboli_count=(1, 4), embolus_mm=(5.0, 22.0), embolus_hu=(10.0, 80.0),
            level_weights=(0.15, 0.35, 0.5, 0.0), embolus_primitive="blobs",
            matrix=512, fov_mm=u(340.0, 420.0), slice_spacing_mm=float(rng.choice([1.0, 1.25, 1.5])),
            thickness_ratio=1.0, coverage_mm=u(260.0, 300.0),
            offset_mm=(u(-15.0, 15.0), u(-10.0, 25.0), u(-10.0, 10.0)),
            noise_sigma=u(12.0, 22.0), noise_grain=1, noise_model="laplace-attenuation",
            kernel_sigma_mm=0.0, sharpen=u(0.3, 0.6), edge_mm=u(1.5, 2.5),
            streak_gain=u(0.5, 1.0), motion=0.0, lung_texture=(u(3.0, 5.0), u(25.0, 45.0)),
            kernel_name="I40f",
            body_power=u(2.6, 3.4), heart_shift_mm=(u(8.0, 18.0), u(4.0, 12.0), u(-12.0, 0.0)),
            heart_scale=u(1.08, 1.2), hilum_shift_mm=(u(-4.0, 4.0), u(4.0, 10.0), u(8.0, 16.0)),
            branch_heading=u(1.2, 1.6),
        )
    raise ValueError(f"style {family!r} has no variation (expected varied or shifted)")
