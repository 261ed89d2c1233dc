"""Reading QuPath GeoJSON: any form QuPath's importer reads, as `QuPathObject`s."""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from ..errors import TilescopeError

#: QuPath's objectType for each legacy (v0.2) type id.
_LEGACY_TYPES = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathTileObject": "tile",
    "PathCellObject": "cell",
    "TMACoreObject": "tmaCore",
    "PathRootObject": "root",
}
_GEOMETRY_TYPES = {
    "Point", "MultiPoint", "LineString", "MultiLineString", "Polygon", "MultiPolygon",
    "GeometryCollection",
}  # fmt: skip


class AnnotationError(TilescopeError):
    """A GeoJSON file could not be read as QuPath objects, or holds none that fit."""


@dataclass(frozen=True)
class QuPathObject:
    """One object of a QuPath GeoJSON file (geometry in level-0 pixels)."""

    geometry: BaseGeometry
    object_type: str = "annotation"
    classification: str | None = None
    class_color: tuple[int, int, int] | None = None
    name: str | None = None
    id: str | None = None
    locked: bool = False
    measurements: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    index: int = 0  # position in the file

    @property
    def area(self) -> BaseGeometry | None:
        """The polygonal part of the geometry (holes kept), or None for points and lines."""
        return area_geometry(self.geometry)


# -- reading ----------------------------------------------------------------------------------
def read_geojson(path: str | PathLike[str]) -> list[QuPathObject]:
    """Read the objects of a GeoJSON file as QuPath's importer does.

    Raises
    ------
    AnnotationError
        The file is missing, not JSON, or holds no GeoJSON feature or geometry; the message
        names the file and the feature that is wrong.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise AnnotationError(f"{p}: no such file; export the annotations from QuPath "
                              "(File > Export objects as GeoJSON)") from None  # fmt: skip
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{p}: cannot be read ({exc})") from None
    try:
        data = json.loads(text)  # QuPath may write NaN; Python's json reads it
    except ValueError as exc:
        raise AnnotationError(f"{p}: not valid JSON ({exc}); is it a GeoJSON file?") from None
    objects: list[QuPathObject] = []
    repaired: list[int] = []
    for n, feature in enumerate(_features(data)):
        try:
            obj, fixed = _parse_feature(feature, n)
        except (TypeError, ValueError, KeyError, AttributeError, shapely.errors.ShapelyError) as e:
            raise AnnotationError(f"{p}: feature {n + 1}: {e}") from None
        if obj is not None:
            objects.append(obj)
        if fixed:
            repaired.append(n + 1)
    if not objects:
        raise AnnotationError(
            f"{p}: no GeoJSON features or geometries found; export objects from QuPath with "
            "File > Export objects as GeoJSON"
        )
    if repaired:
        warnings.warn(f"{p}: self-crossing outlines repaired in features {repaired[:10]}",
                      stacklevel=2)  # fmt: skip
    return objects


def _features(data: Any) -> Iterator[Mapping[str, Any]]:
    """Features (and bare geometries) of a parsed file, in order, as PathIO.addPathObjects."""
    if isinstance(data, list):
        for item in data:
            yield from _features(item)
    elif isinstance(data, Mapping):
        kind = data.get("type")
        if kind == "FeatureCollection":
            yield from _features(data.get("features") or [])
        elif kind == "Feature" or kind in _GEOMETRY_TYPES:
            yield data


def _parse_feature(feature: Mapping[str, Any], index: int) -> tuple[QuPathObject | None, bool]:
    """The object of one feature (None without geometry) and whether its outline was repaired."""
    if feature.get("type") in _GEOMETRY_TYPES:  # a bare geometry: an unclassified annotation
        feature = {"type": "Feature", "geometry": feature, "properties": {}}
    raw_geometry = feature.get("geometry")
    if raw_geometry is None:
        return None, False  # GeoJSON allows a feature without geometry; QuPath has nothing to draw
    geometry, repaired = _geometry(raw_geometry)
    props = feature.get("properties") or {}
    if not isinstance(props, Mapping):
        raise ValueError("'properties' must be an object")
    fid = feature.get("id")
    object_type = "annotation"
    if isinstance(fid, str) and fid in _LEGACY_TYPES:
        object_type, fid = _LEGACY_TYPES[fid], None
    for key in ("objectType", "object_type", "type"):
        if isinstance(props.get(key), str):
            object_type = props[key]
            break
    cls_name, cls_color = _classification(props.get("classification"))
    raw_meta = props.get("metadata")
    metadata = (
        {str(k): str(v) for k, v in raw_meta.items()} if isinstance(raw_meta, Mapping) else {}
    )
    obj = QuPathObject(
        geometry=geometry,
        object_type=object_type,
        classification=cls_name,
        class_color=cls_color,
        name=str(props["name"]) if props.get("name") is not None else None,
        id=_uuid(fid),
        locked=bool(props.get("isLocked", False)),
        measurements=_measurements(props.get("measurements")),
        metadata=metadata,
        index=index,
    )
    return obj, repaired


def _geometry(raw: Any) -> tuple[BaseGeometry, bool]:
    if not isinstance(raw, Mapping) or raw.get("type") not in _GEOMETRY_TYPES:
        raise ValueError(f"unknown geometry {str(raw)[:80]!r}")
    geom = shapely.force_2d(shape(raw))  # QuPath writes x, y; a z is dropped
    if geom.is_empty:
        return geom, False
    coords = shapely.get_coordinates(geom)
    if not np.all(np.isfinite(coords)):
        raise ValueError("coordinates must be finite numbers")
    if geom.is_valid:
        return geom, False
    fixed = area_geometry(shapely.make_valid(geom))
    return (fixed if fixed is not None else geom), True


def _classification(raw: Any) -> tuple[str | None, tuple[int, int, int] | None]:
    """Name and colour of a classification in any of QuPath's forms."""
    if raw is None:
        return None, None
    if isinstance(raw, str):
        return (raw.strip() or None), None
    if not isinstance(raw, Mapping):
        raise ValueError(f"classification {raw!r} is neither a name nor an object")
    if isinstance(raw.get("names"), list) and raw["names"]:
        name: str | None = ": ".join(str(n) for n in raw["names"])
    elif raw.get("name") is not None:
        name = str(raw["name"])
        parent = raw.get("parentClass")  # pre-0.4 derived classes
        if isinstance(parent, Mapping):
            parent_name, _ = _classification(parent)
            name = f"{parent_name}: {name}" if parent_name else name
    else:
        name = None
    return name, _color(raw.get("color", raw.get("colorRGB")))


