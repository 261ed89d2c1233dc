"""napari reader for QuPath GeoJSON: one shapes layer, the QuPath class as a feature.

Every polygonal object (annotations and detections; points and lines are left out) becomes
napari polygons: a MultiPolygon gives one shape per part, and each hole is a shape of its own
with ``features["hole"] = True`` (napari shapes have no holes), its outline half-transparent,
so that `layer_regions` can subtract it again. Features per shape: ``class``
(QuPath's classification, "" if none), ``name``, ``object`` (the object's index in the file),
``object_type``, ``hole``. Edge colours are the QuPath class colours.

GeoJSON coordinates are level-0 pixels. The layer holds them as (row, col) = (y, x) level-0
corner coordinates and is placed over a Tilescope slide layer with that layer's transform and a
local offset of half a pixel (level-0 corner u is the slide's data index u - 0.5), so it sits
exactly where the slide draws it, and follows the slide when it moves. When no slide is open
yet, it stays in level-0 pixels and `align_to_slide` places it later (the Tissue classifier
widget does this).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

LayerData = tuple[Any, dict[str, Any], str]
ROLE = "qupath-annotations"
SUFFIXES = (".geojson", ".json")


def napari_get_geojson_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """A reader if every path is a GeoJSON file with at least one polygon, else ``None``."""
    from ..qupath import AnnotationError, read_geojson

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(str(p).lower().endswith(SUFFIXES) for p in paths):
        return None
    try:
        if not all(any(o.area is not None for o in read_geojson(p)) for p in paths):
            return None
    except AnnotationError:
        return None  # not GeoJSON: let napari try other readers
    return read_geojson_layers


def read_geojson_layers(path: str | list[str]) -> list[LayerData]:
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    return [geojson_layer_data(p, slide=_current_slide()) for p in paths]


def geojson_layer_data(path: str | Path, *, slide: Any = None) -> LayerData:
    """Layer data for the polygons of a GeoJSON file, over `slide` (a slide layer) if given."""
    import shapely

    from ..qupath import class_color, read_geojson

    shapes: list[np.ndarray] = []
    feats: dict[str, list[Any]] = {
        k: [] for k in ("class", "name", "object", "object_type", "hole")
    }
    colors: list[list[float]] = []
    classes: list[str] = []
    class_rgb: dict[str, list[int]] = {}
    for obj in read_geojson(path):
        area = obj.area
        if area is None:
            continue
        cls = obj.classification or ""
        if cls and cls not in classes:
            classes.append(cls)
        rgb = obj.class_color or (class_color(classes.index(cls)) if cls else (255, 255, 0))
        if cls:
            class_rgb.setdefault(cls, list(rgb))
        for part in shapely.get_parts(area):
            rings = [(part.exterior, False)] + [(r, True) for r in part.interiors]
            for ring, hole in rings:
                xy = np.asarray(ring.coords)[:-1]  # napari closes polygons itself
                if len(xy) < 3:
                    continue
                shapes.append(xy[:, ::-1].copy())
                for key, value in (("class", cls), ("name", obj.name or ""),
                                   ("object", obj.index), ("object_type", obj.object_type),
                                   ("hole", hole)):  # fmt: skip
                    feats[key].append(value)
                colors.append([c / 255 for c in rgb] + [0.5 if hole else 1.0])
    name = Path(path).stem
    kwargs: dict[str, Any] = {
        "name": name,
        "shape_type": "polygon",
        "edge_color": np.array(colors) if colors else "yellow",
        "face_color": "transparent",
        "edge_width": 2.0,
        "features": feats,
        "metadata": {
            "tilescope": {"role": ROLE, "path": str(path), "frame": "level0", "colors": class_rgb}
        },
    }
    if slide is not None:
        kwargs.update(_placement(slide))
        kwargs["metadata"]["tilescope"].update(_on_slide(slide))
        kwargs["edge_width"] = 2.0
    return shapes, kwargs, "shapes"


#: Local placement over a slide: level-0 corner coordinates are slide data index + 0.5.
_LOCAL = {"scale": [1.0, 1.0], "offset": [-0.5, -0.5]}


def _placement(slide: Any) -> dict[str, Any]:
    from ._layers import SlideFrame

    return SlideFrame.of_layer(slide).place(_LOCAL["scale"], _LOCAL["offset"])


def _on_slide(slide: Any) -> dict[str, Any]:
    """Metadata of a layer placed over `slide` (`follow_slide` keeps it there)."""
    path = slide.metadata.get("tilescope", {}).get("path", "")
    return {"frame": "slide", "slide": path, "slide_layer": slide.name, "local": dict(_LOCAL)}


def align_to_slide(layer: Any, slide: Any) -> bool:
    """Place a shapes layer read in level-0 pixels over `slide`; True if it moved."""
    meta = layer.metadata.get("tilescope", {})
    if meta.get("role") != ROLE or meta.get("frame") != "level0":
        return False
    for key, value in _placement(slide).items():
        setattr(layer, key, value)
    layer.metadata = {**layer.metadata, "tilescope": {**meta, **_on_slide(slide)}}
    return True


def _current_slide() -> Any:
    """The Tilescope slide layer of the current viewer, if exactly one is open."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no Qt app, no viewer
        return None
    if viewer is None:
        return None
    slides = [ly for ly in viewer.layers if "path" in ly.metadata.get("tilescope", {})]
    active = viewer.layers.selection.active
    if active in slides:
        return active
    return slides[0] if len(slides) == 1 else None


def layer_regions(layer: Any, frame: Any, default_class: str | None = None) -> dict[str, list[Any]]:
    """Level-0 shapely regions of a shapes layer, by class.

    The class of a shape is its ``class`` feature (layers from this reader) or
    `default_class` (a layer drawn for one class). Shapes of one QuPath object (``object``
    feature) are joined and their ``hole`` shapes cut out. Lines and paths are left out;
    ellipses become polygons. `frame` is the slide's `SlideFrame` (world -> level 0).
    """
    import shapely
    from shapely.geometry import Polygon

    from ._layers import shapes_to_world_polygons

    n = len(layer.data)
    feats = layer.features
    cls = list(feats["class"]) if "class" in feats else [default_class] * n
    obj = list(feats["object"]) if "object" in feats else list(range(n))
    hole = list(feats["hole"]) if "hole" in feats else [False] * n
    closed = [i for i, kind in enumerate(layer.shape_type) if kind not in ("line", "path")]
    worlds = shapes_to_world_polygons(layer)  # the closed shapes, in order
    parts: dict[tuple[Any, Any], tuple[list[Any], list[Any]]] = {}
    for i, world in zip(closed, worlds, strict=True):
        c = cls[i] if cls[i] not in ("", None) else default_class
        if c is None or len(world) < 3:
            continue
        poly = shapely.make_valid(Polygon(frame.world_to_l0(world)))
        outer, holes = parts.setdefault((c, obj[i]), ([], []))
        (holes if bool(hole[i]) else outer).append(poly)
    out: dict[str, list[Any]] = {}
    for (c, _), (outer, holes) in parts.items():
        if not outer:
            continue
        region = shapely.union_all(outer)
        if holes:
            region = region.difference(shapely.union_all(holes))
        if not region.is_empty:
            out.setdefault(str(c), []).append(region)
    return out
