"""Slide: metadata, reads at a physical resolution, real slides, bad inputs, CLI info."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _paths import CMU, TCGA, need

from tilescope.cli import main
from tilescope.errors import (
    MissingMppError,
    SlideNotFoundError,
    TilescopeError,
    UnsupportedFormatError,
)
from tilescope.slide import Slide
from tilescope.synthetic import SyntheticSlide


@pytest.fixture(scope="module", params=[("tiff", 0.25), ("svs", 0.5)], ids=["tiff-0.25", "svs-0.5"])
def synth(request, tmp_path_factory):
    kind, mpp = request.param
    spec = SyntheticSlide.with_random_blobs(2600, 2000, mpp=mpp, seed=3, n_levels=3)
    path = spec.write(tmp_path_factory.mktemp(kind) / f"synthetic.{kind}", kind=kind)
    return spec, path, kind


def test_metadata_of_synthetic_pyramids(synth):
    spec, path, kind = synth
    with Slide(path) as s:
        assert s.vendor == ("aperio" if kind == "svs" else "generic-tiff")
        assert s.dimensions == (2600, 2000)
        assert s.level_count == 3
        assert s.level_dimensions[1] == (650, 500)
        assert s.level_downsamples == pytest.approx((1, 4, 16), rel=0.01)
        assert s.mpp == pytest.approx(spec.mpp, rel=1e-3)
        assert s.has_mpp
        if kind == "svs":
            assert s.objective_power == pytest.approx(10 / spec.mpp)


@pytest.mark.parametrize("target", [0.5, 1.0])
def test_read_region_at_mpp_matches_reference(synth, target):
    spec, path, _ = synth
    b = spec.blobs[0]
    # a 224 px window at the target resolution, centred on a tissue blob
    x0 = int(b.cx / spec.mpp) - int(112 * target / spec.mpp)
    y0 = int(b.cy / spec.mpp) - int(112 * target / spec.mpp)
    x0, y0 = x0 - x0 % 16, y0 - y0 % 16  # on a pixel of every level
    with Slide(path) as s:
        got = s.read_region_mpp((x0, y0), (224, 224), mpp=target)
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    ref = spec.region(x0, y0, 224, 224, target)
    err = np.abs(got.astype(int) - ref.astype(int))
    assert err.mean() < 4, err.mean()  # JPEG + resampling, content is smooth
    assert (ref != spec.background).any()  # the window really holds tissue


def test_region_outside_the_slide_is_white(synth):
    _, path, _ = synth
    with Slide(path) as s:
        w, h = s.dimensions
        img = s.read_region((w - 10, h - 10), 0, (40, 40))
    assert (img[20:, 20:] == 255).all()


def test_mpp_override_and_missing_mpp(synth):
    _, path, _ = synth
    with Slide(path, mpp=0.3) as s:
        assert s.mpp == 0.3 and s.mpp_source == "override"
    with pytest.raises(TilescopeError, match="positive"):
        Slide(path, mpp=-1)


def test_real_cmu_slide_reports_its_mpp():
    with Slide(need(CMU)) as s:
        assert s.mpp == pytest.approx(0.499)
        assert s.vendor == "aperio"
        assert s.dimensions == (2220, 2967)
        tile = s.read_region_mpp((1000, 1000), (224, 224), mpp=0.5)
        assert tile.shape == (224, 224, 3) and tile.std() > 5  # real tissue texture


def test_real_jpeg2000_slide_opens_without_mpp():
    with Slide(need(TCGA)) as s:
        assert s.dimensions == (4443, 3567)
        assert not s.has_mpp and s.mpp_x is None
        with pytest.raises(MissingMppError, match="--slide-mpp"):
            _ = s.mpp
        assert s.thumbnail(256).shape[2] == 3
    with Slide(TCGA, mpp=0.25) as s:
        assert s.read_region_mpp((2000, 1500), (224, 224), mpp=0.5).shape == (224, 224, 3)


def test_unicode_file_name(synth, tmp_path):
    _, path, kind = synth
    target = tmp_path / f"Schnitt-Ø-лёд-病理.{kind}"
    target.write_bytes(path.read_bytes())
    with Slide(target) as s:
        assert s.name == target.name and s.dimensions == (2600, 2000)


def test_identity_has_no_associated_images(synth):
    _, path, _ = synth
    with Slide(path) as s:
        ident = s.identity()
    import hashlib

    assert ident["size_bytes"] == path.stat().st_size
    assert ident["header_sha256"] == hashlib.sha256(path.read_bytes()[: 1 << 20]).hexdigest()
    assert ident["dimensions"] == [2600, 2000] and ident["name"] == path.name
    # associated images (label, macro: patient identifiers) are not reachable from a Slide
    assert not any(hasattr(Slide, a) for a in ("associated_images", "label", "macro"))


@pytest.fixture
def bad_files(tmp_path):
    from PIL import Image

    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    png = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), "red").save(png)
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    cut = tmp_path / "cut-short.svs"  # a real SVS whose copy stopped after 100 kB
    cut.write_bytes(need(CMU).read_bytes()[:100_000])
    strips = tmp_path / "strips.tif"  # a plain TIFF: no tiles, no pyramid
    Image.new("RGB", (64, 64), "red").save(strips)
    return {
        "missing": (tmp_path / "nope.svs", SlideNotFoundError),
        "text": (text, UnsupportedFormatError),
        "png": (png, UnsupportedFormatError),
        "empty": (empty, UnsupportedFormatError),
        "cut": (cut, UnsupportedFormatError),
        "strips": (strips, UnsupportedFormatError),
    }


@pytest.mark.parametrize("which", ["missing", "text", "png", "empty", "cut", "strips"])
def test_bad_inputs_raise_a_clear_error(bad_files, which, capsys):
    path, exc = bad_files[which]
    with pytest.raises(exc) as info:
        Slide(path)
    assert str(path) in str(info.value)
    # the CLI: non-zero exit, one line naming the file, no traceback
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "Traceback" not in err[0]
    if which in ("cut", "strips"):  # a TIFF header: say what may be wrong with the file
        assert "may be incomplete" in err[0] and "without tiles and pyramid" in err[0]


def test_cli_info_text_and_json(capsys):
    assert main(["info", str(need(CMU))]) == 0
    out = capsys.readouterr().out
    assert "aperio" in out and "0.499" in out and "20x" in out
    assert main(["info", "--json", str(CMU)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mpp_x"] == pytest.approx(0.499) and data["width"] == 2220
    assert main(["info", str(need(TCGA))]) == 0
    assert "unknown" in capsys.readouterr().out


def test_lazy_levels_read_only_what_is_sliced(synth):
    _, path, _ = synth
    with Slide(path) as s:
        levels = s.multiscale(min_size=256)
        assert levels[0].shape == (2000, 2600, 3)
        heights = [lv.shape[0] for lv in levels]
        assert heights == sorted(heights, reverse=True)
        crop = levels[1][100:164, 200:264]
        assert crop.shape == (64, 64, 3)
        full = s.read_region((800, 400), 1, (64, 64))
        np.testing.assert_array_equal(crop, full)
        assert levels[0][5, 7].shape == (3,)


def test_screen_resolution_is_not_a_pixel_size(tmp_path):
    """A TIFF saved at 72 dpi records 352.8 µm/px: treated as missing, with the reason."""
    import tifffile

    path = tmp_path / "screen.tif"
    img = np.full((512, 768, 3), 200, np.uint8)
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", resolution=(72, 72),
                     resolutionunit="INCH", metadata=None)  # fmt: skip
    with Slide(path) as s:
        assert not s.has_mpp and s.mpp_source.startswith("implausible")
        with pytest.raises(MissingMppError, match="352.8"):
            _ = s.mpp
    with Slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5


def test_transparent_pixels_blend_over_white():
    from tilescope.slide import _rgba_to_rgb

    rgba = np.array([[[10, 20, 30, 255], [0, 0, 0, 0], [100, 0, 200, 128]]], np.uint8)
    rgb = _rgba_to_rgb(rgba)
    assert rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(rgb[0, 1], [255, 255, 255])
    expect = np.round(np.array([100, 0, 200]) * 128 / 255 + 255 * 127 / 255)
    np.testing.assert_allclose(rgb[0, 2], expect, atol=1)


def test_handles_of_finished_threads_are_closed(synth):
    import threading

    _, path, _ = synth
    with Slide(path) as s:
        for _ in range(5):
            t = threading.Thread(target=lambda: s.read_region((0, 0), 0, (8, 8)))
            t.start()
            t.join()
        _ = s.read_region((0, 0), 0, (8, 8))  # a new handle in this thread prunes the rest
        assert len(s._handles) <= 2


def test_large_regions_painted_in_bands_are_the_same_pixels(synth, monkeypatch):
    """A large region (a tissue-mask level) is painted by a few threads in bands: the pixels
    are those of one call, on every level, from any corner (also past the slide's edge), and
    the bands' handles are closed."""
    import threading

    from tilescope import slide as slide_mod

    _, path, _ = synth
    with Slide(path) as s:
        cases = [((0, 0), 0, (2600, 2000)), ((37, 501), 0, (1999, 1203)),
                 ((0, 0), 1, s.level_dimensions[1]), ((1200, 1600), 1, (700, 400))]  # fmt: skip
        one = {c: s.read_region(*c) for c in cases}
        monkeypatch.setattr(slide_mod, "_BAND_MIN_PX", 1)
        monkeypatch.setattr(slide_mod, "available_cpus", lambda: 3)
        names: set[str] = set()
        paint = slide_mod._paint

        def spy(*args, **kwargs):
            names.add(threading.current_thread().name)
            return paint(*args, **kwargs)

        monkeypatch.setattr(slide_mod, "_paint", spy)
        for c in cases:
            np.testing.assert_array_equal(s.read_region(*c), one[c], err_msg=str(c))
        assert any(n.startswith("tilescope-read") for n in names)  # bands were painted
        assert len(s._handles) <= 1  # no band thread left its handle open


def test_levels_snap_so_grid_and_reads_agree(synth):
    """A target within 2% of a pyramid level is read from that level as is (no resize)."""
    spec, path, _ = synth
    with Slide(path) as s:
        target = spec.mpp * s.level_downsamples[1] * 1.01
        assert s.downsample_for_mpp(target) == s.level_downsamples[1]
        calls = []
        real = s.read_region
        s.read_region = lambda loc, level, size: (
            calls.append((level, size)) or real(loc, level, size)
        )
        s.read_region_mpp((64, 64), (100, 100), mpp=target)
        assert calls == [(1, (100, 100))]
