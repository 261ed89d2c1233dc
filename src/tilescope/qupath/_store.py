"""A store's scores and tiles as QuPath objects: class-region annotations, tile detections."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.affinity import affine_transform
from shapely.geometry.base import BaseGeometry

from ._read import AnnotationError, read_geojson
from ._regions import regions_by_class, tiles_in_regions
from ._write import annotation_feature, class_color, write_feature_collection

#: Appended to names of objects made from an untrained model's embeddings.
UNTRAINED_TAG = " [UNTRAINED]"
ScoreSets = Mapping[str, tuple[Mapping[str, np.ndarray], Mapping[str, Any]]]


def score_columns(
    name: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> tuple[np.ndarray, list[str], str]:
    """A score set's per-class values (N, C), class names, and what the values are.

    ``probs`` (with ``meta["classes"]``) when the set has them, as every scoring and
    classifier writes; else its first array, one column per class (a 1-D array is one
    column named after the set).
    """
    key = "probs" if "probs" in arrays else next(iter(arrays), None)
    if key is None:
        raise AnnotationError(f"score set {name!r} holds no arrays")
    values = np.asarray(arrays[key], dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    classes = [str(c) for c in meta.get("classes") or []]
    if len(classes) != values.shape[1]:
        classes = (
            [name] if values.shape[1] == 1 else [f"{name} {j}" for j in range(values.shape[1])]
        )
    what = "probability" if key == "probs" else key
    return values, classes, what


def _class_colors(meta: Mapping[str, Any], n: int) -> list[tuple[int, int, int]]:
    given = meta.get("colors")
    if isinstance(given, list) and len(given) == n:
        return [tuple(int(v) for v in c[:3]) for c in given]  # type: ignore[misc]
    return [class_color(j) for j in range(n)]


def tile_union(store: Any, rows: np.ndarray) -> tuple[BaseGeometry, BaseGeometry]:
    """The union of tiles `rows` of a store, in level-0 pixels and in grid-cell units.

    Built on the tile grid (cells of ``gcd(tile, stride)`` target px, as the heatmaps), so
    neighbouring tiles join without the sub-pixel gaps that rounded corners would leave.
    Returns ``(level-0 geometry, cell geometry)``; empty geometries when `rows` is empty.
    """
    sig = store.signature
    grid, lay = sig["grid"], sig["layout"]
    tile_px = int(grid["tile_px"])
    stride_px = tile_px - int(grid.get("overlap_px", 0))
    g = math.gcd(tile_px, stride_px)
    a, s = tile_px // g, stride_px // g
    cell_l0 = g * float(lay["downsample"])
    ox, oy = (float(v) for v in lay["origin"])
    rc = np.asarray(store.grid_rc, dtype=np.int64)[np.asarray(rows, dtype=np.int64)]
    if not len(rc):
        empty = shapely.Polygon()
        return empty, empty
    rc = rc[np.lexsort((rc[:, 1], rc[:, 0]))]
    # merge runs of neighbouring tiles in a grid row into one box (fewer shapes to union)
    breaks = np.flatnonzero((np.diff(rc[:, 0]) != 0) | (np.diff(rc[:, 1]) != 1)) + 1
    starts, stops = np.r_[0, breaks], np.r_[breaks, len(rc)] - 1
    r, c0, c1 = rc[starts, 0], rc[starts, 1], rc[stops, 1]
    boxes = shapely.box(c0 * s, r * s, c1 * s + a, r * s + a)
    cells = shapely.simplify(shapely.union_all(boxes), 0)
    return affine_transform(cells, [cell_l0, 0, 0, cell_l0, ox, oy]), cells


def score_annotations(
    store: Any,
    name: str,
    *,
    threshold: float = 0.5,
    classes: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Per-class regions of a saved score set as QuPath annotation features.

    For each class, the embedded tiles whose value is at least `threshold` are joined into
    polygons (holes kept); each connected polygon is one annotation classified as that class,
    in its colour (the set's ``meta["colors"]``, e.g. from QuPath classes a classifier was
    trained on, else the palette), named "<class> (<what> >= <threshold>)", with measurements
    ``Tiles``, ``Mean <what>`` and ``Max <what>`` of its tiles. Tiles that are not embedded or
    whose value is not a number never count.
    """
    if not math.isfinite(threshold):
        raise AnnotationError(f"threshold must be a number, not {threshold}")
    arrays, meta = store.read_scores(name)
    values, names, what = score_columns(name, arrays, meta)
    colors = _class_colors(meta, len(names))
    wanted = names if classes is None else list(classes)
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise AnnotationError(f"score set {name!r} has no class {unknown[0]!r} (classes: "
                              f"{', '.join(names)})")  # fmt: skip
    trained = bool(store.signature["model"].get("trained", True))
    tag = "" if trained and meta.get("trained", True) else UNTRAINED_TAG
    done = np.asarray(store.done, dtype=bool)
    rc = np.asarray(store.grid_rc, dtype=np.int64)
    out = []
    for cls in wanted:
        j = names.index(cls)
        col = values[:, j]
        with np.errstate(invalid="ignore"):
            rows = np.flatnonzero(done & np.isfinite(col) & (col >= threshold))
        geom, cells = tile_union(store, rows)
        parts = [p for p in shapely.get_parts(geom)]
        cell_parts = [p for p in shapely.get_parts(cells)]
        centres = _cell_centres(store, rc[rows])
        for part, cell_part in zip(parts, cell_parts, strict=True):
            inside = rows[shapely.contains_xy(cell_part, centres[:, 0], centres[:, 1])]
            v = col[inside]
            out.append(
                annotation_feature(
                    part,
                    classification=cls,
                    color=colors[j],
                    name=f"{cls} ({what} >= {threshold:g}){tag}",
                    measurements={
                        "Tiles": float(len(inside)),
                        f"Mean {what}": float(v.mean()) if len(v) else math.nan,
                        f"Max {what}": float(v.max()) if len(v) else math.nan,
                    },
                    metadata={
                        "tilescope score set": name,
                        "tilescope threshold": f"{threshold:g}",
                        "tilescope model": store.model_id + tag,
                        "tilescope slide": store.slide_name,
                    },
                )
            )
    return out


