"""The chunked, cached pyramid napari draws: chunk alignment, the cache, virtual levels, values,
reads off the GUI thread, and opening a 100,000 px slide."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from _paths import CMU, need

from tilescope.pyramid import ChunkCache, LazyLevel, Pyramid, box_reduce2
from tilescope.slide import Slide
from tilescope.synthetic import Blob, SyntheticSlide


class Reads:
    """Records every `Slide.read_region` call of one file: (thread, location, level, size)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path) -> None:
        self.calls: list[tuple[threading.Thread, tuple[int, int], int, tuple[int, int]]] = []
        real = Slide.read_region
        lock = threading.Lock()

        def counted(slide, location, level, size):
            if slide.path == path:
                with lock:
                    call = (threading.current_thread(), tuple(location), level, tuple(size))
                    self.calls.append(call)
            return real(slide, location, level, size)

        monkeypatch.setattr(Slide, "read_region", counted)

    def __len__(self) -> int:
        return len(self.calls)


def reference_reduce2(img: np.ndarray) -> np.ndarray:
    """The 2x box reduce by definition (numpy): mean of 2 x 2, half up, edge repeated."""
    h, w = (img.shape[0] + 1) // 2, (img.shape[1] + 1) // 2
    img = np.pad(img, ((0, 2 * h - img.shape[0]), (0, 2 * w - img.shape[1]), (0, 0)), "edge")
    s = img.reshape(h, 2, w, 2, 3).astype(np.uint16).sum(axis=(1, 3))
    return ((s + 2) // 4).astype(np.uint8)


@pytest.fixture(scope="module")
def single_level(tmp_path_factory):
    """A 4000 x 3000 px single-level slide (tiles 256 px): every level above 0 is virtual."""
    spec = SyntheticSlide.with_random_blobs(4000, 3000, mpp=0.5, n=3, seed=5, n_levels=1)
    return spec, spec.write(tmp_path_factory.mktemp("single") / "single.tif")


@pytest.fixture(scope="module")
def pyramidal(tmp_path_factory):
    """5000 x 3500 px, Aperio SVS with levels 1/4/16 (integer downsamples)."""
    spec = SyntheticSlide.with_random_blobs(5000, 3500, mpp=0.25, n=3, seed=7, n_levels=3)
    return spec, spec.write(tmp_path_factory.mktemp("svs") / "pyr.svs", kind="svs")


def test_levels_are_stored_then_virtual_down_to_min_size(single_level, pyramidal):
    with Slide(single_level[1]) as s:
        pyr = Pyramid(s, cache=ChunkCache(), prefetch=False)
        assert [lv.shape[:2] for lv in pyr.levels] == [(3000, 4000), (1500, 2000), (750, 1000)]
        assert [lv.virtual for lv in pyr.levels] == [False, True, True]
        assert [lv.downsample for lv in pyr.levels] == [1, 2, 4]
        assert all(lv.chunks == (512, 512, 3) for lv in pyr.levels)  # 2 x 2 tiles of 256 px
    with Slide(pyramidal[1]) as s:
        levels = s.multiscale(min_size=512)
        assert isinstance(levels[0], LazyLevel)
        assert [lv.shape[:2] for lv in levels] == [(3500, 5000), (875, 1250), (218, 312)]
        assert not any(lv.virtual for lv in levels)
        # levels of at most 2048 px are one chunk: one read with a whole-pixel origin
        assert levels[1].chunks == (875, 1250, 3)
    with Slide(need(CMU)) as s:  # Aperio tiles of 240 px: chunks of 2 x 2 tiles
        levels = s.multiscale()
        assert [lv.shape[:2] for lv in levels] == [(2967, 2220), (1484, 1110), (742, 555)]
        assert {lv.chunks for lv in levels} == {(480, 480, 3)}


def test_gaps_between_stored_levels_get_virtual_levels(tmp_path):
    """Stored levels 16x apart would make napari read 16x too many pixels per screen pixel."""
    spec = SyntheticSlide(4096, 4096, mpp=0.5, n_levels=2, level_factor=16)
    with Slide(spec.write(tmp_path / "gap.tif")) as s:
        pyr = Pyramid(s, cache=ChunkCache(), prefetch=False)
        assert [(lv.downsample, lv.virtual) for lv in pyr.levels] == [
            (1, False), (2, True), (4, True), (16, False)
        ]  # fmt: skip


def test_chunk_reads_are_tile_aligned(monkeypatch, single_level):
    reads = Reads(monkeypatch, single_level[1])
    with Slide(single_level[1]) as s:
        pyr = Pyramid(s, cache=ChunkCache(), prefetch=False)
        region = pyr.levels[0][700:1900, 333:2900]
        assert region.shape == (1200, 2567, 3)
        assert len(reads) == 3 * 6  # chunk rows 1..3, columns 0..5
        for _, (x, y), level, (w, h) in reads.calls:
            assert level == 0 and x % 512 == 0 and y % 512 == 0
            assert (w, h) == (min(512, 4000 - x), min(512, 3000 - y))
    reads = Reads(monkeypatch, need(CMU))
    with Slide(CMU) as s, Pyramid(s, cache=ChunkCache(), prefetch=False) as pyr:  # 240 px tiles
        _ = pyr.levels[0][1000:1100, 1000:1500]
        assert sorted(loc for _, loc, _, _ in reads.calls) == [(960, 960), (1440, 960)]
        assert {size for *_, size in reads.calls} == {(480, 480)}


def test_repeated_and_overlapping_slices_decode_nothing_again(monkeypatch, single_level):
    reads = Reads(monkeypatch, single_level[1])
    with Slide(single_level[1]) as s:
        pyr = Pyramid(s, cache=ChunkCache(), prefetch=False)
        lv = pyr.levels[0]
        first = lv[600:1400, 600:1400]  # chunks 1..2 x 1..2
        assert len(reads) == 4
        np.testing.assert_array_equal(lv[600:1400, 600:1400], first)
        _ = lv[512:1536, 700:1000]  # inside what was read
        assert len(reads) == 4
        _ = lv[900:1300, 1000:1700]  # one new column of 2 chunks
        assert len(reads) == 6
        assert sorted(loc for _, loc, _, _ in reads.calls[4:]) == [(1536, 512), (1536, 1024)]
        # virtual levels: built once from the finer chunks, then served from the cache
        coarse = np.asarray(pyr.levels[2])
        n = len(reads)
        np.testing.assert_array_equal(np.asarray(pyr.levels[2]), coarse)
        _ = pyr.levels[1][100:700, 100:900]
        assert len(reads) == n
        assert pyr.cache.hits > 0 and pyr.stats.reads == n


def test_cache_budget_evicts_least_recently_used():
    cache = ChunkCache(max_bytes=3000)
    a, b, c = (np.zeros(1000, np.uint8) for _ in range(3))
    cache.put("a", a)
    cache.put("b", b)
    cache.put("c", c)
    assert cache.get("a") is a  # a is now the most recently used
    cache.put("d", np.zeros(1000, np.uint8))
    assert cache.get("b") is None and cache.get("a") is a and "c" in cache and "d" in cache
    assert cache.nbytes == 3000
    cache.put("huge", np.zeros(5000, np.uint8))  # larger than the budget: not kept
    assert "huge" not in cache and cache.nbytes == 3000
    cache.max_bytes = 1000
    assert len(cache) == 1 and cache.nbytes == 1000


def test_one_decode_per_chunk_across_threads(monkeypatch, single_level):
    """napari's slicing thread, the prefetch thread and the caller may want the same chunk."""
    reads = Reads(monkeypatch, single_level[1])
    with Slide(single_level[1]) as s:
        pyr = Pyramid(s, cache=ChunkCache(), prefetch=False)
        threads = [threading.Thread(target=lambda: pyr.levels[1][:, :]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(reads) == len({loc for _, loc, _, _ in reads.calls}) == 6 * 8


def test_prefetch_decodes_the_neighbours_in_the_background(monkeypatch, single_level):
    reads = Reads(monkeypatch, single_level[1])
    with Slide(single_level[1]) as s:
        pyr = Pyramid(s, cache=ChunkCache())
        _ = pyr.levels[0][1024:1536, 1536:2048]  # one chunk, in the middle
        deadline = time.monotonic() + 30
        while pyr.stats.prefetch_reads < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert len(reads) == 9  # the chunk and its 8 neighbours
        assert {t for t, *_ in reads.calls[1:]} == {pyr._pf_thread}
        assert pyr.stats.prefetch_reads == 8
        _ = pyr.levels[0][512:2048, 1024:2560]  # the 3 x 3 around it: all cached
        pyr.close()  # waits for the prefetch thread
        assert len([c for c in reads.calls if c[0] is threading.current_thread()]) == 1


def test_no_prefetch_far_below_a_stored_level(monkeypatch, single_level):
    """A virtual chunk costs 4**depth stored chunks: the ring is decoded ahead only at most
    `_PREFETCH_DEPTH` halvings below a stored level."""
    import tilescope.pyramid as pyramid_module

    with Slide(single_level[1]) as s:
        with Pyramid(s, cache=ChunkCache()) as pyr:
            _ = pyr.levels[1][600:700, 600:700]  # virtual chunk (1, 1): its ring is 8 chunks
            deadline = time.monotonic() + 60
            while pyr.stats.prefetch_reads < 32 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert pyr.stats.prefetch_reads == 32  # 8 chunks x 2 x 2 level-0 chunks
        monkeypatch.setattr(pyramid_module, "_PREFETCH_DEPTH", 0)
        with Pyramid(s, cache=ChunkCache()) as pyr:
            _ = pyr.levels[1][600:700, 600:700]
            assert pyr._pf_thread is None and pyr.stats.reads == 4
            _ = pyr.levels[0][600:700, 600:700]  # stored levels: always
            assert pyr._pf_thread is not None


def test_closing_the_slide_while_prefetching_is_safe(single_level):
    """The prefetch thread reads through its own handles: closing the slide cannot pull one
    from under it (OpenSlide would abort the process)."""
    pyramids = []
    for _ in range(3):
        with Slide(single_level[1]) as s:
            levels = s.multiscale()
            _ = levels[0][1024:1536, 1536:2048]  # starts prefetching 8 chunks
            pyramids.append(levels[0].pyramid)
    for pyr in pyramids:
        pyr.close()  # (waits for its prefetch thread)
        assert pyr.stats.prefetch_reads >= 0


def test_stored_levels_are_byte_identical_to_read_scaled(pyramidal):
    """At a level whose downsample is not an integer (the 218 x 312 px level here: 16.04),
    OpenSlide resamples a read whose origin falls between level pixels; a chunk always
    starts on a whole level pixel, so it equals the level read from its origin."""
    with Slide(pyramidal[1]) as s:
        pyr = Pyramid(s, cache=ChunkCache(), prefetch=False)
        assert [lv.downsample for lv in pyr.levels[:2]] == [1, 4]
        assert pyr.levels[2].downsample != round(pyr.levels[2].downsample)
        for lv in pyr.levels:
            h, w = lv.shape[:2]
            y0, x0, y1, x1 = h // 7, w // 5, h - 3, w - 1  # across chunk borders where any
            ds = lv.downsample
            if ds == round(ds):
                direct = s.read_scaled((round(x0 * ds), round(y0 * ds)), (x1 - x0, y1 - y0), ds)
            else:
                direct = s.read_scaled((0, 0), (w, h), ds)[y0:y1, x0:x1]
            np.testing.assert_array_equal(lv[y0:y1, x0:x1], direct)


def test_virtual_levels_are_exact_box_reduces_with_bounded_reads(monkeypatch, single_level):
    """No read is larger than one chunk, every level-0 chunk is read once, and each virtual
    level is the exact 2x box reduce of the level before it (close to read_scaled's)."""
    spec, path = single_level
    reads = Reads(monkeypatch, path)
    with Slide(path) as s:
        pyr = Pyramid(s, cache=ChunkCache(), prefetch=False)
        coarse = np.asarray(pyr.levels[-1])
        assert max(w * h for *_, (w, h) in reads.calls) <= 512 * 512
        assert len(reads) == len({loc for _, loc, _, _ in reads.calls}) == 6 * 8
        assert pyr.stats.max_read_px <= 512 * 512
        full = s.read_region((0, 0), 0, s.dimensions)
    ref = full
    for lv in pyr.levels[1:]:
        ref = reference_reduce2(ref)
        np.testing.assert_array_equal(np.asarray(lv), ref)
    np.testing.assert_array_equal(coarse, ref)
    with Slide(path) as s:
        lanczos = s.read_scaled((0, 0), coarse.shape[1::-1], 4.0)
    diff = np.abs(coarse.astype(int) - lanczos)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 6
    # and the content is the slide's: the reference renderer at 2 µm/px
    truth = spec.region(0, 0, coarse.shape[1], coarse.shape[0], spec.mpp * 4)
    assert np.abs(coarse.astype(int) - truth).mean() < 3


def test_box_reduce2_matches_its_definition():
    rng = np.random.default_rng(0)
    for shape in [(64, 64), (63, 65), (1, 1), (2, 7), (5, 3)]:
        img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        out = box_reduce2(img, ((shape[0] + 1) // 2, (shape[1] + 1) // 2))
        np.testing.assert_array_equal(out, reference_reduce2(img))


def test_slicing_like_numpy(single_level):
    with Slide(single_level[1]) as s:
        lv = Pyramid(s, cache=ChunkCache(), prefetch=False).levels[2]
        full = np.asarray(lv)
        for key in [(5, 7), (5,), (slice(10, 50, 3), 4), (-1, slice(None), 1), (slice(900, 2000),),
                    (slice(3, 9), slice(20, 2), 0)]:  # fmt: skip
            np.testing.assert_array_equal(lv[key], full[key])
        with pytest.raises(IndexError):
            _ = lv[750]


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    """100,000 x 100,000 px at 0.25 µm/px, 4x levels down to 1,562 px; glass tiles left out."""
    blobs = (Blob(12500, 12500, 1500, 1000),)
    spec = SyntheticSlide(100_000, 100_000, mpp=0.25, blobs=blobs, n_levels=4, background=255)
    return spec.write(tmp_path_factory.mktemp("huge") / "huge.tif", sparse=True)


@pytest.mark.napari
@pytest.mark.slow
def test_opening_a_100k_slide_reads_only_its_coarsest_level(make_napari_viewer, monkeypatch, huge):
    reads = Reads(monkeypatch, huge)
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    layer = viewer.open(str(huge), plugin="tilescope")[0]
    viewer.reset_view()
    viewer.screenshot(canvas_only=True, flash=False)
    assert [lv.shape[:2] for lv in layer.data] == [
        (100_000, 100_000), (25_000, 25_000), (6250, 6250), (1562, 1562), (781, 781)
    ]  # fmt: skip
    assert {level for _, _, level, _ in reads.calls} == {3}
    assert len(reads) == 1 and reads.calls[0][1:] == ((0, 0), 3, (1562, 1562))
    # zooming in on the tissue reads that part of a finer level only, chunk by chunk
    reads.calls.clear()
    viewer.scene.camera.center = (12500, 12500)
    viewer.scene.camera.zoom = 0.8  # screen px per µm: the 1 µm/px level at about 1:1
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert reads.calls and {level for _, _, level, _ in reads.calls} == {1}
    assert max(w * h for *_, (w, h) in reads.calls) <= 512 * 512
    r, g, b = (shot[..., i].astype(int) for i in range(3))
    assert ((r - g > 25) & (b - g > 5)).mean() > 0.2, "no tissue in the middle of the view"


@pytest.mark.napari
def test_napari_draws_chunks_without_seams(make_napari_viewer):
    """Level 0 drawn from chunks looks exactly like the same pixels as one plain array."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    layer = viewer.open(str(need(CMU)), plugin="tilescope")[0]
    with Slide(CMU) as s:
        full = s.read_region((0, 0), 0, s.dimensions)
    plain = viewer.add_image(full, rgb=True, scale=layer.scale, visible=False)
    viewer.scene.camera.center = layer.data_to_world((1440, 960))  # a corner of four chunks
    viewer.scene.camera.zoom = 3.0
    shots = []
    for visible in (layer, plain):
        for lyr in (layer, plain):
            lyr.visible = lyr is visible
        shots.append(viewer.screenshot(canvas_only=True, flash=False))
    assert layer.data_level == 0
    np.testing.assert_array_equal(shots[0], shots[1])


@pytest.mark.napari
def test_napari_async_slicing_reads_off_the_gui_thread(make_napari_viewer, monkeypatch):
    """With napari's asynchronous slicing on, napari asks for the view from its slicing
    thread, so the GUI thread does not wait for those decodes. (Without it, it asks from the
    GUI thread, which waits even when the decoding itself runs in worker threads.) napari
    0.9.2 still materializes the thumbnail level (our coarsest) on the GUI thread, once, when
    it makes the first slice request (`_make_slice_request` -> `_level_materializer`)."""
    from napari.settings import get_settings
    from qtpy.QtWidgets import QApplication

    settings = get_settings()
    reads = Reads(monkeypatch, need(CMU))
    askers = []
    getitem = LazyLevel.__getitem__

    def asked(lv, key):
        askers.append((threading.current_thread(), lv.index, lv.pyramid.levels[-1] is lv))
        return getitem(lv, key)

    monkeypatch.setattr(LazyLevel, "__getitem__", asked)
    viewer = make_napari_viewer(show=True)
    viewer.open(str(need(CMU)), plugin="tilescope")
    main = threading.main_thread()
    assert askers and {t for t, *_ in askers} == {main}  # synchronous: the GUI thread asks
    viewer.layers.clear()
    askers.clear()
    reads.calls.clear()
    saving, settings._save_on_change = settings._save_on_change, False  # not the user's file
    settings.experimental.async_ = True
    try:
        viewer.window._qt_window.resize(1600, 1000)
        layer = viewer.open(str(need(CMU)), plugin="tilescope")[0]
        viewer.scene.camera.zoom = 2.0
        deadline = time.monotonic() + 60
        while (not layer.loaded or not reads.calls) and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.01)
        assert layer.loaded and reads.calls
        on_gui = [(i, coarsest) for t, i, coarsest in askers if t is main]
        assert len(on_gui) == 1 and on_gui[0][1]  # the thumbnail level, once
        view = [(t, i) for t, i, coarsest in askers if not coarsest]
        assert view and all(t is not main for t, _ in view)  # the view: off the GUI thread
        shot = viewer.screenshot(canvas_only=True, flash=False)
    finally:
        settings.experimental.async_ = False
        settings._save_on_change = saving
    r, g, b = (shot[..., i].astype(int) for i in range(3))
    assert ((r - g > 25) & (b - g > 5)).mean() > 0.05, "no tissue visible"
