"""Where the tiles are: a validated tiling specification and the level-0 layout it gives.

A tile is `tile_px` pixels at `target_mpp` µm/px, so it covers ``tile_px * target_mpp`` µm
whatever the slide's own resolution. `TileGrid.layout` places a regular grid over the slide
and keeps the cells whose tissue fraction (from a `TissueMask`) reaches `min_tissue`. It does no
I/O beyond reading the slide's metadata.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import GridError
from .slide import Slide
from .tissue import NoTissueWarning, TissueMask

#: How tiles at the right and bottom edges are handled; recorded in provenance: they are padded
#: white past the slide, and their tissue fraction is that of their part inside the slide.
EDGE_POLICY = "pad-white-inside"
#: Tiles may enlarge the slide at most this much (level-0 px per tile px >= 0.5).
MIN_DOWNSAMPLE = 0.5
#: Grids larger than this are refused (a 200,000 px square slide at 224 px has ~800,000).
MAX_GRID_CELLS = 20_000_000
#: Tile sides allowed: at least one ViT patch (16 px); at most 4096 px (a batch of such tiles
#: is already ~800 MB of pixels, and every model here resizes tiles to 224 px).
MIN_TILE_PX, MAX_TILE_PX = 16, 4096
#: Heatmaps of this grid must fit in this many raster cells (as `tilescope.score` requires);
#: an overlap sharing a small factor with the tile size makes rasters huge.
MAX_HEATMAP_CELLS = 25_000_000


@dataclass(frozen=True, eq=False)
class TileLayout:
    """The level-0 positions of the kept tiles of a grid, in row-major order.

    Attributes
    ----------
    coords
        (N, 2) int64 level-0 (x, y) of each tile's top-left corner.
    grid_rc
        (N, 2) int32 (row, col) of each tile on the grid.
    tissue
        (N,) float32 tissue fraction of each tile.
    origin
        Level-0 (x, y) of grid cell (0, 0).
    downsample
        Level-0 pixels per target pixel.
    tile_l0, stride_l0
        Tile side and grid step in level-0 pixels (floats: the target resolution need not be
        an integer multiple of the base one).
    grid_shape
        (rows, cols) of the full grid, kept tiles or not.

    Notes
    -----
    ``coords == origin + np.rint(grid_rc[:, ::-1] * stride_l0)`` exactly.
    """

    coords: np.ndarray
    grid_rc: np.ndarray
    tissue: np.ndarray
    origin: tuple[int, int]
    downsample: float
    tile_l0: float
    stride_l0: float
    grid_shape: tuple[int, int]

    def __post_init__(self) -> None:
        coords = np.asarray(self.coords, np.int64).reshape(-1, 2)
        grid_rc = np.asarray(self.grid_rc, np.int32).reshape(-1, 2)
        tissue = np.asarray(self.tissue, np.float32).reshape(-1)
        if not len(coords) == len(grid_rc) == len(tissue):
            raise GridError(
                f"layout arrays disagree in length: coords {len(coords)}, grid_rc "
                f"{len(grid_rc)}, tissue {len(tissue)}"
            )
        object.__setattr__(self, "coords", coords)
        object.__setattr__(self, "grid_rc", grid_rc)
        object.__setattr__(self, "tissue", tissue)
        object.__setattr__(self, "origin", (int(self.origin[0]), int(self.origin[1])))
        object.__setattr__(self, "grid_shape", (int(self.grid_shape[0]), int(self.grid_shape[1])))
        for name in ("downsample", "tile_l0", "stride_l0"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def __len__(self) -> int:
        return len(self.coords)

    def to_grid(self, values: Any, fill: float = np.nan) -> np.ndarray:
        """Place one value per tile on the (rows, cols) grid; cells without a tile get `fill`.

        ``values`` may have trailing dimensions (e.g. (N, k) scores give (rows, cols, k)).
        """
        values = np.asarray(values)
        if len(values) != len(self):
            raise GridError(f"expected {len(self)} values (one per tile), got {len(values)}")
        dtype = np.result_type(values, fill)
        out = np.full(self.grid_shape + values.shape[1:], fill, dtype=dtype)
        out[self.grid_rc[:, 0], self.grid_rc[:, 1]] = values
        return out


@dataclass(frozen=True)
class TileGrid:
    """Tiling parameters, validated on creation.

    Parameters
    ----------
    target_mpp
        Resolution of the tiles in µm per pixel (0.5 is "20x").
    tile_px
        Tile side in pixels at `target_mpp`.
    overlap_px
        Overlap of neighbouring tiles in pixels at `target_mpp` (0 <= overlap < tile_px).
    min_tissue
        Keep a tile if at least this fraction of its area is tissue (0 keeps every cell).

    Examples
    --------
    >>> grid = TileGrid(target_mpp=0.5, tile_px=224)
    >>> grid.stride_px
    224
    >>> layout = grid.layout(slide, tissue_mask(slide))  # doctest: +SKIP
    """

    target_mpp: float = 0.5
    tile_px: int = 224
    overlap_px: int = 0
    min_tissue: float = 0.25

    def __post_init__(self) -> None:
        if not _is_real(self.target_mpp) or not (
            math.isfinite(self.target_mpp) and self.target_mpp > 0
        ):
            raise GridError(
                f"target_mpp must be a positive number of µm per pixel (e.g. 0.5 for 20x), "
                f"got {self.target_mpp!r}"
            )
        if not _is_int(self.tile_px) or not MIN_TILE_PX <= self.tile_px <= MAX_TILE_PX:
            raise GridError(
                f"tile_px must be a whole number of pixels from {MIN_TILE_PX} to {MAX_TILE_PX} "
                f"(224 is the models' input size), got {self.tile_px!r}"
            )
        if not _is_int(self.overlap_px) or not 0 <= self.overlap_px < self.tile_px:
            raise GridError(
                f"overlap_px must be an integer with 0 <= overlap_px < tile_px "
                f"({self.tile_px}), got {self.overlap_px!r}"
            )
        if not _is_real(self.min_tissue) or not 0 <= self.min_tissue <= 1:
            raise GridError(
                f"min_tissue must be a fraction between 0 and 1, got {self.min_tissue!r}"
            )
        object.__setattr__(self, "target_mpp", float(self.target_mpp))
        object.__setattr__(self, "tile_px", int(self.tile_px))
        object.__setattr__(self, "overlap_px", int(self.overlap_px))
        object.__setattr__(self, "min_tissue", float(self.min_tissue))

    @property
    def stride_px(self) -> int:
        """Grid step in pixels at `target_mpp`."""
        return self.tile_px - self.overlap_px

    @property
    def tile_um(self) -> float:
        """Physical side of a tile in µm."""
        return self.tile_px * self.target_mpp

    def as_dict(self) -> dict[str, Any]:
        """Parameters for provenance (JSON-serialisable)."""
        return {
            "target_mpp": self.target_mpp,
            "tile_px": self.tile_px,
            "overlap_px": self.overlap_px,
            "stride_px": self.stride_px,
            "min_tissue": self.min_tissue,
            "edge_policy": EDGE_POLICY,
        }

    def geometry(self, slide: Slide) -> GridGeometry:
        """Where the grid lies on `slide` (no tissue needed): downsample, tile and stride in
        level-0 px, origin and grid shape. Validates that the grid is usable.

        Raises
        ------
        tilescope.errors.MissingMppError
            If the slide's pixel size is unknown and was not given when opening it.
        GridError
            Tiles would enlarge the slide more than 2x, the slide would be less than one pixel,
            the grid is too large, or its heatmaps would be (an overlap sharing too small a
            factor with the tile size).
        """
        ds = slide.downsample_for_mpp(self.target_mpp)  # MissingMppError if unknown
        if ds < MIN_DOWNSAMPLE:
            raise GridError(
                f"{slide.name}: tiles at {self.target_mpp} µm/px would enlarge the slide's "
                f"{slide.mpp:.4g} µm/px pixels {1 / ds:.1f} times; use a target of at least "
                f"{slide.mpp * MIN_DOWNSAMPLE:.3g} µm/px (or check the slide's pixel size)"
            )
        width, height = slide.dimensions
        if min(width, height) / ds < 1:
            raise GridError(
                f"{slide.name}: at {self.target_mpp:g} µm/px the slide "
                f"({width * slide.mpp:.0f} x {height * slide.mpp:.0f} µm) is less than one pixel; "
                "use a target mpp near the scan's (e.g. 0.5)"
            )
        tile_l0 = self.tile_px * ds
        stride_l0 = self.stride_px * ds
        cols, rows = _count(width, tile_l0, stride_l0), _count(height, tile_l0, stride_l0)
        if rows * cols > MAX_GRID_CELLS:
            raise GridError(
                f"{slide.name}: {rows} x {cols} grid cells is more than {MAX_GRID_CELLS:,}; "
                "use a larger tile, less overlap or a coarser target mpp"
            )
        g = math.gcd(self.tile_px, self.stride_px)
        a, s = self.tile_px // g, self.stride_px // g
        cells = ((rows - 1) * s + a) * ((cols - 1) * s + a)
        if cells > MAX_HEATMAP_CELLS:
            raise GridError(
                f"{slide.name}: with tiles of {self.tile_px} px and an overlap of "
                f"{self.overlap_px} px, heatmaps would need {cells:,} cells (the two share only "
                f"a factor {g}); pick an overlap with a large common factor, e.g. 0, 32, 56 or "
                f"112 px for 224 px tiles"
            )
        return GridGeometry(
            origin=(0, 0),
            downsample=ds,
            tile_l0=tile_l0,
            stride_l0=stride_l0,
            grid_shape=(rows, cols),
        )

    def layout(self, slide: Slide, mask: TissueMask | None) -> TileLayout:
        """The kept tiles of this grid on `slide`, in row-major order.

        Parameters
        ----------
        slide
            Used for its dimensions and pixel size only (no pixels are read).
        mask
            Tissue mask of the slide; ``None`` keeps every grid cell (tissue reported as 1).

        Returns
        -------
        TileLayout

        Raises
        ------
        tilescope.errors.MissingMppError, GridError
            As `geometry`.

        Notes
        -----
        The grid starts at level-0 (0, 0) and has as many columns (rows) as needed for the
        tiles to cover the whole width (height): tiles at the right and bottom edges may
        extend past the slide, and those parts read as white glass (``EDGE_POLICY``). Their
        tissue fraction is measured over the part inside the slide, so the last strip of
        tissue is tiled like the rest. A slide smaller than one tile gets a 1 x 1 grid; its
        single tile is padded white and kept if tissue covers `min_tissue` of the slide.
        """
        geo = self.geometry(slide)
        rows, cols = geo.grid_shape
        tile_l0 = geo.tile_l0
        xs = geo.origin[0] + np.rint(np.arange(cols) * geo.stride_l0).astype(np.int64)
        ys = geo.origin[1] + np.rint(np.arange(rows) * geo.stride_l0).astype(np.int64)
        if mask is None:
            frac = np.ones((rows, cols), np.float32)
        else:
            _check_mask(slide, mask)
            whole = mask.box_fraction(xs[None, :], ys[:, None], tile_l0).astype(np.float64)
            width, height = slide.dimensions
            inside_w = np.clip(width - xs, 0, tile_l0) / tile_l0
            inside_h = np.clip(height - ys, 0, tile_l0) / tile_l0
            inside = inside_h[:, None] * inside_w[None, :]
            frac = np.clip(whole / np.maximum(inside, 1e-12), 0.0, 1.0).astype(np.float32)
        keep = frac >= np.float32(self.min_tissue)
        r, c = np.nonzero(keep)  # row-major
        if not len(r):
            warnings.warn(
                f"{slide.name}: no tiles kept ({self.empty_reason(mask)}); lower `min_tissue` "
                "of the TileGrid if the slide does hold tissue.",
                NoTissueWarning,
                stacklevel=2,
            )
        return TileLayout(
            coords=np.stack([xs[c], ys[r]], axis=1),
            grid_rc=np.stack([r, c], axis=1).astype(np.int32),
            tissue=frac[r, c],
            origin=geo.origin,
            downsample=geo.downsample,
            tile_l0=tile_l0,
            stride_l0=geo.stride_l0,
            grid_shape=geo.grid_shape,
        )

    def empty_reason(self, mask: TissueMask | None) -> str:
        """Why a layout of this grid kept no tile (for messages)."""
        if mask is not None and mask.is_empty:
            return "the tissue detector found no tissue on the slide"
        return f"no tile has at least {self.min_tissue:.0%} tissue"


@dataclass(frozen=True)
class GridGeometry:
    """Where a grid lies on a slide: see `TileLayout` for the fields."""

    origin: tuple[int, int]
    downsample: float
    tile_l0: float
    stride_l0: float
    grid_shape: tuple[int, int]

    def as_dict(self) -> dict[str, Any]:
        """The signature's ``layout`` entry (JSON-serialisable)."""
        return {
            "origin": [int(v) for v in self.origin],
            "downsample": float(self.downsample),
            "tile_l0": float(self.tile_l0),
            "stride_l0": float(self.stride_l0),
            "grid_shape": [int(v) for v in self.grid_shape],
        }


def _check_mask(slide: Slide, mask: TissueMask) -> None:
    """The mask must span this slide (to within two mask pixels)."""
    h, w = mask.shape
    width, height = slide.dimensions
    ds = mask.downsample
    if abs(w * ds - width) > 2 * ds or abs(h * ds - height) > 2 * ds:
        raise GridError(
            f"{slide.name}: the tissue mask spans {w * ds:.0f} x {h * ds:.0f} level-0 px but "
            f"the slide is {width} x {height}; compute the mask on this slide"
        )


def _count(extent: int, tile_l0: float, stride_l0: float) -> int:
    """Grid positions needed along one axis for tiles to cover `extent` level-0 pixels."""
    if extent <= tile_l0:
        return 1
    # small tolerance so float noise does not add a column that starts at the slide's edge
    return 1 + math.ceil((extent - tile_l0) / stride_l0 - 1e-9)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
