"""The PNG figures use the colours, ranges and legend napari's layers use (`ColorScale`)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tilescope.figures import ColorScale, colorize, score_figure, similarity_figure
from tilescope.raster import TileGeometry, heatmap
from tilescope.score import PatchScores, PoolResult
from tilescope.synthetic import SyntheticSlide


@pytest.mark.parametrize("name", ["inferno", "turbo"])
def test_png_colours_are_napari_colours(name):
    from napari.utils.colormaps import ensure_colormap

    t = np.linspace(0, 1, 101)
    ours = colorize(t, 0.0, 1.0, name).astype(int)
    theirs = np.round(ensure_colormap(name).map(t)[:, :3] * 255).astype(int)
    assert np.abs(ours - theirs).max() <= 7  # the same ramp, linearly interpolated


def test_scales_and_legends():
    p = ColorScale.probability()
    assert (p.colormap, p.limits, p.fixed) == ("inferno", (0.0, 1.0), True)
    assert p.legend().startswith("probability, fixed scale: 0 (black) to 1 (yellow)")
    s = ColorScale.stretched(np.array([np.nan, 0.2, 0.8]))
    assert (s.colormap, s.limits, s.fixed) == ("turbo", (0.2, 0.8), False)
    assert "stretched to this map: 0.2 (dark blue) to 0.8 (dark red)" in s.legend()


@pytest.fixture
def slide_and_store(tmp_path):
    """A synthetic slide and a stand-in store: 4 x 3 tiles of 256 level-0 px."""
    path = SyntheticSlide.with_random_blobs(1024, 768, mpp=0.5, n=2, seed=4).write(
        tmp_path / "s.tif"
    )
    rc = np.array([(r, c) for r in range(3) for c in range(4)])

    class Store:
        grid_rc = rc
        signature = {
            "grid": {"tile_px": 256, "overlap_px": 0},
            "layout": {"origin": [0, 0], "downsample": 1.0, "grid_shape": [3, 4]},
        }

    return path, Store()


def picture(png) -> np.ndarray:
    """The figure above its caption (the slide's 1024 x 768 thumbnail), as floats."""
    return np.asarray(Image.open(png).convert("RGB"))[:768, :1024].astype(float)


def thumbnail(slide) -> np.ndarray:
    from tilescope.slide import Slide

    with Slide(slide) as s:
        return s.thumbnail(1024)[..., :3].astype(float)


def test_score_figure_draws_probabilities_on_the_fixed_scale(slide_and_store, tmp_path):
    """P = 0.3 and 0.5 are drawn as 0.3 and 0.5 of the 0-1 scale, as napari draws them (a
    stretched scale would have drawn 0.5 as the brightest colour)."""
    slide, store = slide_and_store
    probs = np.full((12, 2), 0.3, np.float32)
    probs[11] = 0.5
    scores = PatchScores(["a", "b"], probs, probs, probs, 1.0)
    pooled = PoolResult("a", {"a": 0.5, "b": 0.5}, "mean")
    out = score_figure(slide, store, scores, pooled, tmp_path / "h.png")
    img, base = picture(out), thumbnail(slide)
    for tile, p in ((0, 0.3), (11, 0.5)):
        y, x = (tile // 4) * 256 + 128, (tile % 4) * 256 + 128
        fixed = colorize(np.array([p]), 0.0, 1.0, "inferno")[0]
        stretched = colorize(np.array([p]), 0.3, 0.5, "inferno")[0]
        assert np.abs(fixed.astype(int) - stretched.astype(int)).max() > 40
        assert np.abs(img[y, x] - (0.4 * base[y, x] + 0.6 * fixed)).max() <= 3


def test_similarity_figure_uses_the_stretched_turbo_scale(slide_and_store, tmp_path):
    slide, store = slide_and_store
    sim = np.linspace(0.1, 0.9, 12)
    sim[3] = np.nan  # a tile not embedded: left uncoloured
    out = similarity_figure(slide, store, sim, tmp_path / "s.png")
    img, base = picture(out), thumbnail(slide)
    scale = ColorScale.stretched(heatmap(sim, TileGeometry.from_store(store)).raster)
    assert scale.limits == pytest.approx((0.1, 0.9))
    top = colorize(np.array([0.9]), *scale.limits, "turbo")[0]  # tile 11
    y, x = 2 * 256 + 128, 3 * 256 + 128
    assert np.abs(img[y, x] - (0.4 * base[y, x] + 0.6 * top)).max() <= 3
    assert np.abs(img[128, 3 * 256 + 128] - base[128, 3 * 256 + 128]).max() <= 3  # tile 3
