"""Seeded anatomy of a synthetic contrast-enhanced chest CT, in patient millimetres.

Coordinates follow DICOM's patient system (LPS): +x towards the patient's left, +y posterior,
+z superior; the carina sits near the origin. Nothing here touches a voxel grid: the anatomy is a
list of primitives (tubes along polylines, ellipsoids) plus a few slice-wise shapes (body, lungs,
ribs, spine), and :mod:`node.phantom.render` rasterises it at any resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from node.phantom.spec import CLASSIC_LEVELS, EMBOLUS_LEVELS, HU_RANGE, Structure
from node.phantom.styles import Variation


@dataclass(frozen=True)
class Tube:
    """A vessel or airway: a polyline with a radius and an HU value at every point."""

    name: str
    structure: Structure
    points: np.ndarray  # (n, 3) mm
    radii: np.ndarray  # (n,) mm
    hu: np.ndarray  # (n,) HU when contrast-enhanced
    level: int = -1  # artery generation (see spec.ARTERY_LEVELS); -1 for other tubes
    side: str = ""  # "R", "L" or "" (midline)

    def arc_length(self) -> np.ndarray:
        """Cumulative length along the polyline, starting at 0."""
        steps = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        return np.concatenate([[0.0], np.cumsum(steps)])


@dataclass(frozen=True)
class Ellipsoid:
    """An axis-aligned ellipsoid of one HU value."""

    name: str
    structure: Structure
    center: np.ndarray  # (3,) mm
    radii: np.ndarray  # (3,) mm
    hu: float
    enhanced: bool = False  # True when the HU comes from contrast (blood pools)


@dataclass(frozen=True)
class Embolus:
    """A filling defect inside one artery, between two arc-length positions."""

    artery: str  # Tube.name
    level: str  # "central", "lobar", "segmental" or "subsegmental"
    side: str
    start_mm: float  # arc length along the artery where the clot's axis starts
    length_mm: float  # length of the clot's axis; its rounded ends add one radius each side
    size_mm: float  # largest extent along the vessel, 2-20 mm
    occlusive: bool
    radius_fraction: float  # of the lumen radius (1.0 fills the lumen)
    offset_fraction: float  # centre displacement towards the wall, as a fraction of the radius
    offset_direction: np.ndarray  # (3,) unit vector, made perpendicular to the vessel when drawn
    hu: float
    wobble: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # surface waves: kx, ky, kz, phase
    kind: str = ""  # "occlusive", "partial", "mural" or "saddle" (styled families); "" in the classic model
    #: shifted family: ellipsoid blobs (axial position, radius fraction, offset, phase, flattening)
    blobs: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))


@dataclass(frozen=True)
class FlowArtefact:
    """Ill-defined lower enhancement inside arteries (mixing of unopacified blood): not an embolus."""

    center: np.ndarray  # (3,) mm
    sigma_mm: float
    depth: float  # relative loss of enhancement at the centre


@dataclass(frozen=True)
class Anatomy:
    """Everything needed to render one synthetic patient."""

    seed: int
    size: float  # patient scale factor
    body_radii: tuple[float, float]  # muscle boundary (a, b) mm
    fat_mm: float
    noise_sigma: float
    lung_hu: float
    hu_artery: float
    hu_aorta: float
    hu_vein: float
    hu_svc: float
    hu_soft: float
    hu_fat: float
    lung_center: dict[str, np.ndarray]  # side -> (x, y)
    lung_radii: tuple[float, float]
    lung_apex_z: float
    lung_widest_z: float
    lung_floor_z: float
    spine_y: float
    sternum: tuple[float, float]  # z range
    rib_posterior_z: np.ndarray
    rib_drop_mm: float
    table_y: float
    tubes: list[Tube]
    ellipsoids: list[Ellipsoid]
    domes: list[Ellipsoid]  # liver and left upper abdomen below the diaphragm
    emboli: list[Embolus] = field(default_factory=list)
    flow_artefacts: list[FlowArtefact] = field(default_factory=list)
    streak_angles: np.ndarray = field(default_factory=lambda: np.zeros(0))
    swirl: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # right-atrium mixing waves
    scan_center_z: float = -40.0
    variation: Variation | None = None  # the style family's draw; None for the classic model

    @property
    def pe_present(self) -> bool:
        return bool(self.emboli)

    def artery(self, name: str) -> Tube:
        return next(t for t in self.tubes if t.name == name)

    def without_emboli(self) -> Anatomy:
        """The same patient with no filling defects (for checks of where emboli lie)."""
        return replace(self, emboli=[])


def _catmull_rom(points: np.ndarray, step_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample a control polyline smoothly; returns points and their control-point parameter."""
    pts = np.asarray(points, dtype=float)
    if len(pts) < 3:
        n = max(2, int(np.ceil(np.linalg.norm(pts[-1] - pts[0]) / step_mm)) + 1)
        u = np.linspace(0.0, len(pts) - 1.0, n)
        return np.array([pts[0] + (pts[-1] - pts[0]) * s / (len(pts) - 1) for s in u]), u
    padded = np.vstack([2 * pts[0] - pts[1], pts, 2 * pts[-1] - pts[-2]])
    out, params = [], []
    for i in range(len(pts) - 1):
        p0, p1, p2, p3 = padded[i : i + 4]
        n = max(2, int(np.ceil(np.linalg.norm(p2 - p1) / step_mm)))
        s = np.linspace(0.0, 1.0, n, endpoint=False)[:, None]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * s + (2 * p0 - 5 * p1 + 4 * p2 - p3) * s**2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * s**3))
        params.append(i + s[:, 0])
    out.append(pts[-1][None, :])
    params.append(np.array([len(pts) - 1.0]))
    return np.vstack(out), np.concatenate(params)


