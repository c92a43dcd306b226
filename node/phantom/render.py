"""Rasterise an :class:`~node.phantom.anatomy.Anatomy` onto an axial voxel grid.

Painter's algorithm in patient millimetres: each structure is blended in with its partial-volume
fraction ``f`` (``hu += (structure_hu - hu) * f``), so edges look like a reconstructed CT rather than
binary masks, and a voxel takes the structure's label where ``f >= 0.5``. Work is confined to each
primitive's bounding box, so the cost follows the anatomy, not the volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from node.phantom.anatomy import Anatomy, Ellipsoid, Embolus, Tube, outline_radius
from node.phantom.spec import UNENHANCED_BLOOD_HU, Structure


@dataclass(frozen=True)
class Grid:
    """Voxel centres of an axial series, in patient millimetres (slices run superior to inferior)."""

    xs: np.ndarray  # column centres, increasing (towards patient left)
    ys: np.ndarray  # row centres, increasing (towards posterior)
    zs: np.ndarray  # slice centres, decreasing

    @classmethod
    def axial(cls, *, matrix: int, fov_mm: float, slices: int, spacing_mm: float, center_z: float,
              center_x: float = 0.0, center_y: float = 0.0) -> Grid:
        """A square axial grid; ``center_x``/``center_y`` move the field's centre off the patient's axis."""
        pixel = fov_mm / matrix
        centres = (np.arange(matrix) - (matrix - 1) / 2.0) * pixel
        zs = center_z + ((slices - 1) / 2.0 - np.arange(slices)) * spacing_mm
        return cls(centres + center_x, centres + center_y, zs)

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.zs), len(self.ys), len(self.xs)

    @property
    def pixel_mm(self) -> float:
        return float(self.xs[1] - self.xs[0])


@dataclass(frozen=True)
class Rendered:
    """A rendered volume: HU, the structure label of every voxel, and the embolus mask."""

    hu: np.ndarray  # (slices, rows, columns) float32
    labels: np.ndarray  # uint8 Structure codes
    mask: np.ndarray  # bool, True inside an embolus that the image shows (VISIBLE_SHARE)
    emboli_voxels: list[int]  # mask voxels each embolus contributed (0: too small or not shown on this grid)
    emboli_slices: list[list[int]]  # slice indices where each embolus has mask voxels
    # Per voxel: how much of its clot's full darkening the noise-free image shows (0-1), and which
    # embolus (index + 1, 0: none) covers it at least half.
    shown: np.ndarray
    owner: np.ndarray


# A voxel is embolus in the mask when it is at least half inside the clot (EMBOLUS_SHARE of the slice's
# sub-slices in a thick slice) and the noise-free image shows at least this share of the clot's full
# darkening there: (lumen HU - voxel HU after the clot) / (lumen HU - clot HU). A small artery averaged
# with the lung around it (thin vessel, thick slice) keeps a mask voxel by volume while the image
# shows nothing there; such voxels taught stage 1 to call blank lung a clot.
VISIBLE_SHARE = 0.4
EMBOLUS_SHARE = 0.4


def shown_mask(inside: np.ndarray, shown: np.ndarray, owner: np.ndarray, n_emboli: int
               ) -> tuple[np.ndarray, list[int], list[list[int]]]:
    """The mask the image shows, and each embolus's voxels and slices in it."""
    mask = inside & (shown >= VISIBLE_SHARE)
    mine = owner * mask
    voxels = [int(v) for v in np.bincount(mine.ravel(), minlength=n_emboli + 1)[1:n_emboli + 1]]
    slices = [[int(k) for k in np.nonzero((mine == i + 1).any(axis=(1, 2)))[0]] if voxels[i] else []
              for i in range(n_emboli)]
    return mask, voxels, slices


def _index_range(coords: np.ndarray, lo: float, hi: float) -> slice:
    idx = np.nonzero((coords >= lo) & (coords <= hi))[0]
    return slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)


