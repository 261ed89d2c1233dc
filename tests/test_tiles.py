"""Tile streaming: pixels and geometry, exactly-once delivery, bounded memory, errors, cancel.

Reader processes do not see a monkeypatched `Slide`: tests that patch reads use
``num_workers=0`` (the same block reading, in this thread); the processes are tested on real
files (a corrupt tile) and in test_readers.py.
"""

from __future__ import annotations

import threading
import time
import tracemalloc

import numpy as np
import pytest
import tifffile
from _paths import TCGA, need

from tilescope.errors import GridError, MissingMppError, RegionReadError
from tilescope.grid import TileGrid
from tilescope.schedule import TileSchedule
from tilescope.slide import Slide
from tilescope.synthetic import Blob, SyntheticSlide
from tilescope.tiles import TileBatch, stream_tiles
from tilescope.tissue import tissue_mask


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _layout(path, **grid):
    with Slide(path) as slide:
        return TileGrid(**grid).layout(slide, tissue_mask(slide))


def _collect(batches) -> tuple[np.ndarray, np.ndarray]:
    """Every tile of a stream, sorted by index (streams come in schedule order)."""
    batches = list(batches)
    idx = np.concatenate([b.indices for b in batches])
    images = np.concatenate([b.images for b in batches])
    order = np.argsort(idx, kind="stable")
    return idx[order], images[order]


@pytest.mark.parametrize("name", ["synth_05", "synth_025", "synth_0263"])
def test_tiles_match_reference(name: str, request: pytest.FixtureRequest) -> None:
    """Tiles at 0.5 µm/px equal the exact rendering of the same physical area."""
    sf = request.getfixturevalue(name)
    layout = _layout(sf.path)
    idx, images = _collect(stream_tiles(sf.path, layout, target_mpp=0.5, tile_px=224))
    np.testing.assert_array_equal(idx, np.arange(len(layout)))
    assert images.shape == (len(layout), 224, 224, 3) and images.dtype == np.uint8
    inside = np.all(layout.coords + layout.tile_l0 <= [sf.spec.width, sf.spec.height], axis=1)
    errors = [
        _mae(images[i], sf.spec.region(*layout.coords[i], 224, 224, 0.5))
        for i in np.flatnonzero(inside)
    ]
    # JPEG and antialiasing of the hard blob edges leave about half a grey level
    assert len(errors) >= 10
    assert np.mean(errors) < 1.0 and np.max(errors) < 2.0, (np.mean(errors), np.max(errors))


def test_same_tiles_from_two_base_resolutions(synth_05, synth_025) -> None:
    a, b = _layout(synth_05.path), _layout(synth_025.path)
    np.testing.assert_array_equal(a.grid_rc, b.grid_rc)
    _, ia = _collect(stream_tiles(synth_05.path, a, target_mpp=0.5, tile_px=224))
    _, ib = _collect(stream_tiles(synth_025.path, b, target_mpp=0.5, tile_px=224))
    assert _mae(ia, ib) < 1.0


def test_level1_reads_are_aligned_at_any_offset(synth_025) -> None:
    """Reading 1.0 µm/px from level 1 (4x) at offsets that are not multiples of 4.

    OpenSlide interpolates the sub-pixel offset, so the best match with the reference is at
    zero shift and the residual is JPEG noise; a misalignment would show as a shifted optimum.
    """
    spec = synth_025.spec
    with Slide(synth_025.path) as slide:
        for off in range(4):
            x, y = 1320 + off, 1120 + off  # inside the first blob
            tile = slide.read_region_mpp((x, y), (160, 160), mpp=1.0)
            errs = {d: _mae(tile, spec.region(x + d, y + d, 160, 160, 1.0)) for d in (-2, 0, 2)}
            assert errs[0] < 1.5, (off, errs)
            assert errs[0] <= min(errs[-2], errs[2]), (off, errs)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_every_tile_exactly_once(synth_05, workers: int) -> None:
    layout = _layout(synth_05.path, min_tissue=0.0)
    batches = list(
        stream_tiles(
            synth_05.path, layout, target_mpp=0.5, tile_px=224, batch_size=16,
            num_workers=workers, prefetch_batches=2,
        )
    )  # fmt: skip
    sizes = [len(b) for b in batches]
    n = len(layout)
    assert sizes == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    idx = np.concatenate([b.indices for b in batches])
    np.testing.assert_array_equal(np.sort(idx), np.arange(n))  # once each, block by block
    assert all(b.indices.dtype == np.int64 and not b.failed for b in batches)
    assert all(b.images.shape[1:] == (224, 224, 3) for b in batches)


def test_worker_count_does_not_change_pixels(synth_0263) -> None:
    layout = _layout(synth_0263.path)
    runs = [
        _collect(stream_tiles(synth_0263.path, layout, target_mpp=0.5, tile_px=224,
                              batch_size=5, num_workers=w))[1]
        for w in (0, 2)
    ]  # fmt: skip
    np.testing.assert_array_equal(runs[0], runs[1])


