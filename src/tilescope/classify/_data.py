"""Training data: the embedded tiles under each class's regions, and the regions they form."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ._model import ClassifierError


@dataclass(frozen=True)
class TrainingSet:
    """Training tiles of one store: rows, class labels, and the region each tile is in."""

    classes: list[str]
    colors: list[tuple[int, int, int]]
    indices: np.ndarray  # (n,) store rows
    labels: np.ndarray  # (n,) class index
    groups: np.ndarray  # (n,) region id (connected tiles of one class)
    n_ambiguous: int = 0  # tiles inside regions of two classes, left out
    n_not_embedded: int = 0  # tiles inside regions but not embedded, left out
    source: str = ""

    def regions_per_class(self) -> dict[str, int]:
        return {
            c: len(np.unique(self.groups[self.labels == k])) for k, c in enumerate(self.classes)
        }

    def tiles_per_class(self) -> dict[str, int]:
        return {c: int((self.labels == k).sum()) for k, c in enumerate(self.classes)}


def training_set(
    store: Any,
    regions: Mapping[str, Sequence[Any]],
    *,
    colors: Mapping[str, Sequence[int]] | None = None,
    source: str = "",
) -> TrainingSet:
    """The training tiles of `store` under `regions` (class name -> level-0 polygons).

    Polygons are shapely geometries (holes allowed) or (K, 2) x, y arrays; a tile counts
    when its centre lies inside. Classes keep the order of `regions`.

    Raises
    ------
    ClassifierError
        Fewer than two classes, or a class with no embedded tile inside its regions.
    """
    from shapely.geometry import Polygon

    from ..qupath import class_color, tiles_in_regions

    classes = [str(c) for c in regions]
    if len(classes) < 2:
        raise ClassifierError(
            f"a classifier needs regions of at least two classes (got {classes or 'none'}); "
            "draw or annotate another tissue class"
        )
    done = np.asarray(store.done, dtype=bool)
    member = np.zeros((len(classes), store.n_tiles), dtype=bool)
    for k, cls in enumerate(classes):
        geoms = [
            g if hasattr(g, "geom_type") else Polygon(np.asarray(g, float)) for g in regions[cls]
        ]
        member[k, tiles_in_regions(store.coords, store.tile_l0, geoms)] = True
    claimed = member.sum(0)
    n_ambiguous = int(((claimed > 1) & done).sum())
    n_not_embedded = int(((claimed > 0) & ~done).sum())
    keep = (claimed == 1) & done
    empty = [c for k, c in enumerate(classes) if not (member[k] & keep).any()]
    if empty:
        raise ClassifierError(
            f"{store.path}: no embedded tile has its centre inside the regions of "
            f"{', '.join(map(repr, empty))}; draw them over embedded tissue (larger than a tile, "
            f"{store.tile_l0 * store.level0_mpp:.0f} µm)"
        )
    rows = np.flatnonzero(keep)
    labels = np.argmax(member[:, rows], axis=0).astype(np.int64)
    groups = _regions_on_grid(np.asarray(store.grid_rc)[rows], labels)
    given = dict(colors or {})
    palette = [tuple(int(v) for v in given[c][:3]) if c in given else class_color(k)
               for k, c in enumerate(classes)]  # fmt: skip
    return TrainingSet(classes, palette, rows, labels, groups, n_ambiguous, n_not_embedded, source)  # type: ignore[arg-type]


def _regions_on_grid(rc: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Region id per tile: connected components (8-neighbours on the grid) of each class."""
    from scipy.ndimage import label

    groups = np.zeros(len(rc), dtype=np.int64)
    offset = 0
    for k in np.unique(labels):
        sel = np.flatnonzero(labels == k)
        lo = rc[sel].min(0)
        grid = np.zeros(tuple(rc[sel].max(0) - lo + 1), dtype=bool)
        grid[tuple((rc[sel] - lo).T)] = True
        comp, n = label(grid, structure=np.ones((3, 3), dtype=bool))
        groups[sel] = comp[tuple((rc[sel] - lo).T)] - 1 + offset
        offset += n
    return groups


def training_set_from_geojson(
    store: Any, path: str | PathLike[str], *, classes: Sequence[str] | None = None
) -> TrainingSet:
    """Training tiles from the classified annotations of a QuPath GeoJSON file.

    Every class with polygonal annotations is a class of the classifier (or only `classes`),
    in order of first appearance, with its QuPath colour. Unclassified annotations and
    QuPath's special classes ending in ``*`` ("Ignore*", "Region*") are left out.
    """
    from ..qupath import read_geojson, regions_by_class

    objects = read_geojson(path)
    regions = regions_by_class(objects, classes=classes)
    if classes is None:
        regions = {c: g for c, g in regions.items() if c is not None and not c.endswith("*")}
    colors: dict[str, tuple[int, int, int]] = {}
    for obj in objects:
        if obj.classification in regions and obj.class_color is not None:
            colors.setdefault(str(obj.classification), obj.class_color)
    if len(regions) < 2:
        raise ClassifierError(
            f"{path}: a classifier needs classified annotations of at least two classes; "
            f"found {', '.join(repr(c) for c in regions) or 'none'} (set a class on each "
            "annotation in QuPath)"
        )
    return training_set(store, {str(c): g for c, g in regions.items()}, colors=colors,
                        source=Path(path).name)  # fmt: skip
