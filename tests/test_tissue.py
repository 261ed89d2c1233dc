"""Tissue detection: synthetic and real slides, glass, black borders, tiny slides."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from _paths import CMU, TCGA, need

from tilescope import slide as slide_module
from tilescope.errors import MissingMppError
from tilescope.slide import Slide
from tilescope.synthetic import Blob, SyntheticSlide
from tilescope.tissue import NoTissueWarning, TissueMask, tissue_mask


def _truth_on_mask(spec, tm: TissueMask) -> np.ndarray:
    """The synthetic slide's true tissue at the centre of every mask pixel."""
    h, w = tm.shape
    um = tm.downsample * spec.mpp
    xs, ys = (np.arange(w) + 0.5) * um, (np.arange(h) + 0.5) * um
    return spec.tissue_truth(xs[None, :], ys[:, None])


@pytest.mark.parametrize("name", ["synth_05", "synth_025", "synth_0263"])
def test_mask_matches_truth(name: str, request: pytest.FixtureRequest) -> None:
    sf = request.getfixturevalue(name)
    with Slide(sf.path) as slide:
        tm = tissue_mask(slide)
        w0, h0 = slide.dimensions
    truth = _truth_on_mask(sf.spec, tm)
    iou = (truth & tm.mask).sum() / (truth | tm.mask).sum()
    assert iou >= 0.9, f"IoU {iou:.3f}"
    assert tm.mask.dtype == bool
    # the mask spans the slide: its extent in level-0 px matches the slide within a mask pixel
    assert abs(tm.shape[1] * tm.downsample - w0) < tm.downsample
    assert abs(tm.shape[0] * tm.downsample - h0) < tm.downsample
    assert tm.mpp == pytest.approx(tm.downsample * sf.spec.mpp)
    assert 0.0 < tm.fraction < 1.0


def test_mask_is_low_resolution(synth_025) -> None:
    """At 8 µm per mask pixel a 0.25 µm/px slide is read 32x reduced, never at level 0."""
    with Slide(synth_025.path) as slide:
        tm = tissue_mask(slide, min_mask_px=64)
    assert tm.downsample == pytest.approx(32.0, rel=0.01)
    assert tm.params["mask_mpp"] == 8.0
    assert 0.05 <= tm.params["saturation_threshold_used"] <= 0.2


def test_same_tissue_at_both_resolutions(synth_05, synth_025) -> None:
    masks = [tissue_mask(sf.path) for sf in (synth_05, synth_025)]
    assert masks[0].fraction == pytest.approx(masks[1].fraction, abs=0.02)


