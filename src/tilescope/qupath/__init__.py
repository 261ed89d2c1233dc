"""QuPath GeoJSON in and out: annotations as regions, scores and tiles as QuPath objects.

Reading follows QuPath's own importer (``PathIO.readObjectsFromGeoJSON``,
``PathObjectTypeAdapters``, ``GsonTools.PathClassTypeAdapter`` in qupath-core):

- a file holds a FeatureCollection, a single Feature, a bare geometry (an unclassified
  annotation), or a JSON list of any of these;
- ``properties.objectType`` is "annotation", "detection", "tile", "cell", "tmaCore" (v0.2's
  ``id`` of "PathAnnotationObject" etc. and the aliases ``object_type`` / ``type`` are read
  too); a feature without one is an annotation;
- ``properties.classification`` is ``{"name", "color": [r, g, b(, a)]}`` (QuPath 0.4+),
  ``{"names": [...]}`` for a derived class ("Tumor: Positive"), a plain string, or the
  pre-0.4 ``{"name", "colorRGB": packed int, "parentClass": {...}}``;
- ``measurements`` is an object ``{name: value}`` (0.4+) or a list ``[{"name", "value"}]``;
- a feature ``id`` that parses as a UUID is the object's id; ``isLocked``, ``name``,
  ``color`` (object colour), ``metadata`` are kept;
- coordinates are pixels of the full-resolution image (level 0), origin top-left, y down:
  Tilescope's level-0 coordinates exactly (pixel i covers [i, i + 1)).

Geometries are shapely objects; Polygon and MultiPolygon keep their holes. Freehand
polygons that cross themselves are repaired (``shapely.make_valid``) with a warning.

Writing produces what QuPath's importer accepts: a FeatureCollection of Features with
``geometry``, ``properties.objectType``, a ``classification`` that always carries a
``color`` (QuPath refuses a classification object with a name and no colour), measurements as
an object of finite numbers, and no ``id`` (QuPath gives imported objects fresh UUIDs).
"""

from ._read import AnnotationError, QuPathObject, area_geometry, read_geojson
from ._regions import annotation_regions, regions_by_class, tiles_in_regions
from ._store import (
    geojson_query_rows,
    match_features,
    score_annotations,
    score_columns,
    tile_features,
    tile_union,
    write_objects,
)
from ._write import (
    CLASS_COLORS,
    annotation_feature,
    class_color,
    geometry_json,
    write_feature_collection,
    write_features,
)

__all__ = [
    "CLASS_COLORS",
    "AnnotationError",
    "QuPathObject",
    "annotation_feature",
    "annotation_regions",
    "area_geometry",
    "class_color",
    "geojson_query_rows",
    "geometry_json",
    "match_features",
    "read_geojson",
    "regions_by_class",
    "score_annotations",
    "score_columns",
    "tile_features",
    "tile_union",
    "tiles_in_regions",
    "write_feature_collection",
    "write_features",
    "write_objects",
]
