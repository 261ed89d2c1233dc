"""Core results as napari layer data, placed over their slide layer, and updated in place.

No Qt here and no scoring: only geometry (level-0 pixels <-> the slide layer's world) and the
``(data, kwargs, layer_type)`` tuples napari's ``Layer.create`` understands, plus `put_layers`,
which updates layers of the same name in place instead of adding others.

Coordinate convention (exact)
-----------------------------
Core coordinates are *level-0 corner coordinates* ``u``: level-0 pixel ``i`` covers
``[i, i + 1)``, a tile with top-left ``x`` covers ``[x, x + tile_l0)``. A slide layer's data
index ``d`` is a level-0 pixel *centre*, ``d = u - 0.5``, and napari maps data to world through
the layer's transform: ``world = A (T + R Sh diag(s) d)`` (``scale`` s, ``translate`` T,
``rotate`` R, ``shear`` Sh, ``affine`` A). A result layer sits in the slide's data frame with a
local scale ``c`` and offset ``o`` (its data index ``r`` lies at slide data ``o + c r``), so its
own transform is the slide's with ``scale = s c`` and ``translate = T + R Sh diag(s) o``: a
heatmap cell lands exactly on its tiles whatever the slide's scale, translation, rotation, shear
or affine, and `follow_slide` keeps it there when the slide layer is moved later.

In place (`put_layer`) means new data, placement, features and metadata; the user's visibility,
opacity, colormap, blending and contrast limits are kept (contrast limits follow new data only
while the user has not changed them). Nothing is removed and added again: removing a layer costs
napari a garbage collection (about 0.7 s).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..figures import ColorScale, finite_limits
from ..raster import Heatmap, winning_class
from ._frame import SlideFrame, result_name, slide_label

__all__ = [
    "CLASS_COLORS",
    "LayerData",
    "SlideFrame",
    "class_color",
    "finite_limits",
    "follow_slide",
    "heatmap_layer",
    "labels_layer",
    "matches_layer",
    "put_layer",
    "put_layers",
    "result_name",
    "shapes_to_world_polygons",
    "slide_label",
]

LayerData = tuple[Any, dict[str, Any], str]
#: Keys of a layer's placement (its transform and units), set again on every update.
PLACEMENT_KEYS = ("scale", "translate", "rotate", "shear", "affine", "units")

#: A categorical palette for winning-class labels (matplotlib's tab10), RGBA in 0..1.
CLASS_COLORS = np.array(
    [
        [0.839, 0.153, 0.157, 1.0],  # red
        [0.122, 0.467, 0.706, 1.0],  # blue
        [0.173, 0.627, 0.173, 1.0],  # green
        [1.000, 0.498, 0.055, 1.0],  # orange
        [0.580, 0.404, 0.741, 1.0],  # purple
        [0.549, 0.337, 0.294, 1.0],  # brown
        [0.890, 0.467, 0.761, 1.0],  # pink
        [0.737, 0.741, 0.133, 1.0],  # olive
        [0.090, 0.745, 0.812, 1.0],  # cyan
        [0.498, 0.498, 0.498, 1.0],  # grey
    ]
)


def heatmap_layer(
    hm: Heatmap,
    frame: SlideFrame,
    name: str,
    scale: ColorScale,
    *,
    opacity: float = 0.6,
    visible: bool = True,
    colorbar: bool = False,
    metadata: dict[str, Any] | None = None,
) -> LayerData:
    """A float image of the raster in `scale`'s colormap and range; NaN (no tile) is clear.

    ``metadata["tilescope"]["legend"]`` says what the colours mean (as the PNGs do)."""
    meta = {**(metadata or {}), "local": frame.local(hm), "legend": scale.legend(),
            "auto_limits": list(scale.limits)}  # fmt: skip
    kwargs = {
        "name": name,
        "colormap": scale.colormap,
        "contrast_limits": scale.limits,
        "opacity": opacity,
        "blending": "translucent",
        "interpolation2d": "nearest",
        "visible": visible,
        "metadata": {"tilescope": meta},
        "colorbar": colorbar,  # not a napari keyword: `put_layer` shows the layer's colour bar
        **frame.placement(hm),
    }
    return hm.raster, kwargs, "image"


def labels_layer(
    rasters: Sequence[Heatmap],
    classes: Sequence[str],
    frame: SlideFrame,
    name: str,
    *,
    colors: Sequence[Any] | None = None,
    opacity: float = 0.45,
    visible: bool = False,
    metadata: dict[str, Any] | None = None,
) -> LayerData:
    """Winning class per raster cell (`tilescope.raster.winning_class`): label ``c + 1`` in
    colour ``colors[c]`` (default `class_color`). ``features`` name each label (hover)."""
    from napari.utils.colormaps import DirectLabelColormap

    palette = [np.asarray(c, float) for c in colors] if colors is not None else None
    table: dict[int | None, Any] = {0: np.zeros(4), None: np.zeros(4)}
    table.update({i + 1: palette[i] if palette else class_color(i) for i in range(len(classes))})
    kwargs = {
        "name": name,
        "opacity": opacity,
        "visible": visible,
        "colormap": DirectLabelColormap(color_dict=table),
        "features": {"index": np.arange(1, len(classes) + 1), "class": list(classes)},
        "metadata": {"tilescope": {**(metadata or {}), "local": frame.local(rasters[0])}},
        **frame.placement(rasters[0]),
    }
    return winning_class(rasters), kwargs, "labels"


def matches_layer(
    xy: np.ndarray,
    tile_l0: float,
    frame: SlideFrame,
    features: dict[str, Any],
    name: str,
    *,
    metadata: dict[str, Any] | None = None,
) -> LayerData:
    """Rectangles of matching tiles in the slide's frame, numbered by ``features["rank"]``."""
    kwargs = {
        "name": name,
        "shape_type": "rectangle",
        "edge_color": "cyan",
        "face_color": "transparent",
        "edge_width": 0.04 * tile_l0,  # data units: level-0 pixels
        "features": features,
        "text": {"string": "{rank}", "color": "cyan", "size": 10, "anchor": "upper_left"},
        "metadata": {"tilescope": {**(metadata or {}), "local": frame.local()}},
        **frame.place(),
    }
    return list(frame.tile_rectangles(xy, tile_l0, world=False)), kwargs, "shapes"


