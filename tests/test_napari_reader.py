"""The napari reader and sample data in a real viewer (needs an X server: run under xvfb-run)."""

from __future__ import annotations

import numpy as np
import pytest
from _paths import CMU, TCGA, need

from tilescope._napari._reader import napari_get_reader

pytestmark = pytest.mark.napari


def tissue_fraction(rgb: np.ndarray) -> float:
    """Share of pixels that look like H&E tissue (pink/purple, not white, not black)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return float(((r - g > 25) & (b - g > 5) & (r < 250)).mean())


def test_reader_opens_slide_as_multiscale_in_micrometres(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(str(need(CMU)), plugin="tilescope")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.multiscale and layer.rgb
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert layer.data[0].shape == (2967, 2220, 3)
    assert layer.metadata["tilescope"]["info"]["vendor"] == "aperio"
    # the whole slide spans its physical size in world coordinates (µm)
    extent = layer.extent.world
    assert extent[1][0] - extent[0][0] == pytest.approx(2967 * 0.499, rel=1e-3)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.std() > 10, "blank screenshot"
    assert tissue_fraction(shot[..., :3]) > 0.05, "no tissue visible"


def test_sample_data_via_env(make_napari_viewer, monkeypatch):
    monkeypatch.setenv("TILESCOPE_SAMPLE_SLIDE", str(need(CMU)))
    viewer = make_napari_viewer()
    viewer.open_sample("tilescope", "cmu_small_region")
    assert viewer.layers[0].name == "CMU-1-Small-Region.svs"
    assert viewer.layers[0].multiscale


def test_slide_without_mpp_opens_in_pixels_and_says_where_to_give_it(make_napari_viewer):
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning, match="does not record its pixel size") as caught:
        layers = viewer.open(str(need(TCGA)), plugin="tilescope")
    assert tuple(layers[0].scale) == (1.0, 1.0)
    message = str(caught[0].message)
    assert "'slide µm/px'" in message and "--" not in message


def test_reader_takes_a_pixel_size_for_slides_without_one(make_napari_viewer):
    """Given (``mpp=``), or recorded in a store of this slide in the default stores folder
    (the value given when it was embedded): the slide opens in µm."""
    from tilescope._napari._reader import read_slides

    _, kwargs, _ = read_slides(str(need(TCGA)), mpp=0.25)[0]
    assert kwargs["scale"] == (0.25, 0.25) and kwargs["units"] == ("µm", "µm")
    assert kwargs["metadata"]["tilescope"]["mpp"] == 0.25
    _, kwargs, _ = read_slides(str(need(CMU)), mpp=0.25)[0]
    assert kwargs["scale"] == pytest.approx((0.499, 0.499))  # the file's own value wins


def test_reader_uses_the_pixel_size_given_when_embedding(make_napari_viewer, tmp_path, monkeypatch):
    from tilescope._napari._common import get_encoder
    from tilescope.embed import embed_slide
    from tilescope.grid import TileGrid

    stores = tmp_path / "stores"
    monkeypatch.setenv("TILESCOPE_STORES", str(stores))
    grid = TileGrid(target_mpp=4.0, tile_px=224)  # a few big tiles: quick
    embed_slide(need(TCGA), stores / "tcga.zarr", encoder=get_encoder("tiny-random"), grid=grid,
                slide_mpp=0.2525)  # fmt: skip
    viewer = make_napari_viewer()
    layer = viewer.open(str(TCGA), plugin="tilescope")[0]
    assert tuple(layer.scale) == pytest.approx((0.2525, 0.2525))
    assert str(layer.units[0]) == "micrometer"


def test_a_second_slide_opens_beside_the_first(make_napari_viewer):
    viewer = make_napari_viewer()
    first = viewer.open(str(need(CMU)), plugin="tilescope")[0]
    second = viewer.open(str(CMU), plugin="tilescope")[0]
    (f0, f1), (s0, s1) = (np.asarray(x.extent.world)[:, -2:] for x in (first, second))
    assert s0[1] > f1[1] and s0[0] == pytest.approx(f0[0])  # right of it, top-aligned
    assert s1[1] - s0[1] == pytest.approx(f1[1] - f0[1])


@pytest.mark.parametrize("content", [b"", b"not a slide", None])
def test_reader_returns_none_for_non_slides(tmp_path, content):
    path = tmp_path / "x.svs"
    if content is not None:
        path.write_bytes(content)
    assert napari_get_reader(str(path)) is None
    assert napari_get_reader(str(tmp_path / "image.png")) is None


def test_opening_reads_no_pixels(monkeypatch):
    """The reader builds lazy levels only; pixels are read when napari slices what it shows,
    in chunks of whole tiles (CMU's tiles are 240 px: chunks of 2 x 2 tiles)."""
    import threading

    from tilescope._napari._reader import read_slides
    from tilescope.slide import Slide

    calls = []
    real = Slide.read_region

    def counted(self, *a):
        if threading.current_thread() is threading.main_thread():  # not the prefetch thread
            calls.append(a)
        return real(self, *a)

    monkeypatch.setattr(Slide, "read_region", counted)
    data, kwargs, kind = read_slides(str(need(CMU)))[0]
    assert kind == "image" and kwargs["multiscale"] and calls == []
    tile = data[0][100:164, 200:264]  # napari asks for a region: only its chunk is read
    assert tile.shape == (64, 64, 3) and calls == [((0, 0), 0, (480, 480))]
    data[0].pyramid.close()
