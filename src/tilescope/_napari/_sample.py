"""File > Open Sample > Tilescope."""

from __future__ import annotations

import warnings

from ..sample import sample_or_synthetic
from ._reader import LayerData, read_slides


def cmu_small_region() -> list[LayerData]:
    """CMU-1-Small-Region.svs (Aperio, H&E, 0.499 µm/px; OpenSlide test data, CC0), or a
    synthetic slide, with a warning saying why, when it is not cached and Tilescope is offline
    (``TILESCOPE_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) or the download fails."""
    path, why = sample_or_synthetic()
    if why:
        warnings.warn(why, UserWarning, stacklevel=2)
    return read_slides(str(path))
