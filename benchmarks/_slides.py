"""The benchmark slide of bench_pipeline.py and bench_embed.py, written once and cached.

A JPEG-compressed (YCbCr 4:2:0, quality 90, 256 px tiles, as `tilescope.synthetic` writes),
pyramidal (downsamples 1, 4, 16, 64) generic TIFF at 0.25 µm/px, with large elliptic pieces
of tissue. Rendering every 256 px tile of a 57,000 px slide from `SyntheticSlide.render`
takes half an hour here, so levels 0 and 1 are assembled from 32 rendered tissue tiles (and
one glass tile) encoded once; the coarse levels, which tissue detection reads, are rendered
properly. Decoding costs what it costs on any JPEG-tiled slide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tilescope.synthetic import TILE, Blob, SyntheticSlide

MPP = 0.25
#: Side of the base slide in level-0 px: about 2,300 tissue tiles of 224 px at 0.5 µm/px.
BASE_PX = 28_672
_VARIANTS = 32
_JPEG = {"level": 90, "subsampling": (2, 2), "colorspace": "RGB", "outcolorspace": "YCBCR"}


def bench_spec(scale: int = 1) -> SyntheticSlide:
    """A square slide `scale` times the base side (``scale=2``: 4x the area and tiles)."""
    side = BASE_PX * scale
    um = side * MPP
    blobs = []
    for cy in (0.27, 0.73):
        for cx in (0.27, 0.73):  # 2 x 2 per base area, repeated
            for sy in range(scale):
                for sx in range(scale):
                    blobs.append(Blob(cx=(sx + cx) * um / scale, cy=(sy + cy) * um / scale,
                                      rx=0.21 * um / scale, ry=0.22 * um / scale))  # fmt: skip
    return SyntheticSlide(side, side, mpp=MPP, blobs=tuple(blobs), n_levels=4, level_factor=4)


def bench_slide(cache: Path, scale: int = 1) -> Path:
    """The benchmark slide (`bench_spec`), written into `cache` once."""
    spec = bench_spec(scale)
    path = cache / f"bench_{spec.width}px_mpp{MPP}_v1.tif"
    if path.exists():
        return path
    import imagecodecs
    import tifffile

    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    variants = []
    for _ in range(_VARIANTS):  # rendered tissue at random places inside the first blob
        b = spec.blobs[0]
        x = (b.cx + rng.uniform(-0.4, 0.4) * b.rx) / spec.mpp
        y = (b.cy + rng.uniform(-0.4, 0.4) * b.ry) / spec.mpp
        variants.append(imagecodecs.jpeg8_encode(spec.region(x, y, TILE, TILE, spec.mpp), **_JPEG))
    glass = imagecodecs.jpeg8_encode(np.full((TILE, TILE, 3), spec.background, np.uint8), **_JPEG)

    def tiles(level: int) -> Any:
        ds = spec.level_factor**level
        h, w = spec.level_shapes()[level]
        for ty in range(0, h, TILE):
            cy = (ty + TILE / 2) * ds * spec.mpp
            xs = (np.arange(0, w, TILE) + TILE / 2) * ds * spec.mpp
            inside = spec.tissue_truth(xs, np.full_like(xs, cy))
            for k, t in enumerate(inside):
                yield variants[(k * 7 + ty // TILE * 13) % _VARIANTS] if t else glass

    tmp = path.with_suffix(".partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for level, (h, w) in enumerate(spec.level_shapes()):
            res = 1e4 / (spec.mpp * spec.level_factor**level)
            data = tiles(level) if level < 2 else spec._tiles(level)
            tw.write(data, shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 90},
                     subfiletype=0 if level == 0 else 1, resolution=(res, res),
                     resolutionunit="CENTIMETER", metadata=None)  # fmt: skip
    tmp.rename(path)
    return path