def _box(grid: Grid, lo: np.ndarray, hi: np.ndarray):
    """Index slices and coordinate arrays (broadcastable to the box) for a millimetre box."""
    sz, sy, sx = (_index_range(grid.zs, lo[2], hi[2]), _index_range(grid.ys, lo[1], hi[1]),
                  _index_range(grid.xs, lo[0], hi[0]))
    if sz.stop == sz.start or sy.stop == sy.start or sx.stop == sx.start:
        return None
    return ((sz, sy, sx), grid.xs[sx][None, None, :], grid.ys[sy][None, :, None], grid.zs[sz][:, None, None])


def blend(hu: np.ndarray, labels: np.ndarray, region, f: np.ndarray, value, code: Structure) -> None:
    """Mix a structure into a region by its partial-volume fraction ``f`` (broadcast over the region);
    voxels it fills at least half take its label."""
    sub = hu[region]
    sub += (value - sub) * f
    labels[region][np.broadcast_to(f >= 0.5, sub.shape)] = int(code)


def _segment_fraction(x, y, z, p0, p1, r0, r1, h):
    """Partial-volume fraction of a tapered capsule from p0 to p1, and the axial parameter t."""
    d = p1 - p0
    length2 = max(float(d @ d), 1e-9)
    vx, vy, vz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip((vx * d[0] + vy * d[1] + vz * d[2]) / length2, 0.0, 1.0)
    dist = np.sqrt((vx - t * d[0]) ** 2 + (vy - t * d[1]) ** 2 + (vz - t * d[2]) ** 2)
    return np.clip(0.5 + (r0 + t * (r1 - r0) - dist) / h, 0.0, 1.0), t


class _Painter:
    def __init__(self, grid: Grid, fill_hu: float = -1000.0, edge_mm: float = 0.0):
        self.grid = grid
        self.hu = np.full(grid.shape, fill_hu, dtype=np.float32)
        self.labels = np.zeros(grid.shape, dtype=np.uint8)
        self.h = grid.pixel_mm
        self.edge = max(self.h, edge_mm)  # width of vessel edges

    def blend(self, region, f, hu, code: Structure) -> None:
        blend(self.hu, self.labels, region, f, hu, code)

    def ellipsoid(self, e: Ellipsoid, hu: float, pad: float = 0.0) -> None:
        radii = e.radii + pad
        box = _box(self.grid, e.center - radii - self.h, e.center + radii + self.h)
        if box is None:
            return
        region, x, y, z = box
        rho = np.sqrt(((x - e.center[0]) / radii[0]) ** 2 + ((y - e.center[1]) / radii[1]) ** 2
                      + ((z - e.center[2]) / radii[2]) ** 2)
        f = np.clip(0.5 + (1.0 - rho) * radii.min() / self.h, 0.0, 1.0).astype(np.float32)
        self.blend(region, f, hu, e.structure)

    def tube(self, tube: Tube, *, hu_override: float | None = None, pad: float = 0.0,
             structure: Structure | None = None, soft: bool = False) -> None:
        h = self.edge if soft else self.h
        for i in range(len(tube.points) - 1):
            p0, p1 = tube.points[i], tube.points[i + 1]
            r0, r1 = tube.radii[i] + pad, tube.radii[i + 1] + pad
            rmax = max(r0, r1) + h
            box = _box(self.grid, np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
            if box is None:
                continue
            region, x, y, z = box
            f, t = _segment_fraction(x, y, z, p0, p1, r0, r1, h)
            hu = hu_override if hu_override is not None else tube.hu[i] + t * (tube.hu[i + 1] - tube.hu[i])
            self.blend(region, f.astype(np.float32), hu, structure or tube.structure)


def _lumen_fraction(tube: Tube, x, y, z, h) -> np.ndarray:
    f = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.float32)
    for i in range(len(tube.points) - 1):
        fi, _ = _segment_fraction(x, y, z, tube.points[i], tube.points[i + 1], tube.radii[i],
                                  tube.radii[i + 1], h)
        np.maximum(f, fi, out=f)
    return f


