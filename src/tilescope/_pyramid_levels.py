"""Which levels a `tilescope.pyramid.Pyramid` has, how they are chunked, and the 2x reduce
that makes virtual levels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .slide import Slide

#: Chunk side (px) when the file reports no tiles, and the target for multiples of small tiles.
DEFAULT_CHUNK = 512
#: Stored levels more than this apart (in downsample) get virtual 2x levels in between.
MAX_LEVEL_GAP = 4.0
#: A stored level this small (px a side) is read in one call: OpenSlide reads a region whose
#: origin is not a whole level pixel (levels whose downsample is not an integer, as in most
#: SVS files) through a sub-pixel resampling that costs about 2.5x per pixel; the origin
#: (0, 0) is always whole.
WHOLE_LEVEL_PX = 2048
_MAX_TILE = 2048  # larger "tiles" (strips, whole-level JPEGs) are read in DEFAULT_CHUNK chunks


@dataclass(frozen=True)
class LevelSpec:
    """One pyramid level: `shape` (h, w) px, `chunk` (h, w) px, level-0 px per px, and the
    slide level it is read from (``None``: virtual, reduced from the level before it)."""

    shape: tuple[int, int]
    chunk: tuple[int, int]
    downsample: float
    stored: int | None


def box_reduce2(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Exact 2x box reduce of RGB uint8 `img` to `shape` (h, w): each output pixel is the mean
    of its 2 x 2 input pixels, rounded half up; an odd last row or column is repeated (so edge
    pixels average the pixels there are). Pillow's ``Image.reduce(2)`` computes exactly this,
    in C."""
    from PIL import Image

    out = np.asarray(Image.fromarray(np.ascontiguousarray(img)).reduce(2))
    if out.shape[:2] != tuple(shape):
        raise ValueError(f"2x reduce of {img.shape[:2]} gives {out.shape[:2]}, not {shape}")
    return out


def tile_size(slide: Slide, level: int) -> tuple[int, int] | None:
    """(h, w) of the file's tiles at `level`, as OpenSlide reports them, or ``None``."""
    props = slide.properties
    try:
        tw = int(props[f"openslide.level[{level}].tile-width"])
        th = int(props[f"openslide.level[{level}].tile-height"])
    except (KeyError, ValueError):
        return None
    return (th, tw) if 0 < tw <= _MAX_TILE and 0 < th <= _MAX_TILE else None


def _stored_chunk(slide: Slide, level: int, default: int) -> tuple[int, int]:
    """A whole number of the level's tiles, about `default` px a side (or `default`); a level
    of at most `WHOLE_LEVEL_PX` a side is one chunk."""
    w, h = slide.level_dimensions[level]
    if max(w, h) <= WHOLE_LEVEL_PX:
        return h, w
    tile = tile_size(slide, level)
    if tile is None:
        return default, default
    return tuple(t * max(1, round(default / t)) for t in tile)  # type: ignore[return-value]


def plan_levels(slide: Slide, min_size: int, chunk: int) -> list[LevelSpec]:
    """Stored levels, virtual 2x levels in gaps wider than `MAX_LEVEL_GAP`, then virtual 2x
    levels until the longer side is at most `min_size`."""

    def virtual(prev: LevelSpec) -> LevelSpec:
        h, w = prev.shape
        return LevelSpec(((h + 1) // 2, (w + 1) // 2), prev.chunk, prev.downsample * 2, None)

    specs: list[LevelSpec] = []
    for i, ((w, h), ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples,
                                         strict=True)):  # fmt: skip
        while specs and ds > specs[-1].downsample * MAX_LEVEL_GAP * 1.01:
            specs.append(virtual(specs[-1]))
        specs.append(LevelSpec((h, w), _stored_chunk(slide, i, chunk), ds, i))
    while max(specs[-1].shape) > max(1, min_size):
        specs.append(virtual(specs[-1]))
    return specs
