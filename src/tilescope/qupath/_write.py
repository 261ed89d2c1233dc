"""Writing GeoJSON that QuPath's importer accepts."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry

from ._read import AnnotationError

#: A categorical palette (matplotlib's tab10) as 0-255 RGB, the napari widgets' class colours.
CLASS_COLORS = (
    (214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127),
)  # fmt: skip
#: Decimals written for coordinates (QuPath itself writes 2).
DECIMALS = 3


def class_color(i: int) -> tuple[int, int, int]:
    """The i-th class colour of the palette (0-255 RGB)."""
    return CLASS_COLORS[i % len(CLASS_COLORS)]


def annotation_feature(
    geometry: BaseGeometry,
    *,
    classification: str | None = None,
    color: Sequence[int] | None = None,
    name: str | None = None,
    measurements: Mapping[str, float] | None = None,
    metadata: Mapping[str, Any] | None = None,
    object_type: str = "annotation",
) -> dict[str, Any]:
    """A GeoJSON Feature that QuPath imports as an object of `object_type`.

    A `classification` always gets a colour (the palette's first if none is given): QuPath
    refuses a classification with a name and no colour. Measurements that are not finite
    numbers are left out (QuPath's importer would read ``null`` as an error).
    """
    props: dict[str, Any] = {"objectType": object_type}
    if name:
        props["name"] = str(name)
    if classification is not None:
        rgb = [int(c) for c in (color if color is not None else class_color(0))][:3]
        props["classification"] = {"name": str(classification), "color": rgb}
    finite = {str(k): float(v) for k, v in (measurements or {}).items() if _finite(v)}
    if finite:
        props["measurements"] = finite
    if metadata:
        props["metadata"] = {str(k): str(v) for k, v in metadata.items()}
    return {"type": "Feature", "geometry": geometry_json(geometry), "properties": props}


def geometry_json(geometry: BaseGeometry) -> dict[str, Any]:
    """GeoJSON geometry with coordinates rounded to `DECIMALS` (lists, not tuples)."""
    rounded = shapely.set_precision(geometry, 10.0**-DECIMALS, mode="pointwise")
    return _lists(mapping(rounded))


def _lists(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_lists(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, DECIMALS)
    return obj


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def write_features(
    path: str | PathLike[str], features: Iterable[Mapping[str, Any]], *, overwrite: bool = False
) -> Path:
    """Write a FeatureCollection to `path` (a temporary name first, then renamed into place).

    Raises
    ------
    AnnotationError
        `path` exists and `overwrite` is false, or is a folder.
    """
    dest = Path(path)
    if dest.is_dir():
        raise AnnotationError(f"{dest}: is a folder; name a .geojson file")
    if dest.exists() and not overwrite:
        raise AnnotationError(f"{dest}: already exists; choose another path or overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        write_feature_collection(tmp, features)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def write_feature_collection(path: Path, features: Iterable[Mapping[str, Any]]) -> int:
    """Stream features into a FeatureCollection at `path`, one per line; returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        for feature in features:
            fh.write(("," if n else "") + "\n" + json.dumps(feature, allow_nan=False))
            n += 1
        fh.write("\n]}\n")
    return n