def shapes_to_world_polygons(layer: Any, n_ellipse: int = 64) -> list[np.ndarray]:
    """Closed shapes of a napari Shapes layer as (K, 2) world (row, col) polygons.

    Rectangles and polygons keep their vertices, ellipses become `n_ellipse`-gons; lines and
    paths enclose no area and are left out. Vertices go through the layer's own data-to-world
    transform, so a shapes layer with its own scale or translate works too.
    """
    out = []
    for verts, kind in zip(layer.data, layer.shape_type, strict=True):
        if kind in ("line", "path"):
            continue
        world = np.array([layer.data_to_world(v) for v in np.asarray(verts)])[:, -2:]
        if kind == "ellipse":  # 4 corners of the (possibly rotated) bounding box
            c = world.mean(0)
            a, b = (world[1] - world[0]) / 2, (world[3] - world[0]) / 2
            t = np.linspace(0, 2 * np.pi, n_ellipse, endpoint=False)[:, None]
            world = c + np.cos(t) * a + np.sin(t) * b
        out.append(world)
    return out


def class_color(i: int) -> np.ndarray:
    return CLASS_COLORS[i % len(CLASS_COLORS)]


# -- putting layers in the viewer ---------------------------------------------------------------
def _layer_class(kind: str) -> Any:
    from napari.layers import Image, Labels, Shapes

    return {"image": Image, "labels": Labels, "shapes": Shapes}[kind]


def put_layers(viewer: Any, layers: Sequence[LayerData], role: str, slide: str) -> list[Any]:
    """`put_layer` each of `layers`; remove earlier layers of this `role` *and slide* (metadata
    ``tilescope.role`` / ``tilescope.slide``) that are not among them, so results of another
    slide stay; keep the user's active layer active."""
    names = {kw["name"] for _, kw, _ in layers}
    active = viewer.layers.selection.active
    for layer in list(viewer.layers):
        meta = layer.metadata.get("tilescope", {})
        if meta.get("role") == role and meta.get("slide") == slide and layer.name not in names:
            viewer.layers.remove(layer)
    out = [put_layer(viewer, ld) for ld in layers]
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active
    return out


