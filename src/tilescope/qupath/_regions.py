"""Regions from QuPath objects, and the tiles whose centre lies in them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from os import PathLike

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from ._read import AnnotationError, QuPathObject, read_geojson


def regions_by_class(
    objects: Sequence[QuPathObject],
    *,
    classes: Sequence[str] | None = None,
    object_types: Sequence[str] = ("annotation",),
    include_unclassified: bool = False,
) -> dict[str | None, list[BaseGeometry]]:
    """Polygonal regions of `objects` grouped by class name (in order of first appearance).

    Points and lines enclose no area and are left out. `classes` keeps only those classes
    (names as QuPath shows them, e.g. "Tumor" or "Tumor: Positive"); unclassified objects
    are under the key ``None`` when `include_unclassified`.

    Raises
    ------
    AnnotationError
        A class in `classes` has no polygonal object (the message lists the classes found).
    """
    out: dict[str | None, list[BaseGeometry]] = {}
    for obj in objects:
        area = obj.area
        if area is None or obj.object_type not in object_types:
            continue
        if obj.classification is None and not include_unclassified:
            continue
        out.setdefault(obj.classification, []).append(area)
    if classes is not None:
        missing = [c for c in classes if c not in out]
        if missing:
            have = ", ".join(repr(c) for c in out if c is not None) or "none"
            raise AnnotationError(
                f"no {', '.join(object_types)} polygons of class {', '.join(map(repr, missing))}"
                f" (classes with polygons: {have})"
            )
        out = {c: out[c] for c in classes}
    return out


def tiles_in_regions(
    coords: np.ndarray, tile_l0: float, regions: Iterable[BaseGeometry]
) -> np.ndarray:
    """Indices (ascending) of tiles whose centre lies inside any region (not in a hole).

    `coords` are the tiles' level-0 top-left corners (N, 2); the centre is
    ``coords + tile_l0 / 2``. A centre exactly on an outline does not count.
    """
    centres = np.asarray(coords, dtype=np.float64).reshape(-1, 2) + float(tile_l0) / 2
    hit = np.zeros(len(centres), dtype=bool)
    for region in regions:
        if region is None or region.is_empty:
            continue
        x0, y0, x1, y1 = region.bounds
        cand = np.flatnonzero(
            (centres[:, 0] > x0) & (centres[:, 0] < x1) & (centres[:, 1] > y0)
            & (centres[:, 1] < y1) & ~hit
        )  # fmt: skip
        if len(cand):
            shapely.prepare(region)
            hit[cand] = shapely.contains_xy(region, centres[cand, 0], centres[cand, 1])
    return np.flatnonzero(hit)


def annotation_regions(
    path: str | PathLike[str], *, classes: Sequence[str] | None = None
) -> list[BaseGeometry]:
    """Every annotation polygon of a GeoJSON file (classified or not, or only `classes`).

    For regions of interest: ``tilescope embed --roi FILE`` embeds the tiles they overlap.

    Raises
    ------
    AnnotationError
        The file holds no annotation with an area (only points, lines or detections).
    """
    objects = read_geojson(path)
    regions = regions_by_class(objects, classes=classes, include_unclassified=True)
    out = [g for geoms in regions.values() for g in geoms]
    if not out:
        kinds = sorted({o.object_type for o in objects})
        raise AnnotationError(
            f"{path}: no annotation polygons (found {len(objects)} objects: "
            f"{', '.join(kinds)}); draw the regions as annotations (rectangle, polygon, brush)"
        )
    return out