def _color(raw: Any) -> tuple[int, int, int] | None:
    """[r, g, b(, a)] or a packed (A)RGB int (Java's signed int) as 0-255 RGB."""
    if isinstance(raw, bool) or raw is None:
        return None
    if isinstance(raw, (int, float)):
        v = int(raw) & 0xFFFFFF
        return (v >> 16) & 255, (v >> 8) & 255, v & 255
    if isinstance(raw, (list, tuple)) and len(raw) in (3, 4):
        r, g, b = (int(max(0, min(255, round(float(c))))) for c in raw[:3])
        return r, g, b
    if isinstance(raw, (list, tuple)) and len(raw) == 1:
        return _color(raw[0])
    raise ValueError(f"colour {raw!r} is not [r, g, b] or a packed RGB number")


def _measurements(raw: Any) -> dict[str, float]:
    if isinstance(raw, Mapping):
        items: Iterable[tuple[Any, Any]] = raw.items()
    elif isinstance(raw, list):  # before QuPath 0.4: [{"name": ..., "value": ...}]
        items = ((m.get("name"), m.get("value")) for m in raw if isinstance(m, Mapping))
    else:
        return {}
    out = {}
    for k, v in items:
        if k is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = float(v)
    return out


def _uuid(fid: Any) -> str | None:
    try:
        return str(uuid.UUID(str(fid))) if fid is not None else None
    except ValueError:
        return None  # QuPath ignores an id that is not a UUID


def area_geometry(geom: BaseGeometry) -> BaseGeometry | None:
    """The Polygon/MultiPolygon part of a geometry (holes kept); None if it has no area."""
    if geom.is_empty:
        return None
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    if geom.geom_type == "GeometryCollection":
        parts = [area_geometry(g) for g in shapely.get_parts(geom)]
        polys = [p for p in parts if p is not None]
        return shapely.union_all(polys) if polys else None
    return None
