"""A classifier's prediction as napari layer data (no Qt): heatmaps, classes, uncertainty,
training tiles. Placement goes through `SlideFrame`, as every other Tilescope result; names
carry the slide's name."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..figures import ColorScale
from ..raster import TileGeometry, heatmap
from ._common import UNTRAINED_TAG
from ._layers import LayerData, SlideFrame, heatmap_layer, labels_layer, result_name

#: Layer name prefix of every classifier result (distinct from the prompt heatmaps').
PREFIX = "classifier"
#: Uncertainty: 0 sure to 1 undecided, on a fixed scale.
UNCERTAINTY = ColorScale("uncertainty (0 sure, 1 undecided)", "magma", 0.0, 1.0, True)


def result_layers(
    store: Any, pred: Any, data: Any, frame: SlideFrame, role: str
) -> list[LayerData]:
    """One probability heatmap per class (hidden; fixed 0-1), the winning class as labels in
    the class colours (shown), the uncertainty (hidden; 0 sure - 1 undecided) and, when
    trained here, the training tiles outlined in their class colour (shown)."""
    tag = "" if pred.trained_model else UNTRAINED_TAG
    meta = frame.meta(role, store=str(store.path))
    geom = TileGeometry.from_store(store)
    rasters = [heatmap(pred.probs[:, j], geom) for j in range(len(pred.classes))]
    layers = [
        heatmap_layer(hm, frame, result_name(f"{PREFIX} P({c})", frame, tag),
                      ColorScale.probability(), visible=False, metadata={**meta, "class": c})
        for hm, c in zip(rasters, pred.classes, strict=True)
    ]  # fmt: skip
    colors = [np.r_[np.asarray(c[:3]) / 255, 1.0] for c in pred.colors]
    layers.append(labels_layer(rasters, pred.classes, frame,
                               result_name(f"{PREFIX}: class", frame, tag), colors=colors,
                               visible=True, metadata=meta))  # fmt: skip
    unc = heatmap(pred.uncertainty, geom)
    layers.append(heatmap_layer(unc, frame, result_name(f"{PREFIX} uncertainty", frame, tag),
                                UNCERTAINTY, visible=False, metadata=meta))  # fmt: skip
    if data is not None and len(data.indices):
        name = result_name(f"{PREFIX} training tiles", frame)
        layers.append(training_tiles_layer(store, data, frame, name, meta))
    return layers


def training_tiles_layer(
    store: Any, data: Any, frame: SlideFrame, name: str, meta: dict[str, Any]
) -> LayerData:
    """Rectangles of the training tiles (in the slide's frame), outlined in their class colour."""
    xy = np.asarray(store.coords)[data.indices]
    rects = list(frame.tile_rectangles(xy, store.tile_l0, world=False))
    rgb = np.asarray(data.colors, dtype=float)[data.labels] / 255
    edge = np.concatenate([rgb, np.ones((len(rgb), 1))], axis=1)
    kwargs = {
        "name": name,
        "shape_type": "rectangle",
        "edge_color": edge,
        "face_color": "transparent",
        "edge_width": 0.05 * store.tile_l0,  # data units: level-0 pixels
        "features": {
            "class": [data.classes[k] for k in data.labels],
            "region": np.asarray(data.groups, dtype=np.int64),
        },
        "metadata": {"tilescope": {**meta, "local": frame.local()}},
        **frame.place(),
    }
    return rects, kwargs, "shapes"
