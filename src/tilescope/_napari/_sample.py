"""File > Open Sample > Tilescope."""

from __future__ import annotations

from ..sample import sample_slide_path
from ._reader import LayerData, read_slides


def cmu_small_region() -> list[LayerData]:
    """CMU-1-Small-Region.svs (Aperio, H&E, 0.499 µm/px; OpenSlide test data, CC0)."""
    return read_slides(str(sample_slide_path()))