def _cell_centres(store: Any, rc: np.ndarray) -> np.ndarray:
    """Tile centres in grid-cell units (x, y), matching `tile_union`'s cell geometry."""
    grid = store.signature["grid"]
    tile_px = int(grid["tile_px"])
    stride_px = tile_px - int(grid.get("overlap_px", 0))
    g = math.gcd(tile_px, stride_px)
    a, s = tile_px // g, stride_px // g
    return np.stack([rc[:, 1] * s + a / 2, rc[:, 0] * s + a / 2], axis=1).astype(np.float64)


def tile_features(
    store: Any,
    score_sets: ScoreSets,
    *,
    object_type: str = "detection",
    classify_by: str | None = None,
) -> Iterator[dict[str, Any]]:
    """One QuPath object per embedded tile: its square, measurements, and optionally a class.

    Measurements: ``tissue`` and ``"<set>: <class>"`` per score set (``[UNTRAINED]`` appended
    for an untrained model), finite values only. With `classify_by` (a set in `score_sets`),
    each tile is classified as that set's highest-scoring class, in its colour. Tiles that are
    not embedded (failed, or not reached yet) are left out.
    """
    t = float(store.tile_l0)
    tag = "" if store.signature["model"].get("trained", True) else UNTRAINED_TAG
    columns: list[tuple[str, np.ndarray]] = []
    for name, (arrays, meta) in score_sets.items():
        values, names, _ = score_columns(name, arrays, meta)
        columns += [(f"{name}: {c}{tag}", values[:, j]) for j, c in enumerate(names)]
    winner: np.ndarray | None = None
    if classify_by is not None:
        arrays, meta = score_sets[classify_by]
        values, class_names, _ = score_columns(classify_by, arrays, meta)
        colors = _class_colors(meta, len(class_names))
        finite = np.isfinite(values).all(axis=1)
        winner = np.where(finite, np.argmax(np.where(np.isfinite(values), values, -np.inf), 1), -1)
    coords, tissue, done = store.coords, store.tissue, np.asarray(store.done, bool)
    for i in np.flatnonzero(done):
        x, y = (float(v) for v in coords[i])
        ring = [[x, y], [x + t, y], [x + t, y + t], [x, y + t], [x, y]]
        ring = [[round(u, 3), round(w, 3)] for u, w in ring]
        meas = {"tissue": float(tissue[i]), **{k: float(v[i]) for k, v in columns}}
        props: dict[str, Any] = {"objectType": object_type}
        if winner is not None and winner[i] >= 0:
            props["classification"] = {"name": class_names[winner[i]],
                                       "color": list(colors[winner[i]])}  # fmt: skip
        props["measurements"] = {k: v for k, v in meas.items() if math.isfinite(v)}
        yield {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
               "properties": props}  # fmt: skip


