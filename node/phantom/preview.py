"""PNG views of a phantom study: an axial slice, a coronal reformat and the embolus-mask overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from node.phantom.study import PhantomStudy

#: Window used by radiologists reading CTPA for filling defects (centre, width).
PE_WINDOW = (100.0, 700.0)
CAPTION = "SYNTHETIC PHANTOM - not patient data"


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """HU to 8-bit grey levels through a display window."""
    return (np.clip((hu - (center - width / 2.0)) / width, 0.0, 1.0) * 255.0).astype(np.uint8)


def focus(study: PhantomStudy) -> tuple[int, int, int]:
    """Voxel (slice, row, column) at the centre of the largest embolus, else mid-chest."""
    mask = study.image.mask
    if mask.any():
        k = int(np.argmax(mask.sum(axis=(1, 2))))
        rows, cols = np.nonzero(mask[k])
        return k, int(rows.mean()), int(cols.mean())
    k = int(np.argmin(np.abs(study.grid.zs - (study.anatomy.scan_center_z + 25.0))))
    return k, mask.shape[1] // 2, mask.shape[2] // 2


def _caption(img: Image.Image, lines: list[str]) -> Image.Image:
    img = img.convert("RGB")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((6, 6 + 13 * i), line, fill=(255, 220, 0))
    return img


def axial(study: PhantomStudy, k: int | None = None) -> Image.Image:
    k = focus(study)[0] if k is None else k
    img = Image.fromarray(window(study.image.hu[k], *PE_WINDOW))
    return _caption(img, [CAPTION, f"axial slice {k + 1}/{len(study.grid.zs)}  z={study.grid.zs[k]:.1f} mm",
                          "W700 L100"])


def coronal(study: PhantomStudy, row: int | None = None) -> Image.Image:
    """Coronal reformat through the embolus, resampled to square pixels."""
    _, r, _ = focus(study)
    row = r if row is None else row
    plane = window(study.image.hu[:, row, :], *PE_WINDOW)
    spacing = abs(float(study.grid.zs[0] - study.grid.zs[-1])) / max(len(study.grid.zs) - 1, 1)
    height = max(1, round(plane.shape[0] * spacing / study.grid.pixel_mm))
    img = Image.fromarray(plane).resize((plane.shape[1], height), Image.Resampling.BILINEAR)
    return _caption(img, [CAPTION, f"coronal reformat, row {row}  y={study.grid.ys[row]:.1f} mm", "W700 L100"])


def overlay(study: PhantomStudy, k: int | None = None) -> Image.Image:
    """Axial slice with the ground-truth embolus mask in red and its outline in yellow."""
    k = focus(study)[0] if k is None else k
    grey = window(study.image.hu[k], *PE_WINDOW).astype(np.float32)
    m = study.image.mask[k]
    rgb = np.stack([grey, grey, grey], axis=-1)
    rgb[m] = 0.45 * rgb[m] + 0.55 * np.array([255.0, 0.0, 0.0])
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    rgb[edge] = [255.0, 255.0, 0.0]
    img = Image.fromarray(rgb.astype(np.uint8))
    return _caption(img, [CAPTION, f"ground-truth embolus mask, slice {k + 1}", f"{int(m.sum())} voxels"])


def zoom(img: Image.Image, center_rc: tuple[int, int], half: int, scale: int = 3) -> Image.Image:
    r, c = center_rc
    box = (max(0, c - half), max(0, r - half), min(img.width, c + half), min(img.height, r + half))
    crop = img.crop(box)
    return crop.resize((crop.width * scale, crop.height * scale), Image.Resampling.NEAREST)


def write_previews(study: PhantomStudy, out_dir: Path, prefix: str = "phantom") -> list[Path]:
    """Write axial, coronal and overlay PNGs (plus a zoomed overlay for a positive study)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    k, r, c = focus(study)
    images = {"axial": axial(study, k), "coronal": coronal(study, r), "overlay": overlay(study, k)}
    if study.pe_present:
        half = max(16, study.grid.xs.size // 10)
        images["overlay-zoom"] = zoom(overlay(study, k), (r, c), half)
    paths = []
    for name, img in images.items():
        path = out_dir / f"{prefix}-{name}.png"
        img.save(path)
        paths.append(path)
    return paths
