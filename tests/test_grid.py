"""Tile grid: validation, mpp-aware geometry, exact coordinates, edges, tiny and empty slides."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from _paths import CMU, TCGA, need

from tilescope.errors import GridError, MissingMppError
from tilescope.grid import TileGrid, TileLayout
from tilescope.slide import Slide
from tilescope.tissue import NoTissueWarning, tissue_mask


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_mpp": 0}, "target_mpp"),
        ({"target_mpp": -0.5}, "target_mpp"),
        ({"target_mpp": math.nan}, "target_mpp"),
        ({"target_mpp": "0.5"}, "target_mpp"),
        ({"tile_px": 0}, "tile_px"),
        ({"tile_px": 224.0}, "tile_px"),
        ({"tile_px": True}, "tile_px"),
        ({"overlap_px": -1}, "overlap_px"),
        ({"overlap_px": 224}, "overlap_px"),
        ({"min_tissue": -0.1}, "min_tissue"),
        ({"min_tissue": 1.5}, "min_tissue"),
    ],
)
def test_invalid_grid(kwargs: dict, match: str) -> None:
    with pytest.raises(GridError, match=match):
        TileGrid(**kwargs)


def test_grid_parameters() -> None:
    grid = TileGrid(target_mpp=0.5, tile_px=256, overlap_px=32, min_tissue=0.5)
    assert grid.stride_px == 224
    assert grid.tile_um == 128.0
    assert grid.as_dict() == {
        "target_mpp": 0.5, "tile_px": 256, "overlap_px": 32, "stride_px": 224,
        "min_tissue": 0.5, "edge_policy": "pad-white-inside",
    }  # fmt: skip
    assert TileGrid() == TileGrid(0.5, 224, 0, 0.25)
    with pytest.raises(dataclasses.FrozenInstanceError):
        grid.tile_px = 128  # type: ignore[misc]


def _check_invariants(layout: TileLayout) -> None:
    assert layout.coords.dtype == np.int64 and layout.coords.shape == (len(layout), 2)
    assert layout.grid_rc.dtype == np.int32 and layout.grid_rc.shape == (len(layout), 2)
    assert layout.tissue.dtype == np.float32 and layout.tissue.shape == (len(layout),)
    expected = np.asarray(layout.origin) + np.rint(layout.grid_rc[:, ::-1] * layout.stride_l0)
    np.testing.assert_array_equal(layout.coords, expected.astype(np.int64))
    # row-major, each cell once
    flat = layout.grid_rc[:, 0].astype(np.int64) * layout.grid_shape[1] + layout.grid_rc[:, 1]
    assert np.all(np.diff(flat) > 0)
    assert np.all(layout.grid_rc >= 0) and np.all(layout.grid_rc < layout.grid_shape)


@pytest.mark.parametrize(
    ("name", "downsample"), [("synth_05", 1.0), ("synth_025", 2.0), ("synth_0263", 0.5 / 0.2631)]
)
def test_tiles_cover_the_same_physical_area(name, downsample, request) -> None:
    sf = request.getfixturevalue(name)
    with Slide(sf.path) as slide:
        layout = TileGrid(target_mpp=0.5, tile_px=224).layout(slide, tissue_mask(slide))
    assert layout.downsample == pytest.approx(downsample)
    assert layout.tile_l0 * sf.spec.mpp == pytest.approx(112.0)  # µm, whatever the base mpp
    assert layout.stride_l0 == layout.tile_l0
    assert layout.origin == (0, 0)
    assert len(layout) > 0
    _check_invariants(layout)


def test_same_grid_at_two_base_resolutions(synth_05, synth_025) -> None:
    """The same tissue scanned at 0.5 and 0.25 µm/px gives the same tiles in µm."""
    layouts = []
    for sf in (synth_05, synth_025):
        with Slide(sf.path) as slide:
            layouts.append((TileGrid().layout(slide, tissue_mask(slide)), sf.spec.mpp))
    (a, mpp_a), (b, mpp_b) = layouts
    assert a.grid_shape == b.grid_shape
    np.testing.assert_array_equal(a.grid_rc, b.grid_rc)
    np.testing.assert_array_equal(a.coords * mpp_a, b.coords * mpp_b)
    np.testing.assert_allclose(a.tissue, b.tissue, atol=0.05)


def test_tissue_fraction_matches_truth(synth_025) -> None:
    spec = synth_025.spec
    with Slide(synth_025.path) as slide:
        layout = TileGrid(min_tissue=0.0).layout(slide, tissue_mask(slide))
    assert len(layout) == layout.grid_shape[0] * layout.grid_shape[1]  # min_tissue=0 keeps all
    # true fraction from 16 x 16 samples per tile (outside the slide counts as glass)
    offs = (np.arange(16) + 0.5) / 16 * layout.tile_l0
    x = layout.coords[:, 0, None, None] + offs[None, None, :]
    y = layout.coords[:, 1, None, None] + offs[None, :, None]
    inside = (x < spec.width) & (y < spec.height)
    truth = (spec.tissue_truth(x * spec.mpp, y * spec.mpp) & inside).mean(axis=(1, 2))
    assert np.abs(layout.tissue - truth).mean() < 0.03
    assert np.abs(layout.tissue - truth).max() < 0.2


def test_min_tissue_filters(synth_05) -> None:
    with Slide(synth_05.path) as slide:
        mask = tissue_mask(slide)
        everything = TileGrid(min_tissue=0.0).layout(slide, mask)
        some = TileGrid(min_tissue=0.25).layout(slide, mask)
        full = TileGrid(min_tissue=1.0).layout(slide, mask)
    assert len(everything) > len(some) > len(full) > 0
    assert np.all(some.tissue >= 0.25)
    kept = everything.tissue >= 0.25
    np.testing.assert_array_equal(everything.coords[kept], some.coords)


def test_overlap(synth_025) -> None:
    with Slide(synth_025.path) as slide:
        layout = TileGrid(tile_px=224, overlap_px=56).layout(slide, None)
    assert layout.stride_l0 == pytest.approx(168 * 2.0)
    assert layout.tile_l0 == pytest.approx(448.0)
    _check_invariants(layout)
    np.testing.assert_array_equal(np.unique(np.diff(np.unique(layout.coords[:, 0]))), [336])


def test_edge_tiles_cover_the_slide(synth_05) -> None:
    """Tiles start inside the slide and together reach past its right and bottom edges."""
    with Slide(synth_05.path) as slide:
        layout = TileGrid().layout(slide, None)
        w, h = slide.dimensions
    rows, cols = layout.grid_shape
    assert (rows, cols) == (math.ceil((h - 224) / 224) + 1, math.ceil((w - 224) / 224) + 1)
    assert layout.coords[:, 0].max() < w and layout.coords[:, 1].max() < h
    assert layout.coords[:, 0].max() + layout.tile_l0 >= w
    assert layout.coords[:, 1].max() + layout.tile_l0 >= h
    # 3072 = 13 * 224 + 160: the last column is partial and still kept (pad-white policy)
    assert layout.coords[:, 0].max() == 13 * 224


def test_tiny_slide_gets_one_padded_tile(synth_tiny) -> None:
    with Slide(synth_tiny.path) as slide:
        mask = tissue_mask(slide)
        layout = TileGrid().layout(slide, mask)
        assert layout.grid_shape == (1, 1)
        np.testing.assert_array_equal(layout.coords, [[0, 0]])
        # nearly all of the 150 x 120 px slide is tissue: the white padding does not count
        frac = float(mask.box_fraction(0, 0, 150, 120)[()])
        assert frac > 0.8 and layout.tissue[0] == pytest.approx(frac, abs=0.02)
        with pytest.warns(NoTissueWarning, match="no tiles kept"):
            assert len(TileGrid(min_tissue=min(1.0, frac + 0.1)).layout(slide, mask)) == 0


def test_glass_only_gives_no_tiles(synth_blank) -> None:
    with Slide(synth_blank.path) as slide:
        with pytest.warns(NoTissueWarning):
            mask = tissue_mask(slide)
        with pytest.warns(NoTissueWarning, match="found no tissue"):
            layout = TileGrid().layout(slide, mask)
    assert len(layout) == 0
    assert layout.coords.shape == (0, 2) and layout.coords.dtype == np.int64
    assert layout.grid_rc.shape == (0, 2) and layout.tissue.shape == (0,)


def test_near_half_micron_slide_is_not_resampled() -> None:
    path = need(CMU)  # 0.499 µm/px
    with Slide(path) as slide:
        layout = TileGrid(target_mpp=0.5).layout(slide, tissue_mask(slide))
    assert layout.downsample == 1.0 and layout.tile_l0 == 224.0
    assert len(layout) > 20
    _check_invariants(layout)


def test_missing_mpp() -> None:
    path = need(TCGA)
    with Slide(path) as slide, pytest.raises(MissingMppError, match="slide-mpp"):
        TileGrid().layout(slide, None)
    with Slide(path, mpp=0.25) as slide:
        # 0.5 / 0.25 = 2, snapped to level 1's own downsample (4443 / 2221 = 2.0005) so that
        # tiles are read from that level as they are, and the grid matches what is read
        ds = TileGrid().layout(slide, None).downsample
        assert ds == slide.level_downsamples[1] == pytest.approx(2.0, rel=1e-3)


def test_mask_of_another_slide_is_refused(synth_05, synth_tiny) -> None:
    mask = tissue_mask(synth_tiny.path)
    with Slide(synth_05.path) as slide, pytest.raises(GridError, match="compute the mask"):
        TileGrid().layout(slide, mask)


def test_to_grid() -> None:
    layout = TileLayout(
        coords=[[0, 0], [20, 10]], grid_rc=[[0, 0], [1, 2]], tissue=[1.0, 0.5], origin=(0, 0),
        downsample=1.0, tile_l0=10.0, stride_l0=10.0, grid_shape=(2, 3),
    )  # fmt: skip
    grid = layout.to_grid([7.0, 9.0])
    assert grid.shape == (2, 3) and grid[0, 0] == 7.0 and grid[1, 2] == 9.0
    assert np.isnan(grid[0, 1])
    assert layout.to_grid(np.ones((2, 4))).shape == (2, 3, 4)
    assert layout.to_grid(np.ones(2, np.float32)).dtype == np.float32
    assert layout.to_grid([True, False], fill=False).dtype == bool
    with pytest.raises(GridError, match="one per tile"):
        layout.to_grid([1.0])


# -- issue 11 item 12 (edges, overlaps) and item 14 (tiny tiles, absurd resolutions) -----------
def test_tissue_at_the_bottom_and_right_edges_is_tiled(tmp_path) -> None:
    """The last, partial row and column are judged on their part inside the slide: a strip of
    tissue 32 px high at the bottom is tiled (white padding does not count against it)."""
    from tilescope.synthetic import Blob, SyntheticSlide

    # 2048 = 9 * 224 + 32: the last row covers 32 px of slide; tissue everywhere
    spec = SyntheticSlide(2048, 2048, mpp=0.5, n_levels=2,
                          blobs=(Blob(cx=512.0, cy=512.0, rx=2000.0, ry=2000.0),))  # fmt: skip
    path = spec.write(tmp_path / "edge.tif")
    with Slide(path) as slide:
        mask = tissue_mask(slide)
        layout = TileGrid().layout(slide, mask)
    rows, cols = layout.grid_shape
    assert (rows, cols) == (10, 10)
    last_row = layout.grid_rc[:, 0] == rows - 1
    last_col = layout.grid_rc[:, 1] == cols - 1
    assert last_row.sum() == cols and last_col.sum() == rows  # the whole edge strips are kept
    assert layout.tissue[last_row].min() > 0.9  # fractions of the inside part


def test_cmu_bottom_strip_is_tiled() -> None:
    """CMU-1-Small-Region is 2967 px high: its bottom 55 px of tissue get tiles."""
    with Slide(need(CMU)) as slide:
        layout = TileGrid().layout(slide, tissue_mask(slide))
    rows, _ = layout.grid_shape
    assert 2967 - (rows - 1) * 224 == 55
    assert np.any(layout.grid_rc[:, 0] == rows - 1)


class _BigSlide:
    """What `TileGrid.geometry` reads of a slide: a 100,000 x 80,000 px scan at 0.25 µm/px."""

    name, dimensions, mpp = "big.svs", (100_000, 80_000), 0.25

    def downsample_for_mpp(self, mpp: float) -> float:
        return mpp / self.mpp


@pytest.mark.parametrize("overlap", [1, 3, 17])
def test_overlap_heatmaps_cannot_use_is_refused_by_the_grid(overlap: int) -> None:
    """An overlap whose heatmap raster would be huge is refused before any tile is read (it
    used to be refused by `heatmap` only, after hours of embedding)."""
    from tilescope.score import TileGeometry, heatmap

    slide = _BigSlide()
    with pytest.raises(GridError, match="overlap") as err:
        TileGrid(overlap_px=overlap).geometry(slide)  # type: ignore[arg-type]
    assert "32, 56 or 112" in str(err.value)
    for ok in (0, 32, 56, 112):  # the overlaps the heatmaps use
        geo = TileGrid(overlap_px=ok).geometry(slide)  # type: ignore[arg-type]
        rows, cols = geo.grid_shape
        rc = np.array([[0, 0], [rows - 1, cols - 1]])
        tg = TileGeometry(rc, geo.grid_shape, 224, 224 - ok, geo.downsample, (0.0, 0.0))
        assert heatmap(np.ones(2), tg).raster.shape[0] > rows - 1  # the raster is made


def test_tile_size_bounds_and_absurd_resolutions(synth_05) -> None:
    for bad in (1, 8, 100_000):
        with pytest.raises(GridError, match="tile_px must be a whole number of pixels from 16"):
            TileGrid(tile_px=bad)
    with Slide(synth_05.path) as slide, pytest.raises(GridError, match="less than one pixel"):
        TileGrid(target_mpp=1e9).geometry(slide)


def test_geometry_equals_the_layout_without_tissue(synth_025) -> None:
    with Slide(synth_025.path) as slide:
        geo = TileGrid(overlap_px=32).geometry(slide)
        lay = TileGrid(overlap_px=32).layout(slide, None)
    assert geo.as_dict() == {
        "origin": list(lay.origin), "downsample": lay.downsample, "tile_l0": lay.tile_l0,
        "stride_l0": lay.stride_l0, "grid_shape": list(lay.grid_shape),
    }  # fmt: skip
