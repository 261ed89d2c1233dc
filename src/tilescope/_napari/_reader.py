"""napari reader: any OpenSlide file as a lazy multiscale RGB image placed in micrometres."""

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


def read_slides(path: str | list[str]) -> list[LayerData]:
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    return [slide_layer_data(Slide(p)) for p in paths]


def slide_layer_data(slide: Slide, **overrides: Any) -> LayerData:
    """Layer data for a slide: multiscale, RGB, ``scale`` = mpp (µm) so overlays align."""
    info = slide.info()
    if slide.has_mpp:
        scale = (slide.mpp_y, slide.mpp_x)
        units = ("µm", "µm")
    else:
        warnings.warn(
            f"{slide.path}: no pixel size recorded; shown in pixels. Pass an mpp override to "
            "embed it.",
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
        "metadata": {"tilescope": {"path": str(slide.path), "info": info.as_dict()}},
    }
    kwargs.update(overrides)
    return slide.multiscale(), kwargs, "image"