def write_objects(
    store: Any,
    path: Path,
    score_sets: ScoreSets,
    *,
    objects: str,
    threshold: float = 0.5,
    scrub: Callable[[Any], Any] | None = None,
) -> int:
    """Write a store's QuPath objects to `path` (a FeatureCollection); returns their count.

    ``objects="annotations"``: class regions of the one score set in `score_sets`
    (`score_annotations`); ``"detections"``: one detection per embedded tile
    (`tile_features`), classified by the score set when exactly one is given. `scrub` maps
    each feature before it is written (an anonymised export: `tilescope.anonymize`).

    Raises
    ------
    AnnotationError
        Annotations asked for without exactly one score set, or an unknown `objects`.
    """
    if objects == "annotations":
        if len(score_sets) != 1:
            have = ", ".join(store.score_names()) or "none saved"
            raise AnnotationError(
                f"{store.path}: annotations are drawn from one score set; name it with "
                f"--scores NAME (score sets: {have})"
            )
        (name,) = score_sets
        features: Iterable[Any] = score_annotations(store, name, threshold=threshold)
    elif objects == "detections":
        one = next(iter(score_sets)) if len(score_sets) == 1 else None
        features = tile_features(store, score_sets, classify_by=one)
    else:
        raise AnnotationError(f"unknown QuPath object kind {objects!r}: annotations or detections")
    return write_feature_collection(path, map(scrub, features) if scrub else features)


def geojson_query_rows(
    store: Any,
    path: str | Path,
    *,
    classes: Sequence[str] | None = None,
    unlike_classes: Sequence[str] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Embedded tiles under a GeoJSON file's annotations: ``(query rows, "not like" rows)``.

    The query is the annotations of `classes` (all annotation polygons, classified or not,
    except those of `unlike_classes`, when `classes` is None); "not like this" the
    annotations of `unlike_classes`. A tile counts when its centre is inside (holes
    excluded). Tiles that are not embedded are in neither set.

    Raises
    ------
    AnnotationError
        A named class has no polygon in the file, or the query covers no embedded tile.
    """
    objects = read_geojson(path)
    named = list(classes or []) + list(unlike_classes)
    regions = regions_by_class(objects, include_unclassified=True)
    missing = [c for c in named if c not in regions]
    if missing:
        have = ", ".join(repr(c) for c in regions if c is not None) or "none"
        raise AnnotationError(f"{path}: no annotation polygons of class {missing[0]!r} "
                              f"(classes: {have})")  # fmt: skip
    pos_keys = list(classes) if classes else [c for c in regions if c not in unlike_classes]
    done = np.asarray(store.done, bool)

    def rows(keys: Sequence[str | None]) -> np.ndarray:
        found = tiles_in_regions(store.coords, store.tile_l0, [g for k in keys for g in regions[k]])
        return found[done[found]]

    pos, neg = rows(pos_keys), rows(list(unlike_classes))
    if not len(pos):
        what = f"class {', '.join(map(repr, classes))}" if classes else "its annotations"
        raise AnnotationError(
            f"{path}: {what} cover no embedded tissue tile of {store.path} (a tile counts when "
            "its centre is inside; coordinates are level-0 pixels of the slide)"
        )
    return pos, neg


def match_features(
    matches: Sequence[Any],
    *,
    classification: str = "Search match",
    color: Sequence[int] = (0, 200, 200),
    slide_name: str | None = None,
    trained: bool = True,
    store: str | Path | None = None,
    object_type: str = "annotation",
) -> list[dict[str, Any]]:
    """Search matches (`tilescope.search.Match`) as QuPath objects, one square per tile.

    Each is a QuPath `object_type` ("annotation", or "detection"), classified as
    `classification`, named "match <rank>" (its rank among all `matches`), with measurements
    ``Rank`` and ``Similarity``. Only matches of `slide_name` (their ``slide_name``) and of
    the store `store` (their ``store``, however the path is spelled) when given, since
    coordinates belong to one slide. For a similarity map saved as a score set, `export
    --scores NAME --as annotations --threshold T` gives the regions instead.
    """
    tag = "" if trained else UNTRAINED_TAG
    here = Path(store).resolve() if store is not None else None
    out = []
    for rank, m in enumerate(matches, 1):
        if slide_name is not None and m.slide_name != slide_name:
            continue
        if here is not None and Path(m.store).resolve() != here:
            continue
        x, y, t = float(m.x), float(m.y), float(m.tile_l0)
        out.append(
            annotation_feature(
                shapely.box(x, y, x + t, y + t),
                classification=classification,
                color=color,
                name=f"match {rank}{tag}",
                measurements={"Rank": float(rank), "Similarity": float(m.similarity)},
                metadata={"tilescope slide": m.slide_name, "tilescope store": Path(m.store).name},
                object_type=object_type,
            )
        )
    return out
