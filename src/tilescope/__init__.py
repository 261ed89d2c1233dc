"""Tilescope: whole-slide pathology images in napari with BiomedCLIP patch embeddings.

For research use only, not for diagnosis.

The core modules import no napari and no Qt; torch is imported only when a model is used.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .errors import TilescopeError
from .slide import Slide

__all__ = ["Slide", "TilescopeError", "__version__", "embed_slide"]


def __getattr__(name: str) -> Any:  # lazy: importing tilescope must not import torch
    if name == "embed_slide":
        from .embed import embed_slide

        return embed_slide
    raise AttributeError(f"module 'tilescope' has no attribute {name!r}")
