"""Block reads: how the tiles of a layout are fetched from a slide, in few large reads.

Neighbouring tiles at the read level are read with one `read_region` over their union, then
cut in memory and scaled with the kernels of `tilescope._resample`. A tile cut from a block is
byte-identical to the same tile read on its own (`Slide.read_scaled`): the block is read at
whole level pixels, and each tile is cropped before it is scaled.

Blocks are square groups of ``k x k`` grid cells, with ``k`` chosen so that a block spans a
whole number of the slide's own TIFF tiles at the read level where OpenSlide reports their
size (``openslide.level[n].tile-width``), close to `BLOCK_PX` level pixels: each stored tile is
then decoded once. Where tiles do not start on whole level pixels (a pyramid level whose
downsample is not an integer), OpenSlide interpolates each read's sub-pixel offset, so a block
could not reproduce the tile; such tiles are read one by one (still grouped in blocks for the
schedule).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._resample import rgb_array, rgb_image, scale_box
from .errors import RegionReadError

#: Target block side in level pixels (measured on JPEG-tiled slides: reading 1792 px costs
#: per pixel about what 448 px reads do, with one call instead of 16, and each stored tile
#: is decoded once; see benchmarks/bench_pipeline.py).
BLOCK_PX = 2048
#: A block is read in one piece when its tiles cover at least this fraction of their
#: bounding box; otherwise row by row, or tile by tile (sparse tissue).
MIN_FILL = 0.5

#: One read: level-0 location, level size (w, h), and its tiles: (index, x and y offset in
#: level pixels from the read's corner, the tile's own level-0 x and y).
Read = tuple[tuple[int, int], tuple[int, int], list[tuple[int, int, int, int, int]]]


@dataclass(frozen=True)
class ReadPlan:
    """How the tiles of one layout are read from one slide (picklable, for reader workers)."""

    level: int
    level_downsample: float
    read_px: tuple[int, int]  # level pixels read per tile (w, h)
    tile_px: int
    aligned: bool  # every tile starts on a whole level pixel: block reads are exact
    block_cells: int  # grid cells per block side
    stride_level: float  # grid step in level pixels

    @classmethod
    def for_layout(cls, slide: Any, layout: Any, tile_px: int) -> ReadPlan:
        level, read_px = slide.scaled_read_size((tile_px, tile_px), layout.downsample)
        lds = float(slide.level_downsamples[level])
        pos = np.asarray(layout.coords, np.float64) / lds
        aligned = bool(np.all(pos == np.floor(pos)))
        stride = float(layout.stride_l0) / lds
        tile_w = _tiff_tile_px(slide, level)
        return cls(level, lds, (int(read_px[0]), int(read_px[1])), int(tile_px), aligned,
                   _block_cells(stride, tile_w), stride)  # fmt: skip

    @property
    def scales(self) -> bool:
        return self.read_px != (self.tile_px, self.tile_px)

    def groups(self, layout: Any) -> np.ndarray:
        """Block id of every tile of `layout` (blocks numbered in grid order)."""
        k = self.block_cells
        rc = np.asarray(layout.grid_rc, np.int64)
        cols = -(-int(layout.grid_shape[1]) // k)
        return (rc[:, 0] // k) * cols + rc[:, 1] // k

    def reads(self, tiles: np.ndarray, coords: np.ndarray, grid_rc: np.ndarray) -> list[Read]:
        """The reads that fetch `tiles` (indices; `coords`, `grid_rc` are theirs)."""
        lw, lh = self.read_px
        pos = np.rint(np.asarray(coords, np.float64) / self.level_downsample).astype(np.int64)
        if not self.aligned or len(tiles) == 1:
            return [self._read(tiles[i : i + 1], coords[i : i + 1], pos[i : i + 1])
                    for i in range(len(tiles))]  # fmt: skip
        if _fill(pos, lw, lh) >= MIN_FILL:
            return [self._read(tiles, coords, pos)]
        out: list[Read] = []
        for row in np.unique(grid_rc[:, 0]):
            sel = np.flatnonzero(grid_rc[:, 0] == row)
            if len(sel) > 1 and _fill(pos[sel], lw, lh) >= MIN_FILL:
                out.append(self._read(tiles[sel], coords[sel], pos[sel]))
            else:
                out.extend(self._read(tiles[i : i + 1], coords[i : i + 1], pos[i : i + 1])
                           for i in sel)  # fmt: skip
        return out

    def _read(self, tiles: np.ndarray, coords: np.ndarray, pos: np.ndarray) -> Read:
        lw, lh = self.read_px
        i, j = int(np.argmin(pos[:, 0])), int(np.argmin(pos[:, 1]))
        x0, y0 = int(coords[i, 0]), int(coords[j, 1])  # level-0 corner on whole level pixels
        px0, py0 = int(pos[i, 0]), int(pos[j, 1])
        w = int(pos[:, 0].max()) - px0 + lw
        h = int(pos[:, 1].max()) - py0 + lh
        offs = [(int(t), int(p[0]) - px0, int(p[1]) - py0, int(c[0]), int(c[1]))
                for t, p, c in zip(tiles, pos, coords, strict=True)]  # fmt: skip
        return (x0, y0), (w, h), offs


def _fill(pos: np.ndarray, lw: int, lh: int) -> float:
    """Tile area / bounding-box area of tiles at level positions `pos` (overlaps counted once
    per tile, so an overlapping grid may exceed 1)."""
    w = pos[:, 0].max() - pos[:, 0].min() + lw
    h = pos[:, 1].max() - pos[:, 1].min() + lh
    return float(len(pos) * lw * lh) / float(w * h)


def _tiff_tile_px(slide: Any, level: int) -> int | None:
    props = slide.properties
    try:
        return int(props[f"openslide.level[{level}].tile-width"])
    except (KeyError, ValueError):
        return None


def _block_cells(stride: float, tile_w: int | None) -> int:
    """Grid cells per block side: a block of ``k * stride`` level px that spans whole stored
    tiles where possible, as close to `BLOCK_PX` as allowed (at most 2 x `BLOCK_PX`)."""
    if stride <= 0:
        return 1
    kmax = max(1, math.floor(2 * BLOCK_PX / stride))
    if tile_w:
        fits = [k for k in range(1, kmax + 1)
                if abs(k * stride / tile_w - round(k * stride / tile_w)) < 1e-6]  # fmt: skip
        if fits:
            return min(fits, key=lambda k: abs(k * stride - BLOCK_PX))
    return max(1, min(kmax, round(BLOCK_PX / stride)))


def read_tiles(
    slide: Any, plan: ReadPlan, reads: list[Read], emit: Callable[[int, np.ndarray], None]
) -> list[tuple[int, str]]:
    """Read `reads` and call ``emit(tile, rgb)`` for every tile; returns the tiles that failed
    to decode as ``(tile, message)``. A block that fails is read again tile by tile, so only
    the tiles over a damaged part of the file fail."""
    failed: list[tuple[int, str]] = []
    lw, lh = plan.read_px
    for (x0, y0), size, offs in reads:
        try:
            region = slide.read_region_raw((x0, y0), plan.level, size, out=_buffer(size))
        except RegionReadError as exc:
            if len(offs) == 1:
                failed.append((offs[0][0], str(exc)))
                continue
            singles: list[Read] = [((x, y), (lw, lh), [(t, 0, 0, x, y)]) for t, _, _, x, y in offs]
            failed.extend(read_tiles(slide, plan, singles, emit))
            continue
        _cut(region, plan, offs, emit)
    return failed


_local = threading.local()


def _buffer(size: tuple[int, int]) -> np.ndarray:
    """This thread's paint buffer, grown as needed: no fresh pages for every block."""
    need = int(size[0]) * int(size[1])
    buf: np.ndarray | None = getattr(_local, "buf", None)
    if buf is None or buf.size < need:
        buf = _local.buf = np.zeros(need, np.uint32)
    return buf


def _cut(region: Any, plan: ReadPlan, offs: list[tuple[int, int, int, int, int]],
         emit: Callable[[int, np.ndarray], None]) -> None:  # fmt: skip
    """Convert and scale each tile on its own (tile-sized buffers stay in cache; converting
    a whole 2048 px block first costs about 0.6 ms more per tile)."""
    lw, lh = plan.read_px
    size = (plan.tile_px, plan.tile_px)
    for t, ox, oy, _, _ in offs:
        tile = region.tile(ox, oy, lw, lh)
        if not plan.scales:
            emit(t, rgb_array(tile))
        else:
            emit(t, scale_box(rgb_image(tile), (0, 0, lw, lh), size))
