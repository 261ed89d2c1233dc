"""Which tiles a set of regions touches: for embedding only part of a slide.

Regions are in level-0 pixels: boxes ``(x, y, w, h)`` and/or shapely polygons (QuPath
annotations read by `tilescope.qupath.annotation_regions`, shapes drawn in napari). A tile
is selected when its square ``[x, x + tile_l0) x [y, y + tile_l0)`` shares area with a region:
a region smaller than a tile still selects the tiles it overlaps, a tile inside a polygon's
hole is not selected, and a tile that only touches a region's outline is not either.

Examples
--------
>>> import numpy as np
>>> coords = np.array([[0, 0], [448, 0], [896, 0]])
>>> tiles_overlapping(coords, 448.0, [(500, 100, 10, 10)])
array([1])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .errors import TilescopeError

#: A region: a level-0 box (x, y, width, height) or a shapely geometry with an area.
Region = Sequence[float] | Any


def as_geometries(regions: Iterable[Region]) -> list[Any]:
    """Shapely geometries of `regions` (boxes become rectangles); checks boxes and rejects
    geometries without an area (points, lines)."""
    import shapely
    from shapely.geometry.base import BaseGeometry

    out: list[Any] = []
    for region in regions:
        if isinstance(region, BaseGeometry):
            if region.is_empty:
                continue
            if region.area <= 0:
                raise TilescopeError(
                    f"region {region.geom_type} has no area; give boxes or polygons "
                    "(level-0 pixels)"
                )
            out.append(region)
            continue
        try:
            x, y, w, h = (float(v) for v in region)
        except (TypeError, ValueError):
            raise TilescopeError(
                f"region {region!r}: a region is a box (x, y, width, height) in level-0 "
                "pixels or a shapely polygon"
            ) from None
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            raise TilescopeError(
                f"region {region!r}: x, y, width, height must be finite, with a positive width "
                "and height (level-0 pixels)"
            )
        out.append(shapely.box(x, y, x + w, y + h))
    return out


def tiles_overlapping(coords: np.ndarray, tile_l0: float, regions: Iterable[Region]) -> np.ndarray:
    """Sorted int64 indices of the tiles that share area with any of `regions`.

    Parameters
    ----------
    coords
        (N, 2) level-0 (x, y) of each tile's top-left corner (a store's or layout's coords).
    tile_l0
        Tile side in level-0 pixels.
    regions
        Boxes ``(x, y, w, h)`` and/or shapely polygons, level-0 pixels.
    """
    import shapely

    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    t = float(tile_l0)
    hit = np.zeros(len(xy), dtype=bool)
    for geom in as_geometries(regions):
        x0, y0, x1, y1 = geom.bounds
        cand = np.flatnonzero(
            ~hit & (xy[:, 0] < x1) & (xy[:, 0] + t > x0) & (xy[:, 1] < y1) & (xy[:, 1] + t > y0)
        )
        if not len(cand):
            continue
        boxes = shapely.box(xy[cand, 0], xy[cand, 1], xy[cand, 0] + t, xy[cand, 1] + t)
        shapely.prepare(geom)
        # interiors intersect: shared area, not just a shared edge or corner
        hit[cand] = shapely.relate_pattern(geom, boxes, "T********")
    return np.flatnonzero(hit).astype(np.int64)


def tiles_centred_in(
    coords: np.ndarray, tile_l0: float, geom: Any, eligible: np.ndarray | None = None
) -> np.ndarray:
    """Sorted indices of the eligible tiles whose centre lies inside the shapely `geom`
    (holes cut out; a centre on an outline does not count). A region that holds no eligible
    centre (one smaller than a tile) selects the eligible tiles it overlaps most, by area
    (all of them on a tie), as `tilescope.search.tiles_in_shapes` does for plain polygons."""
    import shapely

    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    t = float(tile_l0)
    ok = np.ones(len(xy), bool) if eligible is None else np.asarray(eligible, bool).reshape(-1)
    if geom is None or geom.is_empty:
        return np.zeros(0, np.int64)
    x0, y0, x1, y1 = geom.bounds
    centres = xy + t / 2
    cand = np.flatnonzero(ok & (centres[:, 0] > x0) & (centres[:, 0] < x1)
                          & (centres[:, 1] > y0) & (centres[:, 1] < y1))  # fmt: skip
    shapely.prepare(geom)
    inside = cand[shapely.contains_xy(geom, centres[cand, 0], centres[cand, 1])]
    if len(inside):
        return inside.astype(np.int64)
    cand = np.flatnonzero(ok & (xy[:, 0] < x1) & (xy[:, 0] + t > x0)
                          & (xy[:, 1] < y1) & (xy[:, 1] + t > y0))  # fmt: skip
    if not len(cand):
        return cand.astype(np.int64)
    boxes = shapely.box(xy[cand, 0], xy[cand, 1], xy[cand, 0] + t, xy[cand, 1] + t)
    areas = shapely.area(shapely.intersection(boxes, geom))
    best = float(areas.max())
    if not best > 0:
        return cand[:0].astype(np.int64)
    return cand[areas >= best * (1 - 1e-9)].astype(np.int64)