def test_cmu_slide_plausible() -> None:
    path = need(CMU)
    with Slide(path) as slide:
        tm = tissue_mask(slide)
    # the section covers a bit less than half of this crop (checked by eye once)
    assert 0.25 < tm.fraction < 0.6, tm.fraction
    # glass along the left and right borders, tissue in the middle
    h, w = tm.shape
    assert tm.mask[:, : w // 10].mean() < 0.1
    assert tm.mask[h // 3 : 2 * h // 3, 2 * w // 5 : 3 * w // 5].mean() > 0.8


def test_slide_without_mpp_needs_an_override() -> None:
    path = need(TCGA)
    with pytest.raises(MissingMppError, match="mpp"):
        tissue_mask(path)
    with Slide(path, mpp=0.25) as slide:
        tm = tissue_mask(slide)
    assert 0.05 < tm.fraction < 0.95


def test_glass_only_gives_empty_mask_and_warning(synth_blank) -> None:
    with pytest.warns(NoTissueWarning, match="no tissue"):
        tm = tissue_mask(synth_blank.path)
    assert tm.is_empty and tm.fraction == 0.0


def test_black_border_is_not_tissue(tmp_path) -> None:
    """Black scan borders are removed; an H&E-coloured disk is kept."""
    img = np.full((1024, 1024, 3), 240, np.uint8)
    img[:, :160] = 8  # black border
    img[-100:, :] = (30, 30, 35)  # dark grey, empty scan area
    yy, xx = np.mgrid[:1024, :1024]
    disk = (xx - 600) ** 2 + (yy - 450) ** 2 < 250**2
    img[disk] = (200, 110, 170)
    path = tmp_path / "border.tif"
    tifffile.imwrite(
        path, img, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER", metadata=None,
    )  # fmt: skip
    tm = tissue_mask(path)  # 0.5 µm/px
    scale = tm.downsample
    h, w = tm.shape
    yy, xx = np.mgrid[:h, :w]
    truth = (xx * scale + scale / 2 - 600) ** 2 + (yy * scale + scale / 2 - 450) ** 2 < 250**2
    iou = (truth & tm.mask).sum() / (truth | tm.mask).sum()
    assert iou > 0.9
    assert not tm.mask[:, : int(150 / scale)].any()
    assert not tm.mask[-int(90 / scale) :, :].any()


def test_thumbnail_of_a_single_level_slide_is_read_in_strips(tmp_path, monkeypatch) -> None:
    """Whole-slide overviews never read a huge level in one piece (bounded memory)."""
    spec = SyntheticSlide(1600, 1200, mpp=0.5, blobs=(Blob(400, 300, 250, 200),), n_levels=1)
    path = spec.write(tmp_path / "one_level.tif")
    with Slide(path) as s:
        whole = s.thumbnail(200)
    monkeypatch.setattr(slide_module, "_MAX_READ_PX", 100_000)
    calls = []
    read_region = Slide.read_region
    monkeypatch.setattr(
        Slide, "read_region", lambda self, *a: calls.append(a) or read_region(self, *a)
    )
    with Slide(path) as s:
        strips = s.thumbnail(200)
    assert strips.shape == whole.shape == (150, 200, 3)
    assert len(calls) > 10 and all(size[0] * size[1] <= 100_000 for _, _, size in calls)
    assert np.abs(strips.astype(int) - whole.astype(int)).mean() < 2


def test_single_level_slide_is_read_in_strips(tmp_path, monkeypatch) -> None:
    """Without a coarse level, the mask is built strip by strip, with the same result."""
    spec = SyntheticSlide(1600, 1200, mpp=0.5, blobs=(Blob(400, 300, 250, 200),), n_levels=1)
    path = spec.write(tmp_path / "one_level.tif")
    whole = tissue_mask(path, min_mask_px=64)
    monkeypatch.setattr(slide_module, "_MAX_READ_PX", 100_000)  # 1600 x 1200 is then "huge"
    calls = []
    read_region = Slide.read_region
    monkeypatch.setattr(
        Slide, "read_region", lambda self, *a: calls.append(a) or read_region(self, *a)
    )
    strips = tissue_mask(path, min_mask_px=64)
    assert len(calls) > 10 and all(size[0] * size[1] <= 100_000 for _, _, size in calls)
    assert strips.shape == whole.shape and strips.downsample == whole.downsample
    assert (strips.mask == whole.mask).mean() > 0.99


def test_tiny_slide(synth_tiny) -> None:
    """A slide smaller than a tile still gets a mask (finer than 8 µm so it has pixels)."""
    tm = tissue_mask(synth_tiny.path)
    assert tm.downsample >= 1.0
    assert tm.mask.size >= 4
    assert tm.fraction > 0.8


def test_box_fraction_is_exact_area() -> None:
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True  # tissue in level-0 [0, 20) x [0, 20)
    tm = TissueMask(mask, downsample=10.0)
    got = tm.box_fraction(np.array([0, 10, 5, 15, 30, -10]), np.array([0, 10, 5, 15, 30, -10]), 20)
    # boxes: exact, diagonal neighbour, 15x15 of 20x20, 5x5 of 20x20, outside, partly outside
    np.testing.assert_allclose(got, [1.0, 0.25, 0.5625, 0.0625, 0.0, 0.25], atol=1e-6)
    assert got.dtype == np.float32
    # broadcasting a column of y with a row of x gives a grid at once
    grid = tm.box_fraction(np.array([[0, 20]]), np.array([[0], [20]]), 20)
    np.testing.assert_allclose(grid, [[1, 0], [0, 0]])
    # non-square boxes
    assert tm.box_fraction(0, 0, 40, 20)[()] == pytest.approx(0.5)


def test_box_fraction_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((30, 40)) < 0.4
    tm = TissueMask(mask, downsample=3.0)
    fine = np.repeat(np.repeat(mask, 3, axis=0), 3, axis=1)  # level-0 pixels
    for x, y, s in [(0, 0, 7), (5, 11, 13), (100, 70, 20), (31, 2, 1)]:
        expected = np.pad(fine, ((0, 40), (0, 40)))[y : y + s, x : x + s].mean()
        assert tm.box_fraction(x, y, s)[()] == pytest.approx(expected, abs=1e-6)


def test_invalid_arguments(synth_blank) -> None:
    with pytest.raises(ValueError, match="mask_mpp"):
        tissue_mask(synth_blank.path, mask_mpp=0)
    with pytest.raises(ValueError, match="saturation_bounds"):
        tissue_mask(synth_blank.path, saturation_bounds=(0.5, 0.1))
    with pytest.raises(ValueError, match="2-D"):
        TissueMask(np.zeros(5, bool), 1.0)
    with pytest.raises(ValueError, match="downsample"):
        TissueMask(np.zeros((2, 2), bool), 0.0)