def put_layer(viewer: Any, layer_data: LayerData) -> Any:
    """Add the layer, or update the one of the same name and kind in place; returns it."""
    data, kwargs, kind = layer_data
    kwargs = dict(kwargs)
    colorbar = bool(kwargs.pop("colorbar", False))
    name = kwargs["name"]
    old = viewer.layers[name] if name in viewer.layers else None
    if old is not None and not isinstance(old, _layer_class(kind)):
        viewer.layers.remove(old)  # a user's layer of another kind had the name
        old = None
    if old is None:
        return _add(viewer, data, kwargs, kind, colorbar)
    set_placement(old, kwargs)
    new_meta = kwargs["metadata"]["tilescope"]
    if kind == "shapes":
        old.data = []  # replace every shape; text and features follow the new data
        old.add(data, shape_type=kwargs["shape_type"], edge_width=kwargs["edge_width"],
                edge_color=kwargs["edge_color"], face_color=kwargs["face_color"])  # fmt: skip
        old.features = kwargs["features"]
        old.refresh_text()
    elif kind == "labels":
        same_classes = list(old.features.get("class", [])) == list(kwargs["features"]["class"])
        old.data = data
        old.features = kwargs["features"]
        if not same_classes:  # new classes: their colours (else the user's colours stay)
            old.colormap = kwargs["colormap"]
    else:
        before = old.metadata.get("tilescope", {}).get("auto_limits")
        untouched = before is not None and np.allclose(old.contrast_limits, before, atol=1e-6)
        old.data = data
        if untouched and not np.allclose(old.contrast_limits, kwargs["contrast_limits"]):
            old.contrast_limits = kwargs["contrast_limits"]
        else:  # the user's limits stay; remember ours as they were
            new_meta = {**new_meta, "auto_limits": before}
    old.metadata = {**old.metadata, "tilescope": new_meta}
    return old


def set_placement(layer: Any, placement: dict[str, Any]) -> None:
    """Set the layer's transform and units where they differ (each change makes napari
    recompute the viewer's extent: about 10 ms a key and layer)."""
    for key in PLACEMENT_KEYS:
        if key not in placement:
            continue
        new = placement[key]
        if key == "units":
            if [str(u) for u in layer.units] != [_unit(u) for u in new]:
                layer.units = new
            continue
        old = layer.affine.affine_matrix if key == "affine" else getattr(layer, key)
        if np.shape(old) != np.shape(new) or not np.allclose(old, new, rtol=0, atol=1e-12):
            setattr(layer, key, new)


def _unit(u: str) -> str:
    return "micrometer" if u == "µm" else str(u)


def _add(viewer: Any, data: Any, kwargs: dict[str, Any], kind: str, colorbar: bool) -> Any:
    from napari.layers import Layer, Points, Shapes

    layer = Layer.create(data, kwargs, kind)
    index = len(viewer.layers)
    if kind != "shapes":  # rasters go under drawn shapes and points, so those stay visible
        while index and isinstance(viewer.layers[index - 1], (Shapes, Points)):
            index -= 1
    viewer.layers.insert(index, layer)
    if colorbar and hasattr(layer, "colorbar"):  # napari >= 0.6: a colour bar on the canvas
        for other in viewer.layers:  # one bar at a time (the newest result's), never a row
            if "tilescope" in other.metadata and getattr(other, "colorbar", None) is not None:
                other.colorbar.visible = False
        layer.colorbar.visible = True
    return layer


# -- results follow their slide -----------------------------------------------------------------
_TRANSFORM_EVENTS = ("scale", "translate", "rotate", "shear", "affine")


def follow_slide(viewer: Any, slide_layer: Any) -> None:
    """Keep every result layer of `slide_layer` (metadata ``tilescope.slide`` = its path, with a
    ``local`` placement) on the slide when the slide layer is moved, scaled or transformed."""
    meta = slide_layer.metadata.get("tilescope", {})
    if meta.get("following") or "path" not in meta:
        return
    meta["following"] = True
    path = meta["path"]

    def replace(_: Any = None) -> None:
        frame = SlideFrame.of_layer(slide_layer)
        for layer in viewer.layers:
            m = layer.metadata.get("tilescope", {})
            local = m.get("local")
            if m.get("slide") != path or local is None:
                continue
            set_placement(layer, frame.place(local["scale"], local["offset"]))

    for name in _TRANSFORM_EVENTS:
        getattr(slide_layer.events, name).connect(replace)


def label_colors(layer: Any, n: int) -> list[np.ndarray]:
    """RGBA (0..1) of labels 1..n as the labels layer draws them (the user may recolour it)."""
    return [np.asarray(layer.colormap.map(np.array([i + 1]))).reshape(-1)[:4] for i in range(n)]