def make_tube(name: str, structure: Structure, control: list, radii: list, hu: list | float,
              *, level: int = -1, side: str = "", step_mm: float = 4.0) -> Tube:
    """Build a smooth tube from control points, with radius and HU interpolated along it."""
    ctrl = np.asarray(control, dtype=float)
    pts, u = _catmull_rom(ctrl, step_mm)
    knots = np.arange(len(ctrl), dtype=float)
    r = np.interp(u, knots, np.asarray(radii, dtype=float))
    hu_arr = np.interp(u, knots, np.broadcast_to(np.asarray(hu, dtype=float), (len(ctrl),)))
    return Tube(name, structure, pts, r, hu_arr, level, side)


def outline_radius(u, v, power: float = 2.0):
    """Normalised radius of (u, v) for the body and lung outlines: 1 on the outline, an ellipse for
    power 2 (computed as a hypotenuse, so the classic family stays bit-identical), a rounded box above."""
    if power == 2.0:
        return np.hypot(u, v)
    return (np.abs(u) ** power + np.abs(v) ** power) ** (1.0 / power)


class _Builder:
    """Draws one patient from a random generator; the order of draws is part of the seed contract."""

    def __init__(self, rng: np.random.Generator, variation: Variation | None = None):
        self.rng = rng
        self.v = variation
        self.s = float(rng.uniform(0.88, 1.1))
        self.axis = np.asarray(variation.axis_scale) if variation else np.ones(3)
        self.jitter_gain = variation.jitter_gain if variation else 1.0

    def p(self, x: float, y: float, z: float, jitter: float = 3.0) -> np.ndarray:
        return np.array([x, y, z]) * self.s * self.axis + self.rng.normal(0.0, jitter * self.jitter_gain, 3)

    def u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    # ----------------------------------------------------------------- lungs
    def lung_inside(self, pts: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Normalised lung radius at each point (< 1 inside); margin in mm shrinks the lung.

        Points outside the craniocaudal extent, inside the heart or below the diaphragm get 9.
        """
        pts = np.atleast_2d(pts)
        x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
        centers = np.where((x > 0)[:, None], self.lung_center["L"], self.lung_center["R"])
        q = np.clip((z - self.lung_widest_z) / (self.lung_apex_z - self.lung_widest_z), 0.0, None)
        prof = np.sqrt(np.clip(1.0 - q * q, 1e-6, None))
        ax = self.lung_radii[0] * prof - margin
        ay = self.lung_radii[1] * prof - margin
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = outline_radius((x - centers[:, 0]) / ax, (y - centers[:, 1]) / ay,
                                 self.v.body_power if self.v else 2.0)
        outside = (z > self.lung_apex_z) | (z < self.lung_floor_z) | (ax <= 1) | (ay <= 1)
        for center, radii in [(d.center, d.radii) for d in self.domes] + [self.heart]:
            d = (pts - center) / (radii + 4.0 + margin)
            outside |= np.einsum("ij,ij->i", d, d) < 1.0
        return np.where(outside, 9.0, rho)

    def branch_into_lung(self, start: np.ndarray, heading: np.ndarray, length: float,
                         tries: int = 14) -> np.ndarray:
        """End point of a branch: a random direction, near the parent's, that stays inside the lung."""
        spread = 0.6 * (self.v.branch_spread if self.v else 1.0)
        keep = self.v.branch_heading if self.v else 0.45
        d = heading / np.linalg.norm(heading) * keep + self.rng.normal(0.0, spread, (tries, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        ends = start + d * length
        samples = start + d[:, None, :] * length * np.array([0.5, 0.8, 1.0])[None, :, None]
        scores = self.lung_inside(samples.reshape(-1, 3), margin=4.0).reshape(tries, 3).max(axis=1)
        inside = np.nonzero(scores < 0.95)[0]
        if inside.size:
            return ends[inside[int(self.rng.integers(0, inside.size))]]
        best = ends[int(np.argmin(scores))]
        for f in (0.75, 0.5, 0.35):  # shorten until it fits
            cand = start + (best - start) * f
            if self.lung_inside(cand, margin=3.0)[0] < 1.0:
                return cand
        return best

    def grow(self, parent: Tube, structure: Structure, level: int, count: int, length: tuple,
             radius: tuple, hu: float, name: str, depth: int = 1) -> list[Tube]:
        """Branches leaving the last third of a parent vessel, heading into the lung.

        Each branch has two children of its own, ``depth`` generations deep.
        """
        out: list[Tube] = []
        n = len(parent.points)
        for i in range(count):
            k = n - 1 if i == 0 else int(self.rng.integers(max(1, 2 * n // 3), n))
            start = parent.points[k]
            heading = parent.points[-1] - parent.points[max(0, n - 3)]
            heading = heading + np.array([np.sign(start[0]) * 20.0, 0.0, 0.0])
            length_mm = self.u(*length) * self.s * (self.v.branch_length if self.v else 1.0)
            end = self.branch_into_lung(start, heading, length_mm)
            mid = (start + end) / 2 + self.rng.normal(0.0, self.v.tortuosity_mm if self.v else 2.0, 3)
            r0 = min(radius[0], float(parent.radii[k]) * 0.9)
            tube = make_tube(f"{name}{i}", structure, [start, mid, end], [r0, (r0 + radius[1]) / 2,
                             radius[1]], self.tapered(hu, level), level=level, side=parent.side, step_mm=3.0)
            out.append(tube)
            if depth > 1:
                out += self.grow(tube, structure, min(level + 1, 4) if level >= 0 else -1, 2,
                                 (length[0] * 0.7, length[1] * 0.7), (radius[1] * 0.8, radius[1] * 0.55),
                                 hu, f"{name}{i}.", depth - 1)
        return out

    def tapered(self, hu: float, level: int) -> float:
        """Arterial enhancement at a tree level (styled families dim towards the periphery)."""
        if self.v is None or level < 0:
            return hu
        return hu * (1.0 - self.v.artery_taper * level / 4.0)

    # --------------------------------------------------------------- patient
    def build(self, seed: int, pe: bool, n_emboli: int | None, min_embolus_mm: float = 2.0,
              embolus_levels: tuple[str, ...] = tuple(EMBOLUS_LEVELS)) -> Anatomy:
        rng, s, p, u = self.rng, self.s, self.p, self.u
        ax, ay, az = self.axis
        a, b = 140.0 * s * ax * u(0.96, 1.04), 100.0 * s * ay * u(0.95, 1.05)
        fat = u(6.0, 24.0)
        self.lung_center = {"R": np.array([-72.0 * ax, 4.0 * ay]) * s, "L": np.array([72.0 * ax, 4.0 * ay]) * s}
        self.lung_radii = (56.0 * s * ax, 84.0 * s * ay)
        self.lung_apex_z, self.lung_widest_z, self.lung_floor_z = 78.0 * s * az, -55.0 * s * az, -165.0 * s * az
        hu_art = u(280.0, 420.0)
        hu_ao = hu_art * u(0.55, 0.9)
        hu_vein = u(115.0, 185.0)
        hu_svc = u(900.0, 1900.0)
        if self.v is not None:
            hu_art, hu_vein = self.v.hu_artery, self.v.hu_vein
            hu_ao = hu_art * self.v.aorta_ratio
        self.domes = [
            Ellipsoid("liver", Structure.LIVER, p(-40, -10, -190, 4), np.array([110, 100, 75.0]) * s,
                      u(*HU_RANGE[Structure.LIVER])),
            Ellipsoid("left upper abdomen", Structure.SOFT_TISSUE, p(55, 0, -205, 4),
                      np.array([80, 90, 65.0]) * s, u(35.0, 50.0)),
        ]

        heart_c = p(16, -36, -92, 3)
        hs = self.v.heart_scale if self.v else 1.0
        if self.v is not None:
            heart_c = heart_c + np.asarray(self.v.heart_shift_mm) * s
        self.heart = (heart_c, np.array([74, 58, 54.0]) * s * hs)
        tubes: list[Tube] = []
        pa = Structure.PULMONARY_ARTERY
        # Central pulmonary arteries: trunk from the right-ventricular outflow, then right and left.
        valve, bif = p(24, -50, -60), p(14, -10, -8)
        if self.v is not None:
            bif = bif + np.asarray(self.v.hilum_shift_mm) * s
        trunk = make_tube("trunk", pa, [valve, p(30, -36, -32), bif], [14 * s, 14 * s, 13 * s], hu_art,
                          level=0)
        rpa = make_tube("RPA", pa, [bif, p(-10, -5, -12), p(-35, -2, -14), p(-55, -2, -20)],
                        [12 * s, 11 * s, 10.5 * s, 10 * s], hu_art, level=1, side="R")
        lpa = make_tube("LPA", pa, [bif, p(30, -2, -4), p(44, 8, -9), p(52, 18, -20)],
                        [12 * s, 10.5 * s, 10 * s, 9 * s], hu_art, level=1, side="L")
        t2 = self.tapered(hu_art, 2)
        lobar = [
            make_tube("RUL", pa, [rpa.points[len(rpa.points) * 2 // 3], p(-56, -10, 10), p(-62, -8, 36)],
                      [7 * s, 6 * s, 5 * s], t2, level=2, side="R"),
            make_tube("RLL", pa, [rpa.points[-1], p(-62, 10, -48), p(-66, 26, -82), p(-68, 38, -108)],
                      [9 * s, 8 * s, 7 * s, 6 * s], t2, level=2, side="R"),
            make_tube("LUL", pa, [lpa.points[len(lpa.points) // 2], p(56, 0, 14), p(62, -6, 38)],
                      [7 * s, 6 * s, 5 * s], t2, level=2, side="L"),
            make_tube("LLL", pa, [lpa.points[-1], p(58, 30, -52), p(64, 40, -86), p(66, 45, -108)],
                      [8.5 * s, 7.5 * s, 6.5 * s, 6 * s], t2, level=2, side="L"),
        ]
        rll, lll = lobar[1], lobar[3]
        lobar += [
            make_tube("RML", pa, [rll.points[len(rll.points) // 3], p(-72, -18, -56), p(-80, -44, -64)],
                      [5.5 * s, 5 * s, 4.5 * s], t2, level=2, side="R"),
            make_tube("LING", pa, [lll.points[len(lll.points) // 4], p(70, -8, -44), p(78, -34, -56)],
                      [5.5 * s, 5 * s, 4.5 * s], t2, level=2, side="L"),
        ]
        tubes += [trunk, rpa, lpa, *lobar]
        count = self.v.branch_count if self.v else (4, 7)
        for lob in lobar:
            tubes += self.grow(lob, pa, 3, int(rng.integers(*count)), (32, 56), (3.8 * s, 2.8 * s), hu_art,
                               f"{lob.name}.s", depth=self.v.tree_depth if self.v else 4)

        # Pulmonary veins: lower enhancement, running from the lung to the left atrium.
        pv = Structure.PULMONARY_VEIN
        veins = [
            make_tube("RSPV", pv, [p(-12, 8, -52), p(-40, -14, -42), p(-62, -24, -30)],
                      [7 * s, 6 * s, 5 * s], hu_vein, side="R"),
            make_tube("RIPV", pv, [p(-14, 14, -68), p(-42, 22, -80), p(-62, 30, -96)],
                      [7 * s, 6 * s, 5 * s], hu_vein, side="R"),
            make_tube("LSPV", pv, [p(34, 6, -52), p(52, -16, -42), p(64, -26, -28)],
                      [7 * s, 6 * s, 5 * s], hu_vein, side="L"),
            make_tube("LIPV", pv, [p(34, 16, -68), p(52, 22, -82), p(64, 30, -98)],
                      [7 * s, 6 * s, 5 * s], hu_vein, side="L"),
        ]
        tubes += veins
        for v in veins:
            tubes += self.grow(v, pv, -1, int(rng.integers(4, 7)), (30, 52), (3.4 * s, 2.6 * s), hu_vein,
                               f"{v.name}.v", depth=4)

        soft = u(*HU_RANGE[Structure.SOFT_TISSUE])
        # Systemic vessels: aorta (pulmonary phase: less than the arteries), dense SVC, unopacified IVC.
        tubes.append(make_tube(
            "aorta", Structure.AORTA,
            [p(10, -28, -64), p(-2, -38, -30), p(-5, -36, 0), p(-1, -30, 26), p(10, -14, 42),
             p(22, 6, 42), p(27, 24, 26), p(29, 34, 0), p(28, 36, -60), p(22, 36, -130), p(14, 38, -210)],
            [15 * s, 16 * s, 15 * s, 14 * s, 13 * s, 13 * s, 12.5 * s, 12 * s, 12 * s, 11.5 * s, 11 * s],
            hu_ao, step_mm=5.0))
        tubes.append(make_tube(
            "SVC", Structure.SUPERIOR_VENA_CAVA, [p(-26, -24, 130, 2), p(-27, -24, 40, 2), p(-29, -22, -46)],
            [9 * s, 9.5 * s, 10 * s], [hu_svc, hu_svc * 0.8, hu_art], step_mm=6.0))
        tubes.append(make_tube(
            "IVC", Structure.SOFT_TISSUE, [p(-24, -8, -220, 2), p(-26, -14, -150), p(-28, -22, -112)],
            [12 * s, 12 * s, 12 * s], u(60.0, 100.0), step_mm=6.0))
        # Airways: trachea to the carina, main and lobar bronchi beside the arteries.
        air = Structure.AIRWAY
        tubes += [
            make_tube("trachea", air, [p(0, 8, 130, 1), p(0, 10, 40, 1), p(0, 12, 0, 1)],
                      [9 * s, 9 * s, 8.5 * s], -1000.0),
            make_tube("RMB", air, [p(0, 12, 0, 1), p(-24, 14, -12), p(-44, 16, -24)], [7 * s, 6 * s, 5.5 * s],
                      -1000.0, side="R"),
            make_tube("LMB", air, [p(0, 12, 0, 1), p(24, 16, -18), p(44, 20, -36)], [6.5 * s, 6 * s, 5 * s],
                      -1000.0, side="L"),
            make_tube("RULB", air, [p(-36, 15, -18), p(-54, 12, 4), p(-60, 14, 24)], [4.5 * s, 4 * s, 3 * s],
                      -1000.0, side="R"),
            make_tube("RLLB", air, [p(-44, 16, -24), p(-54, 26, -62), p(-58, 36, -94)],
                      [5 * s, 4 * s, 3 * s], -1000.0, side="R"),
            make_tube("LULB", air, [p(40, 19, -32), p(52, 12, -6), p(58, 8, 18)], [4.5 * s, 4 * s, 3 * s],
                      -1000.0, side="L"),
            make_tube("LLLB", air, [p(44, 20, -36), p(54, 34, -66), p(58, 44, -96)], [5 * s, 4 * s, 3 * s],
                      -1000.0, side="L"),
            make_tube("esophagus", Structure.SOFT_TISSUE, [p(4, 27, 130, 1), p(5, 27, -40, 1),
                      p(12, 24, -150, 1)], [8 * s, 8 * s, 8 * s], soft + 5.0),
        ]

        # Heart in the pulmonary arterial phase: right chambers dense, left chambers like the veins.
        ellipsoids = [
            Ellipsoid("pericardial fat", Structure.FAT, heart_c, np.array([74, 58, 54.0]) * s * hs, -95.0),
            Ellipsoid("myocardium", Structure.MYOCARDIUM, heart_c, np.array([70, 54, 50.0]) * s * hs,
                      u(*HU_RANGE[Structure.MYOCARDIUM])),
            Ellipsoid("right ventricle", Structure.HEART_BLOOD, heart_c + np.array([-2, -24, -2]) * s * hs,
                      np.array([40, 20, 34.0]) * s * hs, hu_art, enhanced=True),
            Ellipsoid("right atrium", Structure.HEART_BLOOD, heart_c + np.array([-46, 6, 8]) * s * hs,
                      np.array([24, 24, 30.0]) * s * hs, hu_art * 0.92, enhanced=True),
            Ellipsoid("left ventricle", Structure.HEART_BLOOD, heart_c + np.array([24, 10, -8]) * s * hs,
                      np.array([28, 24, 30.0]) * s * hs, hu_vein, enhanced=True),
            Ellipsoid("left atrium", Structure.HEART_BLOOD, heart_c + np.array([-4, 36, 28]) * s * hs,
                      np.array([28, 15, 16.0]) * s * hs, hu_vein, enhanced=True),
        ]
        # Lymph nodes beside the hilar arteries: soft tissue outside the lumen, a classic mimic.
        for _ in range(int(rng.integers(*(self.v.lymph_nodes if self.v else (1, 5))))):
            host = [rpa, lpa, *lobar][int(rng.integers(0, 2 + len(lobar)))]
            k = int(rng.integers(0, len(host.points)))
            radius = u(3.5, 7.0) * s
            direction = rng.normal(0.0, 1.0, 3)
            tangent = host.points[min(k + 1, len(host.points) - 1)] - host.points[max(k - 1, 0)]
            tangent /= np.linalg.norm(tangent)
            direction -= tangent * (direction @ tangent)
            direction /= np.linalg.norm(direction)
            center = host.points[k] + direction * (host.radii[k] + radius + 2.0)
            ellipsoids.append(Ellipsoid("lymph node", Structure.LYMPH_NODE, center,
                                        np.array([radius, radius * u(0.7, 1.0), radius * u(1.0, 1.6)]),
                                        u(*HU_RANGE[Structure.LYMPH_NODE])))

        anatomy = Anatomy(
            seed=seed, size=s, body_radii=(a, b), fat_mm=fat,
            noise_sigma=self.v.noise_sigma if self.v else float(np.clip(u(9.0, 20.0) * s * s, 8.0, 26.0)),
            lung_hu=u(-865.0, -835.0), hu_artery=hu_art, hu_aorta=hu_ao, hu_vein=hu_vein, hu_svc=hu_svc,
            hu_soft=soft, hu_fat=u(*HU_RANGE[Structure.FAT]),
            lung_center=self.lung_center, lung_radii=self.lung_radii, lung_apex_z=self.lung_apex_z,
            lung_widest_z=self.lung_widest_z, lung_floor_z=self.lung_floor_z, spine_y=52.0 * s * ay,
            sternum=(-120.0 * s * az, 48.0 * s * az),
            rib_posterior_z=np.array([74.0 - 23.0 * k for k in range(11)]) * s * az + rng.normal(0, 1.5, 11),
            rib_drop_mm=u(40.0, 60.0) * s * az, table_y=b + fat + u(8.0, 14.0),
            tubes=tubes, ellipsoids=ellipsoids, domes=self.domes,
            streak_angles=rng.uniform(0.0, np.pi, int(rng.integers(6, 14))),
            swirl=np.column_stack([rng.normal(0, 0.12, (4, 3)), rng.uniform(0, 2 * np.pi, 4)]),
            scan_center_z=-45.0 * s * az, variation=self.v,
        )
        if self.v is not None:
            emboli = self.varied_emboli(anatomy, n_emboli, embolus_levels) if pe else []
            return replace(anatomy, emboli=emboli, flow_artefacts=self.flow_artefacts(anatomy, emboli))
        emboli = self.emboli(anatomy, n_emboli, min_embolus_mm, embolus_levels) if pe else []
        return replace(anatomy, emboli=emboli, flow_artefacts=self.flow_artefacts(anatomy, emboli))

    # ------------------------------------------------------------ findings
    def emboli(self, anatomy: Anatomy, n_emboli: int | None, min_mm: float = 2.0,
               allowed: tuple[str, ...] = tuple(EMBOLUS_LEVELS)) -> list[Embolus]:
        rng = self.rng
        n = n_emboli if n_emboli is not None else int(rng.choice([1, 1, 2, 2, 3, 4]))
        levels = list(CLASSIC_LEVELS)
        out = []
        for _ in range(n):
            weights = np.array([0.25, 0.35, 0.40]) * [lv in allowed for lv in levels]
            level = str(rng.choice(levels, p=weights / weights.sum()))
            candidates = [t for t in anatomy.tubes if t.structure == Structure.PULMONARY_ARTERY
                          and t.level in EMBOLUS_LEVELS[level]]
            tube = candidates[int(rng.integers(0, len(candidates)))]
            arc = tube.arc_length()
            start = self.u(0.05, 0.75) * arc[-1]
            lumen = float(np.interp(start, arc, tube.radii))
            size = self.u(min_mm, 20.0)
            # A plug closes the lumen only if it is at least as long as the lumen is wide, and sizes
            # stay within 2-20 mm, so wide central arteries get partial (mural, saddle) emboli.
            occlusive = bool(rng.random() < 0.4) and 2.0 * lumen <= 20.0
            if occlusive:
                size = min(max(size, 2.0 * lumen), 20.0)
                fraction, offset = 1.05, 0.0
            else:
                fraction = min(self.u(0.45, 0.8), size / (2.0 * lumen))
                offset = self.u(0.0, 0.45)
            length = min(max(0.0, size - 2.0 * fraction * lumen), arc[-1] - start)
            out.append(Embolus(
                artery=tube.name, level=level, side=tube.side or ("L" if rng.random() < 0.5 else "R"),
                start_mm=start, length_mm=length, size_mm=size, occlusive=occlusive,
                radius_fraction=fraction, offset_fraction=offset,
                offset_direction=rng.normal(0.0, 1.0, 3), hu=self.u(*HU_RANGE[Structure.EMBOLUS]),
                wobble=np.column_stack([rng.normal(0.0, 0.3, (3, 3)), rng.uniform(0.0, 2 * np.pi, 3)]),
            ))
        return out

    def varied_emboli(self, anatomy: Anatomy, n_emboli: int | None,
                      allowed: tuple[str, ...] = tuple(EMBOLUS_LEVELS)) -> list[Embolus]:
        """Emboli of a styled family: every level, 3-25 mm, occlusive, partial, mural or saddle."""
        rng, v = self.rng, self.v
        assert v is not None
        n = n_emboli if n_emboli is not None else int(rng.integers(v.emboli_count[0], v.emboli_count[1] + 1))
        levels = list(EMBOLUS_LEVELS)
        weights = np.array(v.level_weights) * [lv in allowed for lv in levels]
        if weights.sum() == 0:
            weights = np.array([lv in allowed for lv in levels], dtype=float)
        out: list[Embolus] = []
        for _ in range(n):
            level = str(rng.choice(levels, p=weights / weights.sum()))
            candidates = [t for t in anatomy.tubes if t.structure == Structure.PULMONARY_ARTERY
                          and t.level in EMBOLUS_LEVELS[level]]
            tube = candidates[int(rng.integers(0, len(candidates)))]
            arc = tube.arc_length()
            size = self.u(*v.embolus_mm)
            kind = str(rng.choice(["occlusive", "partial", "mural", "saddle"], p=[0.3, 0.35, 0.2, 0.15]))
            if kind == "saddle" and level != "central":
                kind = "partial"
            if kind == "saddle":
                # Astride the bifurcation: the end of the trunk and the start of both main arteries.
                trunk = anatomy.artery("trunk")
                ta = trunk.arc_length()
                lumen = float(trunk.radii[-1])
                length = min(size, 18.0)
                common: dict[str, Any] = dict(
                    level="central", size_mm=size, occlusive=False, radius_fraction=self.u(0.55, 0.8),
                              offset_fraction=self.u(0.1, 0.3), offset_direction=rng.normal(0.0, 1.0, 3),
                              hu=self.u(*v.embolus_hu), kind="saddle",
                              wobble=np.column_stack([rng.normal(0.0, 0.3, (3, 3)), rng.uniform(0, 2 * np.pi, 3)]))
                out.append(Embolus(artery="trunk", side="", start_mm=max(0.0, ta[-1] - length / 2 - lumen),
                                   length_mm=length / 2, blobs=self.blobs(), **common))
                for name, side in (("RPA", "R"), ("LPA", "L")):
                    out.append(Embolus(artery=name, side=side, start_mm=0.0, length_mm=length / 2,
                                       blobs=self.blobs(), **common))
                continue
            start = self.u(0.0, 0.8) * arc[-1]
            lumen = float(np.interp(start, arc, tube.radii))
            elongated = rng.random() < 0.4
            if kind == "occlusive":
                fraction, offset = 1.05, 0.0
                size = max(size, 2.0 * lumen)
            elif kind == "mural":
                fraction, offset = self.u(0.35, 0.55), self.u(0.5, 0.75)
            else:
                fraction, offset = self.u(0.45, 0.85), self.u(0.0, 0.45)
            width = 2.0 * fraction * lumen
            length = max(0.0, size - width) if elongated or size > width else 0.0
            length = min(length, arc[-1] - start)
            out.append(Embolus(
                artery=tube.name, level=level, side=tube.side or ("L" if rng.random() < 0.5 else "R"),
                start_mm=start, length_mm=length, size_mm=size, occlusive=kind == "occlusive",
                radius_fraction=fraction, offset_fraction=offset, offset_direction=rng.normal(0.0, 1.0, 3),
                hu=self.u(*v.embolus_hu), kind=kind, blobs=self.blobs(),
                wobble=np.column_stack([rng.normal(0.0, 0.3, (3, 3)), rng.uniform(0.0, 2 * np.pi, 3)]),
            ))
        return out

    def blobs(self) -> np.ndarray:
        """Blobs of a shifted-family clot: axial position 0-1, radius and offset fractions, phase, flattening."""
        if self.v is None or self.v.embolus_primitive != "blobs":
            return np.zeros((0, 5))
        k = int(self.rng.integers(2, 5))
        rng = self.rng
        return np.column_stack([rng.uniform(0.0, 1.0, k), rng.uniform(0.6, 1.0, k), rng.uniform(0.0, 0.4, k),
                                rng.uniform(0.0, 2 * np.pi, k), rng.uniform(0.5, 1.0, k)])

    def flow_artefacts(self, anatomy: Anatomy, emboli: list[Embolus]) -> list[FlowArtefact]:
        rng = self.rng
        if rng.random() >= (self.v.flow_probability if self.v else 0.35):
            return []
        if self.v is not None:  # mixing anywhere from the main arteries to segmental branches
            lower = [t for t in anatomy.tubes if t.structure == Structure.PULMONARY_ARTERY and t.level in (1, 2, 3)]
        else:
            lower = [t for t in anatomy.tubes if t.structure == Structure.PULMONARY_ARTERY and t.level in (2, 3)
                     and t.points[:, 2].mean() < -40.0 * self.s]
        taken = [anatomy.artery(e.artery).points.mean(axis=0) for e in emboli]
        out = []
        for _ in range(int(rng.integers(1, 5 if self.v else 3))):
            tube = lower[int(rng.integers(0, len(lower)))]
            center = tube.points[int(rng.integers(0, len(tube.points)))]
            if all(np.linalg.norm(center - c) > 30.0 for c in taken):
                out.append(FlowArtefact(center, self.u(5.0, 10.0), self.u(0.3, 0.5)))
        return out


def build_anatomy(seed: int, *, pe: bool, n_emboli: int | None = None, attempt: int = 0,
                  min_embolus_mm: float = 2.0, embolus_levels: tuple[str, ...] | None = None,
                  variation: Variation | None = None) -> Anatomy:
    """Draw one synthetic patient.

    Parameters
    ----------
    seed
        Everything about the patient follows from it: the same seed gives the same anatomy.
    pe
        Whether the study has pulmonary emboli.
    n_emboli
        How many emboli a positive study gets; drawn from 1–4 when omitted.
    attempt
        Another draw for the same seed, used when emboli came out too small for the voxel grid.
    min_embolus_mm
        Smallest embolus extent drawn (2-20 mm); a larger floor makes an easier dataset.
    embolus_levels
        Artery levels emboli may sit in; None: central, lobar and segmental in the classic model, and
        subsegmental as well in styled families.
    variation
        A style family's draw (:mod:`node.phantom.styles`); None is the classic model.
    """
    if n_emboli is not None and n_emboli < 1 and pe:
        raise ValueError("a PE-positive study needs at least one embolus")
    if embolus_levels is None:
        embolus_levels = tuple(CLASSIC_LEVELS) if variation is None else tuple(EMBOLUS_LEVELS)
    return _Builder(np.random.default_rng([seed, attempt]), variation).build(seed, pe, n_emboli, min_embolus_mm,
                                                                           embolus_levels)
