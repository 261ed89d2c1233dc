"""Heatmap rasters: one value per tile drawn so that each tile's cells cover exactly its area.

`TileGeometry` says where a store's tiles are (grid row/col, tile and stride sizes, level-0
origin); `heatmap` turns one value per tile into a `Heatmap` (a float raster, NaN where no tile
is, averaged where tiles overlap), which `Heatmap.world_scale_translate` places in micrometres.
`winning_class` gives the class with the highest value per raster cell. numpy only (scipy for
the optional smoothing); no napari, no Qt.

Live views (heatmaps updated while a slide is being embedded) call `heatmap` again with the
new rows: it is a few vectorised passes over the raster, cheap next to embedding a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import GridError

__all__ = ["MAX_CELLS", "Heatmap", "TileGeometry", "heatmap", "winning_class"]

#: Largest heatmap raster (cells) before `heatmap` refuses; about 200 MB of float64 work arrays.
MAX_CELLS = 25_000_000


# -- heatmaps -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileGeometry:
    """Where tiles are: grid (row, col) per tile, grid shape and tile/stride sizes.

    ``tile_px``/``stride_px`` are in target pixels, ``downsample`` is level-0 px per target px,
    ``origin_l0`` is the level-0 (x, y) of grid cell (0, 0).
    """

    grid_rc: np.ndarray
    grid_shape: tuple[int, int]
    tile_px: int
    stride_px: int
    downsample: float
    origin_l0: tuple[float, float]

    @classmethod
    def from_store(cls, store: Any) -> TileGeometry:
        """From an `EmbeddingStore` (its grid_rc and signature's grid and layout)."""
        sig = store.signature
        grid, lay = sig["grid"], sig["layout"]
        return cls.from_layout(
            lay,
            grid_rc=store.grid_rc,
            tile_px=grid["tile_px"],
            overlap_px=grid.get("overlap_px", 0),
        )

    @classmethod
    def from_layout(
        cls, layout: Any, *, tile_px: int, overlap_px: int = 0, grid_rc: Any = None
    ) -> TileGeometry:
        """From a tile layout (object or mapping) and the grid's tile_px and overlap_px."""
        get: Callable[[str], Any] = (
            layout.get if isinstance(layout, Mapping) else lambda k: getattr(layout, k)
        )
        rc = get("grid_rc") if grid_rc is None else grid_rc
        ox, oy = get("origin")
        rows, cols = get("grid_shape")
        return cls(
            np.asarray(rc, np.int64).reshape(-1, 2),
            (int(rows), int(cols)),
            int(tile_px),
            int(tile_px) - int(overlap_px),
            float(get("downsample")),
            (float(ox), float(oy)),
        )


@dataclass(frozen=True)
class Heatmap:
    """A raster of per-tile values; cell (i, j) covers level-0 pixels
    ``[origin_x + j * cell_l0, +cell_l0) x [origin_y + i * cell_l0, +cell_l0)``; NaN = no tile.
    """

    raster: np.ndarray
    cell_l0: float
    origin_l0: tuple[float, float]

    def world_scale_translate(
        self, level0_mpp: float
    ) -> tuple[tuple[float, float], tuple[float, float]]:
        """napari ``scale`` and ``translate`` (row, col order, micrometres) for the raster.

        napari places pixel centres at ``translate + i * scale``; a slide layer with
        ``scale = mpp`` has level-0 pixel x centred at ``x * mpp``. A cell covering level-0
        pixels ``[a, a + C)`` is centred at ``a + C/2 - 0.5`` level-0 px, so
        ``scale = C * mpp`` and ``translate = (origin + C/2 - 0.5) * mpp`` per axis (y first).
        """
        c, (ox, oy) = self.cell_l0, self.origin_l0
        shift = c / 2 - 0.5
        return (c * level0_mpp, c * level0_mpp), (
            (oy + shift) * level0_mpp,
            (ox + shift) * level0_mpp,
        )


def heatmap(values: np.ndarray, geometry: TileGeometry, *, smooth_sigma: float = 0.0) -> Heatmap:
    """Rasterise one value per tile so that tile i's cells cover exactly tile i's area.

    A raster cell is ``g = gcd(tile_px, stride_px)`` target pixels (``g * downsample`` level-0
    px); tile (r, c) covers cells ``[r*s, r*s + a) x [c*s, c*s + a)`` with ``a = tile_px / g``,
    ``s = stride_px / g``. Where tiles overlap their values are averaged; cells no tile covers
    (and non-finite values) are NaN. ``smooth_sigma`` (in tile strides) applies a Gaussian
    that ignores NaN (normalised convolution) and keeps uncovered cells NaN.
    """
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    rc = np.asarray(geometry.grid_rc, dtype=np.int64).reshape(-1, 2)
    rows, cols = geometry.grid_shape
    if len(vals) != len(rc):
        raise GridError(f"{len(vals)} values for {len(rc)} tiles")
    if len(rc) and (rc.min() < 0 or rc[:, 0].max() >= rows or rc[:, 1].max() >= cols):
        raise GridError(f"grid_rc lies outside the grid shape {geometry.grid_shape}")
    g = math.gcd(geometry.tile_px, geometry.stride_px)
    a, s = geometry.tile_px // g, geometry.stride_px // g
    h, w = ((rows - 1) * s + a, (cols - 1) * s + a) if rows and cols else (0, 0)
    if h * w > MAX_CELLS:
        raise GridError(
            f"heatmap would need {h}x{w} cells because tile {geometry.tile_px} px and stride "
            f"{geometry.stride_px} px share only a factor {g}; pick an overlap that keeps a "
            "large common factor (e.g. 0, 32, 56 or 112 px for 224 px tiles)"
        )
    ok = np.isfinite(vals)
    total, count = np.zeros((h, w)), np.zeros((h, w))
    np.add.at(total, (rc[ok, 0] * s, rc[ok, 1] * s), vals[ok])
    np.add.at(count, (rc[ok, 0] * s, rc[ok, 1] * s), 1.0)
    total, count = _box(_box(total, a, 0), a, 1), _box(_box(count, a, 0), a, 1)
    covered = count > 0.5
    raster = np.full((h, w), np.nan)
    raster[covered] = total[covered] / count[covered]
    if smooth_sigma > 0 and covered.any():
        from scipy.ndimage import gaussian_filter

        sigma = smooth_sigma * s
        num = gaussian_filter(np.where(covered, raster, 0.0), sigma, mode="constant")
        den = gaussian_filter(covered.astype(np.float64), sigma, mode="constant")
        raster[covered] = num[covered] / den[covered]
    return Heatmap(raster.astype(np.float32), g * geometry.downsample, geometry.origin_l0)


def _box(x: np.ndarray, a: int, axis: int) -> np.ndarray:
    """out[i] = sum(x[i - a + 1 .. i]) along `axis` (a causal box sum of width a)."""
    if a == 1 or x.size == 0:
        return x
    c = np.cumsum(x, axis=axis)
    out = c.copy()
    idx = [slice(None)] * 2
    idx[axis] = slice(a, None)
    src = [slice(None)] * 2
    src[axis] = slice(None, -a)
    out[tuple(idx)] -= c[tuple(src)]
    return out


def winning_class(rasters: Sequence[Heatmap]) -> np.ndarray:
    """Per raster cell, ``c + 1`` for the class c whose raster is highest there; 0 where any
    class has no value (no tile). uint8 for fewer than 255 classes, else uint16."""
    stack = np.stack([np.asarray(h.raster) for h in rasters])
    covered = np.all(np.isfinite(stack), axis=0)
    winner = np.argmax(np.where(np.isfinite(stack), stack, -np.inf), axis=0) + 1
    return np.where(covered, winner, 0).astype(np.uint8 if len(rasters) < 255 else np.uint16)