def embolus_axis(emb: Embolus, tube: Tube) -> tuple[np.ndarray, np.ndarray]:
    """Points and lumen radii along the clot's axis (a stretch of its artery's centreline)."""
    arc = tube.arc_length()
    s0, s1 = emb.start_mm, emb.start_mm + emb.length_mm
    ss = np.concatenate([[s0], arc[(arc > s0) & (arc < s1)], [s1]])
    pts = np.column_stack([np.interp(ss, arc, tube.points[:, k]) for k in range(3)])
    return pts, np.interp(ss, arc, tube.radii)


def _paint_embolus(p: _Painter, emb: Embolus, tube: Tube, shown: np.ndarray, owner: np.ndarray, index: int,
                   contrast: bool) -> None:
    """Paint one clot; mark the voxels it fills at least half (``owner``) and the share of its full
    darkening each voxel shows (``shown``)."""
    pts, radii = embolus_axis(emb, tube)
    reach = float(radii.max()) * 1.1 + p.h
    box = _box(p.grid, pts.min(axis=0) - reach, pts.max(axis=0) + reach)
    if box is None:
        return
    region, x, y, z = box
    lumen = _lumen_fraction(tube, x, y, z, p.h)
    shape = np.zeros_like(lumen)
    # Thrombus is not a smooth capsule: smooth random waves make its surface irregular (+/- ~25 %).
    bumps = sum(np.sin(w[0] * x + w[1] * y + w[2] * z + w[3]) for w in emb.wobble) if not emb.occlusive \
        else 0.0
    scale = 1.0 + 0.15 * bumps
    if len(pts) == 2 and np.allclose(pts[0], pts[1]):
        pts = np.vstack([pts[0], pts[0] + 1e-3])
    if len(emb.blobs):
        _blob_shape(shape, emb, pts, radii, x, y, z, p.h)
    for i in range(len(pts) - 1 if not len(emb.blobs) else 0):
        axis = pts[i + 1] - pts[i]
        axis = axis / max(float(np.linalg.norm(axis)), 1e-9)
        w = emb.offset_direction - axis * float(emb.offset_direction @ axis)
        w = w / max(float(np.linalg.norm(w)), 1e-9)
        shift = [w * emb.offset_fraction * radii[i], w * emb.offset_fraction * radii[i + 1]]
        fi, _ = _segment_fraction(x, y, z, pts[i] + shift[0], pts[i + 1] + shift[1],
                                  emb.radius_fraction * radii[i] * scale,
                                  emb.radius_fraction * radii[i + 1] * scale, p.h)
        np.maximum(shape, fi, out=shape)
    f = np.minimum(shape, lumen)
    hu = emb.hu if contrast else UNENHANCED_BLOOD_HU
    before = p.hu[region].copy()
    p.blend(region, f, hu, Structure.EMBOLUS if contrast else Structure.PULMONARY_ARTERY)
    full_lumen = lumen >= 0.99  # the artery's own lumen HU, where a voxel lies wholly inside it
    lumen_hu = float(before[full_lumen].mean()) if full_lumen.any() else float(before[lumen >= 0.5].max(initial=hu))
    share = (before - p.hu[region]) / max(lumen_hu - hu, 1.0)
    np.maximum(shown[region], share, out=shown[region])
    owner[region][f >= 0.5] = index + 1


def _blob_shape(shape: np.ndarray, emb: Embolus, pts: np.ndarray, radii: np.ndarray, x, y, z, h: float) -> None:
    """A clot made of overlapping ellipsoids strung along the axis (the shifted family's primitive)."""
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    axis = pts[-1] - pts[0]
    axis = axis / max(float(np.linalg.norm(axis)), 1e-9) if np.linalg.norm(axis) > 1e-6 else np.array([0.0, 0.0, 1.0])
    for t, rf, off, phase, flat in emb.blobs:
        s_ = float(t) * arc[-1]
        c = np.array([np.interp(s_, arc, pts[:, k]) for k in range(3)])
        lumen = float(np.interp(s_, arc, radii))
        w = emb.offset_direction - axis * float(emb.offset_direction @ axis)
        w = w / max(float(np.linalg.norm(w)), 1e-9)
        w = np.cos(phase) * w + np.sin(phase) * np.cross(axis, w)
        c = c + w * off * lumen
        r_across = emb.radius_fraction * lumen * rf
        r_along = max(r_across * (1.0 + 1.5 * flat), 0.5 * emb.size_mm / max(len(emb.blobs), 1))
        d = np.stack(np.broadcast_arrays(x - c[0], y - c[1], z - c[2]), axis=-1)
        along = d @ axis
        across = np.sqrt(np.maximum((d * d).sum(-1) - along**2, 0.0))
        rho = np.sqrt((along / r_along) ** 2 + (across / r_across) ** 2)
        np.maximum(shape, np.clip(0.5 + (1.0 - rho) * r_across / h, 0.0, 1.0).astype(np.float32), out=shape)


