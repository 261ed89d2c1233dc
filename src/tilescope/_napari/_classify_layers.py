"""A classifier's prediction as napari layer data (no Qt): heatmaps, classes, uncertainty,
training tiles. Placement goes through `SlideFrame`, as every other Tilescope result."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..raster import TileGeometry, heatmap
from ._common import UNTRAINED_TAG
from ._layers import LayerData, SlideFrame, heatmap_layer, labels_layer

#: Layer name prefix of every classifier result (distinct from the prompt heatmaps').
PREFIX = "classifier"


def result_layers(
    store: Any, pred: Any, data: Any, frame: SlideFrame, role: str
) -> list[LayerData]:
    """One probability heatmap per class (hidden; fixed 0-1), the winning class as labels in
    the class colours (shown), the uncertainty (hidden; 0 sure - 1 undecided) and, when
    trained here, the training tiles outlined in their class colour (shown)."""
    from napari.utils.colormaps import DirectLabelColormap

    tag = "" if pred.trained_model else UNTRAINED_TAG
    meta = {"role": role, "store": str(store.path)}
    geom = TileGeometry.from_store(store)
    rasters = [heatmap(pred.probs[:, j], geom) for j in range(len(pred.classes))]
    layers = [
        heatmap_layer(hm, frame, f"{PREFIX} P({c}){tag}", colormap="inferno",
                      contrast_limits=(0.0, 1.0), visible=False, metadata={**meta, "class": c})
        for hm, c in zip(rasters, pred.classes, strict=True)
    ]  # fmt: skip
    classes = labels_layer(rasters, pred.classes, frame, f"{PREFIX}: class{tag}", visible=True,
                           metadata=meta)  # fmt: skip
    colors: dict[int | None, Any] = {0: np.zeros(4), None: np.zeros(4)}
    colors.update({j + 1: np.r_[np.asarray(c[:3]) / 255, 1.0] for j, c in enumerate(pred.colors)})
    classes[1]["colormap"] = DirectLabelColormap(color_dict=colors)
    layers.append(classes)
    unc = heatmap(pred.uncertainty, geom)
    name = f"{PREFIX} uncertainty{tag}"
    layers.append(heatmap_layer(unc, frame, name, colormap="magma", contrast_limits=(0.0, 1.0),
                                visible=False, metadata=meta))  # fmt: skip
    if data is not None and len(data.indices):
        layers.append(training_tiles_layer(store, data, frame, f"{PREFIX} training tiles", meta))
    return layers


def training_tiles_layer(
    store: Any, data: Any, frame: SlideFrame, name: str, meta: dict[str, Any]
) -> LayerData:
    """Rectangles of the training tiles, outlined in their class colour."""
    xy = np.asarray(store.coords)[data.indices]
    rects = list(frame.tile_rectangles(xy, store.tile_l0))
    rgb = np.asarray(data.colors, dtype=float)[data.labels] / 255
    edge = np.concatenate([rgb, np.ones((len(rgb), 1))], axis=1)
    kwargs = {
        "name": name,
        "shape_type": "rectangle",
        "edge_color": edge,
        "face_color": "transparent",
        "edge_width": 0.05 * float(np.mean(frame.scale)) * store.tile_l0,
        "features": {
            "class": [data.classes[k] for k in data.labels],
            "region": np.asarray(data.groups, dtype=np.int64),
        },
        "metadata": {"tilescope": dict(meta)},
        "units": frame.units,
    }
    return rects, kwargs, "shapes"
