"""Core results as napari layer data, placed in world coordinates over their slide layer.

No Qt here and no scoring: only geometry (level-0 pixels <-> world micrometres) and the
``(data, kwargs, layer_type)`` tuples napari's ``Viewer._add_layer_from_data`` understands,
plus `put_layer`, which updates a layer of the same name in place instead of adding another.

Coordinate convention (exact)
-----------------------------
Core coordinates are *level-0 corner coordinates* ``u``: level-0 pixel ``i`` covers
``[i, i + 1)``, a tile with top-left ``x`` covers ``[x, x + tile_l0)``. napari draws pixel
``i`` of a layer *centred* at ``translate + i * scale``. For a slide layer (scale = mpp) that
gives, per axis::

    world = translate + (u - 0.5) * scale        u = (world - translate) / scale + 0.5

so a tile's world bounds are ``translate + (x - 0.5) * scale`` to
``translate + (x + tile_l0 - 0.5) * scale`` and its centre
``translate + (x + tile_l0 / 2 - 0.5) * scale``. Heatmaps use the core's own
`~tilescope.raster.Heatmap.world_scale_translate` at 1 µm/px (i.e. in level-0 pixel units),
then this frame's scale and translate, so anisotropic pixels and translated slides stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..raster import Heatmap

LayerData = tuple[Any, dict[str, Any], str]

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


@dataclass(frozen=True)
class SlideFrame:
    """How a slide layer maps level-0 pixels to napari world coordinates (row, col order)."""

    scale: tuple[float, float]
    translate: tuple[float, float] = (0.0, 0.0)
    units: tuple[str, str] = ("pixel", "pixel")

    @classmethod
    def of_layer(cls, layer: Any) -> SlideFrame:
        sy, sx = (float(v) for v in layer.scale[-2:])
        ty, tx = (float(v) for v in layer.translate[-2:])
        uy, ux = (str(u) for u in layer.units[-2:])
        return cls((sy, sx), (ty, tx), (uy, ux))

    def world_to_l0(self, rc: np.ndarray) -> np.ndarray:
        """(K, 2) world (row, col) -> (K, 2) level-0 corner coordinates (x, y)."""
        rc = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
        u = (rc - np.asarray(self.translate)) / np.asarray(self.scale) + 0.5
        return u[:, ::-1]

    def l0_to_world(self, xy: ArrayLike) -> np.ndarray:
        """(K, 2) level-0 corner coordinates (x, y) -> (K, 2) world (row, col)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return np.asarray(self.translate) + (xy[:, ::-1] - 0.5) * np.asarray(self.scale)

    def tile_centres(self, xy: np.ndarray, tile_l0: float) -> np.ndarray:
        """(N, 2) world (row, col) centres of tiles with top-left corners `xy`."""
        return self.l0_to_world(np.asarray(xy, dtype=np.float64) + tile_l0 / 2)

    def tile_rectangles(self, xy: np.ndarray, tile_l0: float) -> np.ndarray:
        """(N, 4, 2) world (row, col) corners of tiles: top-left, top-right, bottom-right,
        bottom-left (napari's rectangle vertex order)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        t = float(tile_l0)
        offsets = np.array([[0, 0], [t, 0], [t, t], [0, t]])  # (dx, dy)
        corners = xy[:, None, :] + offsets[None]
        return self.l0_to_world(corners.reshape(-1, 2)).reshape(-1, 4, 2)

    def placement(self, hm: Heatmap) -> dict[str, Any]:
        """``scale`` and ``translate`` that put raster cell (i, j) exactly over its tiles."""
        (cy, cx), (oy, ox) = hm.world_scale_translate(1.0)  # level-0 pixel-index units
        sy, sx = self.scale
        ty, tx = self.translate
        return {
            "scale": (cy * sy, cx * sx),
            "translate": (ty + oy * sy, tx + ox * sx),
            "units": self.units,
        }


def heatmap_layer(
    hm: Heatmap,
    frame: SlideFrame,
    name: str,
    *,
    colormap: str = "inferno",
    contrast_limits: Sequence[float] | None = None,
    opacity: float = 0.6,
    visible: bool = True,
    metadata: dict[str, Any] | None = None,
) -> LayerData:
    """A float image of the raster; NaN (no tile) draws transparent."""
    if contrast_limits is None:
        contrast_limits = finite_limits(hm.raster)
    kwargs = {
        "name": name,
        "colormap": colormap,
        "contrast_limits": tuple(float(v) for v in contrast_limits),
        "opacity": opacity,
        "blending": "translucent",
        "interpolation2d": "nearest",
        "visible": visible,
        "metadata": {"tilescope": dict(metadata or {})},
        **frame.placement(hm),
    }
    return hm.raster, kwargs, "image"


def labels_layer(
    rasters: Sequence[Heatmap],
    classes: Sequence[str],
    frame: SlideFrame,
    name: str,
    *,
    opacity: float = 0.45,
    visible: bool = False,
    metadata: dict[str, Any] | None = None,
) -> LayerData:
    """Winning class per raster cell: label ``c + 1`` where class c's (averaged) value is
    highest, 0 where no tile is. ``features`` name each label (shown when hovering)."""
    stack = np.stack([h.raster for h in rasters])
    covered = np.all(np.isfinite(stack), axis=0)
    winner = np.argmax(np.where(np.isfinite(stack), stack, -np.inf), axis=0) + 1
    data = np.where(covered, winner, 0).astype(np.uint8 if len(classes) < 255 else np.uint16)
    from napari.utils.colormaps import DirectLabelColormap

    colors: dict[int | None, Any] = {0: np.zeros(4), None: np.zeros(4)}
    colors.update({i + 1: class_color(i) for i in range(len(classes))})
    kwargs = {
        "name": name,
        "opacity": opacity,
        "visible": visible,
        "colormap": DirectLabelColormap(color_dict=colors),
        "features": {"index": np.arange(1, len(classes) + 1), "class": list(classes)},
        "metadata": {"tilescope": dict(metadata or {})},
        **frame.placement(rasters[0]),
    }
    return data, kwargs, "labels"


def matches_layer(
    xy: np.ndarray,
    tile_l0: float,
    frame: SlideFrame,
    features: dict[str, Any],
    name: str,
    *,
    metadata: dict[str, Any] | None = None,
) -> LayerData:
    """Rectangles of matching tiles in world coordinates, numbered by ``features["rank"]``."""
    rects = list(frame.tile_rectangles(xy, tile_l0))
    width = 0.04 * float(np.mean(frame.scale)) * tile_l0
    kwargs = {
        "name": name,
        "shape_type": "rectangle",
        "edge_color": "cyan",
        "face_color": "transparent",
        "edge_width": width,
        "features": features,
        "text": {"string": "{rank}", "color": "cyan", "size": 10, "anchor": "upper_left"},
        "metadata": {"tilescope": dict(metadata or {})},
        "units": frame.units,
    }
    return rects, kwargs, "shapes"


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


def finite_limits(values: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite values, widened if they are equal; (0, 1) if there are none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        pad = max(abs(lo) * 0.01, 1e-6)
        lo, hi = lo - pad, hi + pad
    return lo, hi


#: Layer properties `put_layer` updates in place (everything else stays as the user set it).
_UPDATABLE = {
    "image": ("scale", "translate", "contrast_limits", "metadata"),
    "labels": ("scale", "translate", "colormap", "features", "metadata"),
    "shapes": ("features", "metadata", "edge_width"),
}


def put_layers(viewer: Any, layers: Sequence[LayerData], role: str) -> list[Any]:
    """`put_layer` each of `layers`; remove earlier layers of this `role` (metadata
    ``tilescope.role``) that are not among them; keep the user's active layer active."""
    names = {kw["name"] for _, kw, _ in layers}
    active = viewer.layers.selection.active
    for layer in list(viewer.layers):
        if layer.metadata.get("tilescope", {}).get("role") == role and layer.name not in names:
            viewer.layers.remove(layer)
    added = [put_layer(viewer, ld) for ld in layers]
    if active is not None and active in viewer.layers:
        viewer.layers.selection.active = active
    return added