def _interp_matrix(coords: np.ndarray, spacing_mm: float, n: int) -> np.ndarray:
    """Linear-interpolation weights from a coarse axis (n knots) to the given coordinates."""
    f = np.clip((coords + (n // 2) * spacing_mm) / spacing_mm, 0, n - 1.001)
    i = f.astype(int)
    w = np.zeros((len(coords), n), dtype=np.float32)
    w[np.arange(len(coords)), i] = 1 - (f - i)
    w[np.arange(len(coords)), i + 1] = f - i
    return w


@lru_cache(maxsize=4)
def _coarse_field(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 7919]).normal(0.0, 1.0, (48, 48, 48)).astype(np.float32)


def smooth_field(seed: int, grid: Grid, spacing_mm: float, k: int) -> np.ndarray:
    """Slice k of a smooth random field (about unit variance), fixed in patient space for a seed."""
    coarse = _coarse_field(seed)
    wz = _interp_matrix(np.array([grid.zs[k] + 100.0]), spacing_mm, 48)[0]
    plane = np.tensordot(wz, coarse, axes=1)
    return _interp_matrix(grid.ys, spacing_mm, 48) @ plane @ _interp_matrix(grid.xs, spacing_mm, 48).T


class _SliceCanvas:
    """Blends 2D shapes into one slice (or, broadcast, into every slice) within their bounding boxes."""

    def __init__(self, hu: np.ndarray, labels: np.ndarray, grid: Grid):
        self.hu, self.labels, self.grid, self.h = hu, labels, grid, grid.pixel_mm

    def put(self, region, f: np.ndarray, value, code: Structure) -> None:
        blend(self.hu, self.labels, region, f, value, code)

    def ellipse(self, cx: float, cy: float, a: float, b: float, value, code: Structure, *,
                k: int | slice = slice(None), cut=None, power: float = 2.0) -> None:
        """Blend an ellipse (a superellipse for ``power`` > 2); ``cut(x, y)`` returns a fraction to remove."""
        g, h = self.grid, self.h
        sy, sx = _index_range(g.ys, cy - b - h, cy + b + h), _index_range(g.xs, cx - a - h, cx + a + h)
        if sy.stop == sy.start or sx.stop == sx.start:
            return
        x, y = g.xs[sx][None, :], g.ys[sy][:, None]
        f = _ellipse_fraction(x, y, cx, cy, a, b, h, power)
        if cut is not None:
            f = f * (1.0 - cut(x, y))
        if callable(value):
            value = value(x, y, sy, sx)
        self.put((k, sy, sx), f.astype(np.float32), value, code)


def _ellipse_fraction(x, y, cx, cy, a, b, h, power: float = 2.0):
    if power == 2.0:  # the classic expression, kept so that classic studies stay bit-identical
        rho = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    else:
        rho = outline_radius((x - cx) / a, (y - cy) / b, power)
    return np.clip(0.5 + (1.0 - rho) * min(a, b) / h, 0.0, 1.0)


def _paint_slices(p: _Painter, an: Anatomy, contrast: bool) -> None:
    """Body wall, fat, lungs, spine, ribs, sternum and table: shapes defined slice by slice."""
    g = p.grid
    c = _SliceCanvas(p.hu, p.labels, g)
    a, b = an.body_radii
    s = an.size
    # Shapes that do not change along z are painted into every slice at once.
    for lo, hi, value in ((0.0, 2.5, 250.0), (2.5, 20.0, -850.0), (20.0, 22.5, 250.0)):
        rows = _index_range(g.ys, an.table_y + lo, an.table_y + hi - 1e-6)
        c.put((slice(None), rows, slice(None)), np.ones((1, 1), np.float32), value, Structure.TABLE)
    n = an.variation.body_power if an.variation else 2.0
    c.ellipse(0, 0, a + an.fat_mm, b + an.fat_mm, an.hu_fat, Structure.FAT, power=n)
    c.ellipse(0, 0, a, b, an.hu_soft, Structure.SOFT_TISSUE, power=n)
    c.ellipse(0, 0, a - 16 * s, b - 16 * s, an.hu_fat, Structure.FAT, power=n)  # mediastinal fat
    sy = an.spine_y
    c.ellipse(0, sy + 30 * s, 21 * s, 13 * s, 450.0, Structure.BONE)  # posterior arch
    c.ellipse(0, sy + 42 * s, 4 * s, 8 * s, 450.0, Structure.BONE)  # spinous process
    c.ellipse(0, sy + 25 * s, 8 * s, 7 * s, 25.0, Structure.SOFT_TISSUE)  # spinal canal
    for k, z in enumerate(g.zs):
        # Vertebral body (cortex and marrow) or an intervertebral disc.
        if ((z - 11.0 * s) % (27.0 * s)) < 5.0 * s:
            c.ellipse(0, sy, 17 * s, 16 * s, 85.0, Structure.SOFT_TISSUE, k=k)
        else:
            c.ellipse(0, sy, 17 * s, 16 * s, 700.0, Structure.BONE, k=k)
            c.ellipse(0, sy, 15 * s, 14 * s, 230.0, Structure.BONE, k=k)
        if an.sternum[0] <= z <= an.sternum[1]:
            c.ellipse(0, -b + 9 * s, 14 * s, 6 * s, 420.0, Structure.BONE, k=k)
        if not an.lung_floor_z <= z <= an.lung_apex_z:
            continue
        # Lungs: apex, D-shaped medial border, diaphragm from below, gravity gradient, texture.
        prof = 1.0
        if z > an.lung_widest_z:
            q = (z - an.lung_widest_z) / (an.lung_apex_z - an.lung_widest_z)
            prof = float(np.sqrt(max(0.0, 1.0 - q * q)))
        tex_mm, tex_hu = an.variation.lung_texture if an.variation else (9.0, 14.0)
        texture = smooth_field(an.seed, g, tex_mm, k)
        domes = []
        for dome in an.domes:
            q = 1.0 - ((z - dome.center[2]) / (dome.radii[2] + 4.0)) ** 2
            if q > 0:
                domes.append((dome.center[0], dome.center[1], (dome.radii[0] + 4.0) * np.sqrt(q),
                              (dome.radii[1] + 4.0) * np.sqrt(q)))

        def cut(x, y, domes=domes):
            keep = 1.0 - _ellipse_fraction(x, y, 10 * s, -25 * s, 30 * s, 105 * s, p.h)
            for dcx, dcy, da, db in domes:
                keep = keep * (1.0 - _ellipse_fraction(x, y, dcx, dcy, da, db, p.h))
            return 1.0 - keep

        for side in ("R", "L"):
            cx, cy = an.lung_center[side]
            ax, ay = an.lung_radii[0] * prof, an.lung_radii[1] * prof
            if ax < p.h:
                continue

            def lung(x, y, rows, cols, cy=cy, texture=texture, tex_hu=tex_hu):
                return an.lung_hu + 35.0 * (y - cy) / an.lung_radii[1] + tex_hu * texture[rows, cols]

            c.ellipse(cx, cy, ax, ay, lung, Structure.LUNG, k=k, cut=cut, power=n)
    _paint_ribs(c, an)


def _paint_ribs(c: _SliceCanvas, an: Anatomy) -> None:
    """Ribs: each descends from the spine round to the front; a slice cuts it as a short arc."""
    g, h = c.grid, c.h
    a, b = an.body_radii
    x, y = g.xs[None, :], g.ys[:, None]
    ex, ey = np.abs(x) / a, y / b
    rho = np.sqrt(ex**2 + ey**2)
    phi = np.arctan2(ex, ey)  # 0 at the posterior midline, pi at the sternum
    depth = (1.0 - rho) * np.sqrt(a * b)  # mm inside the muscle boundary
    radial = np.clip(0.5 + np.minimum(depth - 4.0, 11.0 - depth) / h, 0.0, 1.0)
    ring = radial > 0
    phi_ring, radial_ring = phi[ring], radial[ring]
    for k, z in enumerate(g.zs):
        for z_post in an.rib_posterior_z:
            drop = z_post - z
            if not 0.0 <= drop <= an.rib_drop_mm * 0.8:
                continue
            phi_c = np.pi * (drop / an.rib_drop_mm) ** (1 / 1.3) + 0.18
            slope = an.rib_drop_mm * 1.3 / np.pi * max(phi_c / np.pi, 0.05) ** 0.3
            half = min(4.5 / slope, 0.3)
            f = radial_ring * np.clip(0.5 + (half - np.abs(phi_ring - phi_c)) * np.sqrt(a * b) / h, 0.0, 1.0)
            hu_k, lab_k = c.hu[k][ring], c.labels[k][ring]
            hu_k += (520.0 - hu_k) * f
            lab_k[f >= 0.5] = int(Structure.BONE)
            c.hu[k][ring], c.labels[k][ring] = hu_k, lab_k


def _paint_streaks(p: _Painter, an: Anatomy) -> None:
    """Beam-hardening streaks radiating from dense contrast in the superior vena cava."""
    svc = next(t for t in an.tubes if t.structure == Structure.SUPERIOR_VENA_CAVA)
    g = p.grid
    patterns: dict[tuple, np.ndarray] = {}  # the vena cava runs nearly head-foot: reuse its pattern
    for k, z in enumerate(g.zs):
        if not svc.points[:, 2].min() <= z <= svc.points[:, 2].max():
            continue
        order = np.argsort(svc.points[:, 2])
        zc, huc = svc.points[order, 2], svc.hu[order]
        hu_here = float(np.interp(z, zc, huc))
        if hu_here < 700.0:
            continue
        cx, cy = (float(np.interp(z, zc, svc.points[order, i])) for i in (0, 1))
        amp = 0.09 * (hu_here - 600.0) * (an.variation.streak_gain if an.variation else 1.0)
        box = _box(g, np.array([cx - 130, cy - 130, z - 1e-3]), np.array([cx + 130, cy + 130, z + 1e-3]))
        if box is None:
            continue
        (_, sy, sx), x, y, _ = box
        key = (sy.start, sy.stop, sx.start, sx.stop, round(cx / g.pixel_mm), round(cy / g.pixel_mm))
        if key not in patterns:
            dx, dy = x[0] - cx, y[0] - cy
            r = np.sqrt(dx**2 + dy**2)
            streak = np.zeros(r.shape, dtype=np.float32)
            for j, theta in enumerate(an.streak_angles):
                across = np.abs(dx * np.sin(theta) - dy * np.cos(theta))
                streak += (1.0 if j % 2 else -1.2) * np.exp(-((across / 1.3) ** 2))
            patterns[key] = (streak * np.exp(-r / 70.0) * (r > 12.0)).astype(np.float32)
        body = p.labels[k, sy, sx] != Structure.AIR
        p.hu[k, sy, sx] += amp * patterns[key] * body


def _paint_mixing(p: _Painter, an: Anatomy, contrast: bool) -> None:
    """Right-atrial swirl of unopacified caval blood, and flow artefacts inside the arteries."""
    if not contrast:
        return
    ra = next(e for e in an.ellipsoids if e.name == "right atrium")
    box = _box(p.grid, ra.center - ra.radii, ra.center + ra.radii)
    if box is not None:
        region, x, y, z = box
        waves = sum(np.sin(k[0] * (x - ra.center[0]) + k[1] * (y - ra.center[1]) + k[2] * (z - ra.center[2])
                           + k[3]) for k in an.swirl)
        mix = (np.clip(0.5 + 0.35 * waves, 0.0, 1.0) ** 2 * 0.65).astype(np.float32)
        inside = p.labels[region] == Structure.HEART_BLOOD
        sub = p.hu[region]
        sub += (75.0 - sub) * mix * inside
    for fa in an.flow_artefacts:
        reach = 3.0 * fa.sigma_mm
        box = _box(p.grid, fa.center - reach, fa.center + reach)
        if box is None:
            continue
        region, x, y, z = box
        r2 = (x - fa.center[0]) ** 2 + (y - fa.center[1]) ** 2 + (z - fa.center[2]) ** 2
        loss = (fa.depth * np.exp(-r2 / (2 * fa.sigma_mm**2))).astype(np.float32)
        artery = p.labels[region] == Structure.PULMONARY_ARTERY
        sub = p.hu[region]
        sub -= (sub - UNENHANCED_BLOOD_HU) * loss * artery
        p.labels[region][artery & (loss > fa.depth * 0.5)] = int(Structure.FLOW_ARTEFACT)


def _add_noise(p: _Painter, an: Anatomy) -> None:
    """Quantum noise with a short correlation length, as from a soft reconstruction kernel."""
    rng = np.random.default_rng([an.seed, 104729, len(p.grid.zs)])
    v = an.variation
    if v is not None:
        _add_styled_noise(p, v, rng)
        return
    gain = an.noise_sigma / 0.375  # the [1, 2, 1]/4 blur in two axes leaves 0.375 of the variance
    for k in range(p.hu.shape[0]):
        n = rng.standard_normal(p.hu.shape[1:], dtype=np.float32)
        n[1:-1] = 0.25 * n[:-2] + 0.5 * n[1:-1] + 0.25 * n[2:]
        n[:, 1:-1] = 0.25 * n[:, :-2] + 0.5 * n[:, 1:-1] + 0.25 * n[:, 2:]
        p.hu[k] += gain * n


def _smooth(img: np.ndarray, passes: int) -> np.ndarray:
    """``passes`` of a [1, 2, 1]/4 filter along rows and columns (edge pixels kept); returns a new array."""
    img = np.array(img, dtype=np.float32)
    for _ in range(passes):
        for view in (img, np.swapaxes(img, -1, -2)):
            inner = 0.25 * view[..., :-2] + 0.5 * view[..., 1:-1] + 0.25 * view[..., 2:]
            view[..., 1:-1] = inner
    return img


def _gaussian(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Approximate Gaussian blur in-plane: repeated [1, 2, 1] passes (each adds variance 1/2 px^2)."""
    return _smooth(img, int(round(2.0 * sigma_px**2)))


def _add_styled_noise(p: _Painter, v, rng: np.random.Generator) -> None:
    """Noise of a styled family: level, grain and distribution from the draw."""
    for k in range(p.hu.shape[0]):
        if v.noise_model == "laplace-attenuation":
            n = rng.laplace(0.0, 1.0, p.hu.shape[1:]).astype(np.float32)
            # Photon starvation: denser paths are noisier (about 1.6x in bone and dense contrast).
            level = 0.7 + 0.9 * np.clip((p.hu[k] + 1000.0) / 1700.0, 0.0, 1.0)
        else:
            n = rng.standard_normal(p.hu.shape[1:], dtype=np.float32)
            level = 1.0
        n = _smooth(n, v.noise_grain)
        n *= v.noise_sigma / max(float(n.std()), 1e-6)
        p.hu[k] += n * level


def _reconstruction(p: _Painter, an: Anatomy) -> None:
    reconstruct(p.hu, an, p.grid)


def reconstruct(hu: np.ndarray, an: Anatomy, grid: Grid) -> None:
    """A styled family's kernel (blur or sharpening) and motion ghosts at the level of the heart (in place)."""
    v = an.variation
    if v is None:
        return
    p = _Painter.__new__(_Painter)
    p.grid, p.hu = grid, hu
    if v.kernel_sigma_mm > 0:
        p.hu[:] = _gaussian(p.hu, v.kernel_sigma_mm / p.grid.pixel_mm)
    if v.sharpen > 0:
        p.hu[:] = p.hu + v.sharpen * (p.hu - _smooth(p.hu, 2))
    if v.motion > 0:
        heart = next(e for e in an.ellipsoids if e.name == "myocardium")
        rng = np.random.default_rng([an.seed, 5501])
        shift = max(1, int(round(3.0 / p.grid.pixel_mm)))
        for k, z in enumerate(p.grid.zs):
            if abs(z - heart.center[2]) < heart.radii[2] and rng.random() < v.motion:
                ghost = np.roll(p.hu[k], (int(rng.integers(-shift, shift + 1)), int(rng.integers(-shift, shift + 1))),
                                axis=(0, 1))
                p.hu[k] = 0.65 * p.hu[k] + 0.35 * ghost


def add_noise(hu: np.ndarray, anatomy: Anatomy, grid: Grid) -> None:
    """Add the patient's quantum noise to an already rendered volume on ``grid`` (in place)."""
    p = _Painter.__new__(_Painter)
    p.grid, p.hu = grid, hu
    _add_noise(p, anatomy)
    np.clip(hu, -1024.0, 3071.0, out=hu)


def render(anatomy: Anatomy, grid: Grid, *, contrast: bool = True, noise: bool = True,
           reconstruction: bool = True) -> Rendered:
    """Render a patient onto a grid.

    Parameters
    ----------
    anatomy
        The patient.
    grid
        Where the voxels are.
    contrast
        False renders an unenhanced scan: every blood pool at unenhanced blood HU, emboli invisible.
    noise
        False leaves out quantum noise (for checks of the noise-free anatomy).
    reconstruction
        False leaves out a styled family's kernel and motion (applied later to averaged slices).
    """
    p = _Painter(grid, edge_mm=anatomy.variation.edge_mm if anatomy.variation else 0.0)
    _paint_slices(p, anatomy, contrast)

    def blood(hu: float) -> float:
        return hu if contrast else UNENHANCED_BLOOD_HU

    for dome in anatomy.domes:
        p.ellipsoid(dome, anatomy.hu_soft, pad=4.0)
        p.ellipsoid(dome, dome.hu)
    for e in anatomy.ellipsoids:
        p.ellipsoid(e, blood(e.hu) if e.enhanced else e.hu)
    tubes = anatomy.tubes
    for t in tubes:
        if t.structure == Structure.PULMONARY_VEIN:
            p.tube(t, hu_override=None if contrast else UNENHANCED_BLOOD_HU, soft=True)
        elif t.structure == Structure.SOFT_TISSUE:  # oesophagus, inferior vena cava
            p.tube(t)
    for t in (t for t in tubes if t.structure == Structure.AIRWAY):
        p.tube(t, hu_override=anatomy.hu_soft, pad=1.6, structure=Structure.SOFT_TISSUE)
    for t in (t for t in tubes if t.structure == Structure.AIRWAY):
        p.tube(t)
    for t in tubes:
        if t.structure in (Structure.AORTA, Structure.SUPERIOR_VENA_CAVA):
            p.tube(t, hu_override=None if contrast else UNENHANCED_BLOOD_HU)
    for t in sorted((t for t in tubes if t.structure == Structure.PULMONARY_ARTERY), key=lambda t: -t.level):
        p.tube(t, hu_override=None if contrast else UNENHANCED_BLOOD_HU, soft=True)
    shown = np.zeros(grid.shape, dtype=np.float32)
    owner = np.zeros(grid.shape, dtype=np.uint8)
    for i, emb in enumerate(anatomy.emboli):
        _paint_embolus(p, emb, anatomy.artery(emb.artery), shown, owner, i, contrast)
    _paint_mixing(p, anatomy, contrast)
    if contrast:
        _paint_streaks(p, anatomy)
    if noise:
        _add_noise(p, anatomy)
    if reconstruction:
        _reconstruction(p, anatomy)
    np.clip(p.hu, -1024.0, 3071.0, out=p.hu)
    if not contrast:
        owner[:] = 0
    mask, voxels, slices = shown_mask(owner > 0, shown, owner, len(anatomy.emboli))
    return Rendered(p.hu, p.labels, mask, voxels, slices, shown, owner)
