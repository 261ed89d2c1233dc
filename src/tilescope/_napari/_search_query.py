"""The Region search widget's query regions from a shapes layer, in level-0 pixels.

A layer drawn in napari gives its shapes as polygons, as before. A layer with QuPath classes
or holes (QuPath GeoJSON opened with Tilescope's reader: one shape per ring, features
``class``, ``object`` and ``hole``) gives its regions through `layer_regions`: the rings of
one QuPath object joined, its holes cut out, and only the chosen class, as ``tilescope search
--region-geojson FILE --region-class NAME`` does.
"""

from __future__ import annotations

from typing import Any

from ..errors import SearchError
from ._geojson_reader import align_to_slide, layer_regions
from ._layers import SlideFrame, shapes_to_world_polygons

#: The class combo's entry for "every class" (its value is None).
ANY_CLASS = "(every class)"


def has_classes(layer: Any) -> bool:
    """True for a shapes layer whose shapes carry QuPath classes or holes."""
    feats = getattr(layer, "features", None)
    return feats is not None and ("class" in feats or "hole" in feats)


def class_choices(layer: Any) -> list[tuple[str, str | None]]:
    """(label, value) of the class combo for `layer`: every class first, then its classes."""
    names: list[str] = []
    if layer is not None and has_classes(layer) and "class" in layer.features:
        names = sorted({str(c) for c in layer.features["class"] if str(c)})
    return [(ANY_CLASS, None), *((n, n) for n in names)]


def query_regions(
    layer: Any,
    slide: Any,
    cls: str | None = None,
    skip: tuple[str | None, ...] = (),
) -> list[Any]:
    """Level-0 regions of `layer` over the slide layer `slide`.

    Drawn layers: their closed shapes as (K, 2) polygons (`cls` does not apply). Layers with
    QuPath classes or holes: shapely regions with holes cut out, of class `cls` (None: every
    class, unclassified shapes too, except the classes in `skip`).

    Raises
    ------
    SearchError
        `cls` is not a class of the layer (the message lists its classes).
    """
    frame = SlideFrame.of_layer(slide)
    if not has_classes(layer):
        return [frame.world_to_l0(p) for p in shapes_to_world_polygons(layer)]
    align_to_slide(layer, slide)  # opened before the slide: placed over it now
    regions = layer_regions(layer, frame, default_class="")
    if cls is not None:
        if cls not in regions:
            have = ", ".join(repr(c) for c in regions if c) or "none"
            raise SearchError(
                f"the layer {layer.name!r} has no region of class {cls!r} (classes: {have})"
            )
        return list(regions[cls])
    return [g for c, geoms in regions.items() if c not in skip for g in geoms]