def put_layer(viewer: Any, layer_data: LayerData) -> Any:
    """Add the layer, or update the one of the same name and type in place; returns it.

    In place means new data, placement, contrast limits, features and metadata; the user's
    visibility, opacity, colormap and blending choices are kept.
    """
    data, kwargs, kind = layer_data
    name = kwargs["name"]
    old = viewer.layers[name] if name in viewer.layers else None
    if old is None or type(old).__name__.lower() != kind:
        if old is not None:
            viewer.layers.remove(old)
        from napari.layers import Layer, Points, Shapes

        layer = Layer.create(data, kwargs, kind)
        index = len(viewer.layers)
        if kind != "shapes":  # rasters go under drawn shapes and points, so those stay visible
            while index and isinstance(viewer.layers[index - 1], (Shapes, Points)):
                index -= 1
        viewer.layers.insert(index, layer)
        return layer
    if kind == "shapes":
        old.data = []  # replace every shape; text and features follow the new data
        old.add(data, shape_type=kwargs["shape_type"], edge_width=kwargs["edge_width"],
                edge_color=kwargs["edge_color"], face_color=kwargs["face_color"])  # fmt: skip
        old.features = kwargs["features"]
        old.refresh_text()
    else:
        for key in ("units", "scale", "translate"):
            setattr(old, key, kwargs[key])
        old.data = data
    for key in _UPDATABLE[kind]:
        if key in kwargs and key not in ("units", "scale", "translate"):
            setattr(old, key, kwargs[key])
    return old