def test_subset_of_indices(synth_05) -> None:
    layout = _layout(synth_05.path)
    with Slide(synth_05.path) as slide:
        batches = list(
            stream_tiles(slide, layout, target_mpp=0.5, tile_px=224, batch_size=2,
                         indices=[7, 3, 3, 0, len(layout) - 1])
        )  # fmt: skip
        idx, images = _collect(batches)
        np.testing.assert_array_equal(idx, [0, 3, 7, len(layout) - 1])
        assert [len(b) for b in batches] == [2, 2]
        ref = slide.read_region_mpp(tuple(layout.coords[7]), (224, 224), mpp=0.5)
        np.testing.assert_array_equal(images[2], ref)
        assert list(stream_tiles(slide, layout, target_mpp=0.5, tile_px=224, indices=[])) == []
        with pytest.raises(IndexError, match="tile indices"):
            stream_tiles(slide, layout, target_mpp=0.5, tile_px=224, indices=[len(layout)])


def test_tiny_slide_tile_is_padded_white(synth_tiny) -> None:
    layout = _layout(synth_tiny.path)
    (batch,) = stream_tiles(synth_tiny.path, layout, target_mpp=0.5, tile_px=224)
    tile = batch.images[0]
    ref = synth_tiny.spec.region(0, 0, 150, 120, 0.5)
    assert _mae(tile[:120, :150], ref) < 2
    assert np.all(tile[:, 152:] == 255) and np.all(tile[122:, :] == 255)


