"""File > Open Sample > Tilescope."""

from __future__ import annotations

from ..sample import sample_slide_path
from ..slide import Slide
from ._reader import LayerData, slide_layer_data


def cmu_small_region() -> list[LayerData]:
    """CMU-1-Small-Region.svs (Aperio, H&E, 0.499 µm/px; OpenSlide test data, CC0)."""
    return [slide_layer_data(Slide(sample_slide_path()))]
