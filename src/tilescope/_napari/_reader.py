"""napari reader: any OpenSlide file as a lazy multiscale RGB image placed in micrometres.

A slide that records no pixel size is shown in µm too when its pixel size is known otherwise:
given to `read_slides` (``mpp=``), or recorded in a store of this slide in the default stores
folder or a folder used this session (the value the user gave when embedding it). Else it opens
in pixels, with a warning saying where to give the pixel size (the Embed widget's *slide
µm/px*).

A slide opened into a viewer that already shows slides is placed to the right of them, not on
top (`tilescope._napari._slides.beside`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import TilescopeError
from ..slide import SLIDE_SUFFIXES, Slide

LayerData = tuple[Any, dict[str, Any], str]


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return a reader if every path is a slide OpenSlide can open, else ``None``.

    ``None`` lets napari try other readers; it never raises for a file it cannot read.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(str(p).lower().endswith(SLIDE_SUFFIXES) for p in paths):
        return None
    try:
        for p in paths:
            Slide(p).close()
    except TilescopeError:
        return None
    return read_slides


def read_slides(path: str | list[str], mpp: float | None = None) -> list[LayerData]:
    """Layer data of each slide, placed right of the slides already in the current viewer;
    `mpp` (µm/px) is used for slides that do not record their own."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    out: list[LayerData] = []
    placed = _open_slide_bounds()
    for p in paths:
        data, kwargs, kind = slide_layer_data(_open(p, mpp))
        if placed:
            from ._slides import beside

            size = _world_size(data[0].shape, kwargs["scale"])
            top, left = beside(placed, size)
            kwargs["translate"] = (top, left)
        placed.append(_bounds(kwargs, data[0].shape))
        out.append((data, kwargs, kind))
    return out


def _open(path: str | Path, mpp: float | None) -> Slide:
    """The slide, with `mpp` or a pixel size recorded for it in a store when it has none."""
    slide = Slide(path)
    if slide.has_mpp:
        return slide
    given = mpp or _mpp_from_stores(path)
    if given:
        slide.close()
        return Slide(path, mpp=given)
    return slide


def _mpp_from_stores(path: str | Path) -> float | None:
    """The level-0 µm/px recorded in a store of this slide (default stores folder, and the
    folders used this session)."""
    try:
        from ..catalog import read_signature, stores_for_slide
        from ._stores import folders

        for store in stores_for_slide(path, folders()):
            mpp = (read_signature(store) or {}).get("level0_mpp") or [None]
            if mpp[0]:
                return float(mpp[0])
    except (OSError, ValueError, TypeError):
        return None
    return None


def slide_layer_data(slide: Slide, **overrides: Any) -> LayerData:
    """Layer data for a slide: multiscale, RGB, ``scale`` = mpp (µm) so overlays align."""
    info = slide.info()
    meta: dict[str, Any] = {"path": str(slide.path), "info": info.as_dict()}
    if slide.has_mpp:
        scale = (slide.mpp_y, slide.mpp_x)
        units = ("µm", "µm")
        if slide.mpp_source != "slide":
            meta["mpp"] = slide.mpp_x  # given by the user: embedding uses it too
    else:
        warnings.warn(
            f"{slide.path.name}: the slide does not record its pixel size, so it is shown in "
            "pixels. Give it in Plugins > Tilescope > Embed slide, 'slide µm/px' (e.g. 0.25 "
            "for a 40x scan): it is then shown in µm beside the other slides.",
            stacklevel=2,
        )
        scale, units = (1.0, 1.0), ("pixel", "pixel")
    kwargs: dict[str, Any] = {
        "name": slide.name,
        "rgb": True,
        "multiscale": True,
        "contrast_limits": (0, 255),
        "scale": scale,
        "units": units,
        "metadata": {"tilescope": meta},
    }
    kwargs.update(overrides)
    return slide.multiscale(), kwargs, "image"


def _open_slide_bounds() -> list[Any]:
    """World bounds of the Tilescope slide layers of the current viewer (none without one)."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no Qt application, no viewer
        return []
    if viewer is None:
        return []
    from ._slides import slide_layers, world_bounds

    return [world_bounds(ly) for ly in slide_layers(viewer)]


def _world_size(shape: tuple[int, ...], scale: Any) -> tuple[float, float]:
    return float(shape[0] * scale[0]), float(shape[1] * scale[1])


def _bounds(kwargs: dict[str, Any], shape: tuple[int, ...]) -> Any:
    import numpy as np

    (sy, sx), (ty, tx) = kwargs["scale"], kwargs.get("translate", (0.0, 0.0))
    return np.array([[ty - sy / 2, tx - sx / 2], [ty + (shape[0] - 0.5) * sy,
                                                  tx + (shape[1] - 0.5) * sx]])  # fmt: skip