@pytest.mark.parametrize("workers", [1, 2])
def test_read_ahead_is_bounded(synth_05, workers: int) -> None:
    """Readers never get more than `prefetch_batches` batches ahead of the consumer."""
    layout = _layout(synth_05.path, min_tissue=0.0)
    schedule = TileSchedule()
    batch_size, prefetch = 4, 2
    stream = stream_tiles(
        synth_05.path, layout, target_mpp=0.5, tile_px=224, batch_size=batch_size,
        num_workers=workers, prefetch_batches=prefetch, order=schedule,
    )  # fmt: skip
    n = 0
    for k, batch in enumerate(stream):
        time.sleep(0.05)  # let the readers run ahead as far as they may
        n += len(batch)
        handed_out = len(layout) - schedule.n_remaining
        assert handed_out <= (k + 1 + prefetch) * batch_size, (k, handed_out)
    assert n == len(layout) and schedule.n_remaining == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_memory_stays_bounded(synth_025, workers: int) -> None:
    """Peak traced memory is a few batches and blocks, far below the size of all tiles."""
    layout = _layout(synth_025.path, target_mpp=0.25, min_tissue=0.0, overlap_px=112)
    tile_bytes = 224 * 224 * 3
    batch_size, prefetch = 8, 2
    total = len(layout) * tile_bytes
    assert total > 250e6  # overlapping tiles: 4 times the slide
    tracemalloc.start()
    try:
        n = 0
        for batch in stream_tiles(
            synth_025.path, layout, target_mpp=0.25, tile_px=224, batch_size=batch_size,
            num_workers=workers, prefetch_batches=prefetch,
        ):  # fmt: skip
            n += len(batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == len(layout)
    # buffered + being read + held by the consumer, plus one block read (in this process
    # when workers=0: a 2048 px block is 16 MB of RGBA and 12 MB of RGB)
    bound = (prefetch + 2 + 2) * batch_size * tile_bytes + 40e6
    assert peak < bound < total / 4, (peak, bound, total)


def _failing_read(bad: tuple[int, int]):
    """`Slide.read_region_raw` that fails for any region holding level-0 point `bad`."""
    original = Slide.read_region_raw

    def read(self, location, level, size, *, out=None):
        ds = self.level_downsamples[level]
        x, y = location
        if x <= bad[0] < x + size[0] * ds and y <= bad[1] < y + size[1] * ds:
            raise RegionReadError(self.path, f"failed to decode region at level-0 {location}")
        return original(self, location, level, size, out=out)

    return read


def test_on_error_skip(synth_05, monkeypatch) -> None:
    """A block over a bad spot is read again tile by tile: only the tile there fails."""
    layout = _layout(synth_05.path)
    bad = 5
    point = tuple(int(v) + 10 for v in layout.coords[bad])
    monkeypatch.setattr(Slide, "read_region_raw", _failing_read(point))
    batches = list(stream_tiles(synth_05.path, layout, target_mpp=0.5, tile_px=224,
                                batch_size=4, num_workers=0))  # fmt: skip
    failed = [f for b in batches for f in b.failed]
    assert [f.index for f in failed] == [bad]
    assert failed[0].coords == tuple(int(v) for v in layout.coords[bad])
    assert "decode" in failed[0].message
    idx, images = _collect(batches)
    np.testing.assert_array_equal(idx, np.delete(np.arange(len(layout)), bad))
    assert len(images) == len(layout) - 1
    assert all(len(b) + len(b.failed) == 4 for b in batches[:-1])


def test_on_error_raise(synth_05, monkeypatch) -> None:
    layout = _layout(synth_05.path)
    bad = len(layout) - 1  # in the last block
    point = tuple(int(v) + 10 for v in layout.coords[bad])
    monkeypatch.setattr(Slide, "read_region_raw", _failing_read(point))
    seen = []
    with pytest.raises(RegionReadError, match="decode"):
        for batch in stream_tiles(synth_05.path, layout, target_mpp=0.5, tile_px=224,
                                  batch_size=4, num_workers=0, on_error="raise"):  # fmt: skip
            seen.extend(batch.indices.tolist())
    assert bad not in seen and len(seen) % 4 == 0 and len(seen) >= 4  # batches before it


def test_corrupt_tile_in_a_real_file(tmp_path) -> None:
    """A tile whose JPEG data is destroyed is reported; later reads on the thread still work.

    OpenSlide leaves a handle unusable after a decode error; `Slide` reopens it.
    """
    spec = SyntheticSlide(1024, 1024, mpp=0.5, blobs=(Blob(256, 256, 240, 240),), n_levels=1)
    path = spec.write(tmp_path / "corrupt.tif")
    with tifffile.TiffFile(path) as tf:
        offset, count = tf.pages[0].dataoffsets[5], tf.pages[0].databytecounts[5]
    with open(path, "r+b") as fh:  # tile (row 1, col 1): level-0 [256, 512) x [256, 512)
        fh.seek(offset)
        fh.write(b"\0" * count)
    with Slide(path) as slide:
        layout = TileGrid(tile_px=128, min_tissue=0.0).layout(slide, None)
    for workers in (1, 2):
        batches = list(stream_tiles(path, layout, target_mpp=0.5, tile_px=128, batch_size=8,
                                    num_workers=workers))  # fmt: skip
        failed = sorted(f.coords for b in batches for f in b.failed)
        assert failed == [(256, 256), (256, 384), (384, 256), (384, 384)]
        assert sum(len(b) for b in batches) == len(layout) - 4


def _feeders() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tilescope-feeder"]


def test_closing_the_stream_stops_dispatching(synth_05) -> None:
    """Closing a stream ends its feeder and leaves the reader processes idle, for reuse."""
    from tilescope import _readers

    layout = _layout(synth_05.path, min_tissue=0.0)
    schedule = TileSchedule()
    stream = stream_tiles(synth_05.path, layout, target_mpp=0.5, tile_px=224, batch_size=2,
                          num_workers=2, prefetch_batches=2, order=schedule)  # fmt: skip
    first = next(stream)
    assert isinstance(first, TileBatch) and len(_feeders()) == 1
    stream.close()
    assert not _feeders()
    left = schedule.n_remaining
    assert left > 0 and schedule.n_remaining == left  # nothing more is handed out
    pool = _readers._shared
    assert pool is not None and not pool.busy
    assert all(w.alive() and w.outstanding == 0 for w in pool.workers)
    # breaking out of a for loop closes the generator too
    for _ in stream_tiles(synth_05.path, layout, target_mpp=0.5, tile_px=224, batch_size=2,
                          num_workers=2):  # fmt: skip
        break
    assert not _feeders() and not pool.busy


def test_argument_checks(synth_05) -> None:
    layout = _layout(synth_05.path)
    with pytest.raises(GridError, match="same grid parameters"):
        stream_tiles(synth_05.path, layout, target_mpp=1.0, tile_px=224)
    with pytest.raises(ValueError, match="on_error"):
        stream_tiles(synth_05.path, layout, target_mpp=0.5, tile_px=224, on_error="ignore")
    with pytest.raises(ValueError, match="batch_size"):
        stream_tiles(synth_05.path, layout, target_mpp=0.5, tile_px=224, batch_size=0)
    with pytest.raises(ValueError, match="num_workers"):
        stream_tiles(synth_05.path, layout, target_mpp=0.5, tile_px=224, num_workers=-1)


def test_slide_mpp_override() -> None:
    path = need(TCGA)
    with Slide(path, mpp=0.25) as slide:
        layout = TileGrid().layout(slide, None)
    with pytest.raises(MissingMppError):
        stream_tiles(path, layout, target_mpp=0.5, tile_px=224)
    (batch,) = stream_tiles(path, layout, target_mpp=0.5, tile_px=224, indices=[0, 1],
                            slide_mpp=0.25)  # fmt: skip
    assert batch.images.shape == (2, 224, 224, 3)
