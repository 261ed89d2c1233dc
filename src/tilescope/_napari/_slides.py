"""Slide layers in a viewer: which are Tilescope's, where a new one goes, a pixel size given by
the user, slides opened by another reader, and finding the file of a slide seen in a store.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TilescopeError
from ..slide import SLIDE_SUFFIXES

#: Gap between slides placed side by side, as a fraction of the wider one.
GAP = 0.05


def slide_layers(viewer: Any) -> list[Any]:
    """Image layers opened by Tilescope's reader (they carry the slide path in metadata)."""
    return [ly for ly in viewer.layers if "path" in ly.metadata.get("tilescope", {})]


def slide_choices(viewer: Any) -> Callable[..., list[tuple[str, Any]]]:
    """A magicgui ``choices`` callback listing `viewer`'s slide layers as (name, layer)."""

    def choices(_: Any = None) -> list[tuple[str, Any]]:
        return [(ly.name, ly) for ly in slide_layers(viewer)]

    return choices


def is_foreign_slide(layer: Any) -> bool:
    """A layer of a slide file opened by another reader (napari's built-in one loads the whole
    image into memory, in pixels, without the slide's metadata)."""
    if "path" in layer.metadata.get("tilescope", {}):
        return False
    source = getattr(layer, "source", None)
    path = str(getattr(source, "path", None) or "")
    return path.lower().endswith(SLIDE_SUFFIXES) and getattr(source, "reader_plugin", None) != (
        "tilescope"
    )


def foreign_slides(viewer: Any) -> list[Any]:
    """The layers of `viewer` for which `is_foreign_slide` holds."""
    return [layer for layer in viewer.layers if is_foreign_slide(layer)]


def no_slide_error(viewer: Any) -> TilescopeError:
    """The error for "no Tilescope slide here", saying what to do (also about foreign ones)."""
    foreign = foreign_slides(viewer)
    if foreign:
        return TilescopeError(
            f"{foreign[0].name} was opened by napari's built-in reader, without the slide's "
            "metadata: re-open it with Tilescope (File > Open, choose Tilescope)"
        )
    return TilescopeError("open a slide first (File > Open, or File > Open Sample > Tilescope)")


def reopen_with_tilescope(viewer: Any, layer: Any) -> list[Any]:
    """Replace a slide layer opened by another reader with Tilescope's, at the same place in
    the layer list."""
    path = str(layer.source.path)
    index = list(viewer.layers).index(layer)
    viewer.layers.remove(layer)
    new = viewer.open(path, plugin="tilescope")
    for k, added in enumerate(new):
        viewer.layers.move(list(viewer.layers).index(added), index + k)
    return new


def watch_viewer(viewer: Any) -> None:
    """Once per viewer: offer to re-open slides that another reader opened, and keep result
    layers on their slide when it moves (`follow_slide`)."""
    from ._layers import follow_slide
    from ._messages import notify_action

    key = getattr(viewer, "__wrapped__", viewer)  # the viewer, not napari's proxy of it
    if key in _WATCHED:
        return
    _WATCHED.add(key)

    def on_inserted(event: Any) -> None:
        layer = event.value
        if "path" in layer.metadata.get("tilescope", {}):
            follow_slide(viewer, layer)
        elif is_foreign_slide(layer):
            notify_action(
                f"{layer.name} was opened by napari's built-in reader: the whole image in "
                "memory, in pixels, without the slide's pixel size. Tilescope's reader opens "
                "it lazily, in µm, for embedding and heatmaps.",
                [("Re-open with Tilescope", lambda: reopen_with_tilescope(viewer, layer))],
                severity="warning",
            )

    viewer.layers.events.inserted.connect(on_inserted)
    for layer in slide_layers(viewer):
        follow_slide(viewer, layer)


_WATCHED: weakref.WeakSet[Any] = weakref.WeakSet()


# -- placement ----------------------------------------------------------------------------------
def world_bounds(layer: Any) -> np.ndarray:
    """(2, 2) world [[min row, min col], [max row, max col]] of a 2D layer."""
    ext = np.asarray(layer.extent.world, dtype=float)[:, -2:]
    return np.array([ext.min(0), ext.max(0)])


def beside(existing: Iterable[np.ndarray], size: tuple[float, float]) -> tuple[float, float]:
    """The world (row, col) translate that puts a slide of world `size` (rows, cols) right of
    the slides whose bounds are `existing`, top-aligned with them; (0, 0) if there are none."""
    boxes = list(existing)
    if not boxes:
        return 0.0, 0.0
    top = min(float(b[0, 0]) for b in boxes)
    right = max(float(b[1, 1]) for b in boxes)
    widest = max([float(b[1, 1] - b[0, 1]) for b in boxes] + [size[1]])
    return top, right + GAP * widest


def place_beside(viewer: Any, layer: Any) -> None:
    """Move the slide `layer` right of the viewer's other slide layers (if it overlaps them)."""
    others = [world_bounds(ly) for ly in slide_layers(viewer) if ly.name != layer.name]
    if not others:
        return
    b = world_bounds(layer)
    if not any(_overlap(b, o) for o in others):
        return
    top, left = beside(others, (b[1, 0] - b[0, 0], b[1, 1] - b[0, 1]))
    ty, tx = (float(v) for v in layer.translate[-2:])
    layer.translate = (ty + top - b[0, 0], tx + left - b[0, 1])


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a[0] < b[1]) and np.all(b[0] < a[1]))


def set_slide_mpp(viewer: Any, layer: Any, mpp: float) -> None:
    """Show a slide that records no pixel size at `mpp` µm/px (in µm, beside the others)."""
    meta = layer.metadata["tilescope"]
    if meta.get("info", {}).get("mpp_source") == "slide":
        return  # the file's own pixel size wins (the Embed widget's override is for embedding)
    if meta.get("mpp") == mpp:
        return
    meta["mpp"] = float(mpp)
    layer.scale = (float(mpp), float(mpp))
    layer.units = ("µm", "µm")
    place_beside(viewer, layer)


# -- finding a slide's file ---------------------------------------------------------------------
def find_slide_file(
    slide_sig: dict[str, Any], viewer: Any, extra_folders: Iterable[Path] = ()
) -> Path | None:
    """The file of the slide described by a store signature's ``slide`` entry: an open slide
    layer's file, or a file of that name (and identity) in the folders of open slides or in
    `extra_folders`. None if not found."""
    from ._stores import slide_identity

    def same(p: Path) -> bool:
        try:
            ident = slide_identity(p)
        except OSError:
            return False
        return all(ident.get(k) == slide_sig.get(k) for k in ("size_bytes", "header_sha256"))

    open_paths = [Path(ly.metadata["tilescope"]["path"]) for ly in slide_layers(viewer)]
    for p in open_paths:
        if same(p):
            return p
    name = str(slide_sig.get("name", ""))
    if not name:
        return None
    seen: set[Path] = set()
    for folder in [*(p.parent for p in open_paths), *extra_folders]:
        for cand in (folder / name, folder.parent / name):
            if cand in seen:
                continue
            seen.add(cand)
            if cand.is_file() and same(cand):
                return cand
    return None


def layer_of_file(viewer: Any, path: Path) -> Any:
    """The Tilescope slide layer showing the file `path`, if one is open."""
    for ly in slide_layers(viewer):
        if Path(ly.metadata["tilescope"]["path"]).resolve() == path.resolve():
            return ly
    return None
