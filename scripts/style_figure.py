"""Write docs/phantom-styles.png: the slice with the most embolus of four studies of each style family.

    .venv/bin/python scripts/style_figure.py [--out docs/phantom-styles.png]

Top row: the domain-randomised ``varied`` training family; bottom row: the held-out ``shifted``
family. PE window (W700/L100), embolus outline in red, field of view as the scanner drew it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from node.phantom import PhantomOptions, generate_study

TILE = 320


def tile(style: str, seed: int) -> Image.Image:
    study = generate_study(seed, pe=True, options=PhantomOptions(style=style))
    mask = study.image.mask
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    grey = np.clip((study.image.hu[k] + 250.0) / 700.0, 0, 1) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    m = mask[k]
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    rgb[edge] = [255, 40, 40]
    img = Image.fromarray(rgb.astype(np.uint8)).resize((TILE, TILE), Image.BILINEAR)
    o = study.options
    ImageDraw.Draw(img).text((4, 4), f"{style} {o.matrix}px {o.fov_mm:.0f}mm {o.thickness_mm:.1f}mm "
                             f"artery {study.anatomy.hu_artery:.0f}HU", fill=(255, 255, 0))
    return img


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/phantom-styles.png"))
    args = parser.parse_args()
    tiles = [tile(style, seed) for style in ("varied", "shifted") for seed in (1, 2, 3, 4)]
    sheet = Image.new("RGB", (4 * TILE, 2 * TILE + 18))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % 4) * TILE, (i // 4) * TILE + 18))
    ImageDraw.Draw(sheet).text((4, 3), "top: varied (training family); bottom: shifted (held-out test family); "
                               "red: embolus - synthetic, not patient data", fill=(255, 255, 255))
    sheet.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
