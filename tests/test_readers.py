"""Reader worker processes: reuse, clean shutdown, a dead worker, zero-copy batches."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from tilescope import _readers
from tilescope.errors import ReaderError, TilescopeError
from tilescope.grid import TileGrid
from tilescope.schedule import TileSchedule
from tilescope.slide import Slide
from tilescope.tiles import default_workers, stream_tiles

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="checks /proc")


def _layout(path, **grid):
    with Slide(path) as slide:
        return TileGrid(**grid).layout(slide, None)


def _count(path, layout, **kw) -> int:
    return sum(len(b) for b in stream_tiles(path, layout, target_mpp=0.5, tile_px=224, **kw))


def _children() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def test_default_workers_follow_the_cpu_affinity() -> None:
    assert default_workers() == len(os.sched_getaffinity(0))


def test_the_pool_is_reused_across_streams_and_slides(synth_05, synth_025) -> None:
    a, b = _layout(synth_05.path), _layout(synth_025.path)
    assert _count(synth_05.path, a, num_workers=2) == len(a)
    pids = sorted(w.pid for w in _readers._shared.workers)
    assert _count(synth_025.path, b, num_workers=2) == len(b)
    assert _count(synth_05.path, a, num_workers=1) == len(a)
    assert sorted(w.pid for w in _readers._shared.workers) == pids  # the same processes


def test_workers_import_neither_torch_nor_qt(synth_05) -> None:
    import torch  # noqa: F401  (loaded here, in the parent)

    layout = _layout(synth_05.path)
    assert _count(synth_05.path, layout, num_workers=1) == len(layout)
    for w in _readers._shared.workers:
        with open(f"/proc/{w.pid}/maps") as fh:
            maps = fh.read()
        assert "libtorch" not in maps and "libQt" not in maps
        assert "openslide" in maps


def test_shutdown_leaves_no_process_behind(synth_05) -> None:
    layout = _layout(synth_05.path)
    assert _count(synth_05.path, layout, num_workers=2) == len(layout)
    pids = [w.pid for w in _readers._shared.workers]
    assert {p.pid for p in _children()} >= set(pids)
    _readers.shutdown_readers()
    assert not [p for p in _children() if p.pid in pids]  # exited and reaped: no zombies
    assert _count(synth_05.path, layout, num_workers=2) == len(layout)  # starts again


def test_a_dead_reader_is_reported_not_waited_on(synth_05) -> None:
    layout = _layout(synth_05.path, min_tissue=0.0)
    stream = stream_tiles(synth_05.path, layout, target_mpp=0.5, tile_px=224, batch_size=2,
                          num_workers=2, prefetch_batches=1)  # fmt: skip
    next(stream)
    victim = _readers._shared.workers[0].pid
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(ReaderError, match=f"process {victim}.*SIGKILL"):
        for _ in stream:
            pass
    assert time.monotonic() - t0 < 10
    assert victim not in [p.pid for p in _children()]  # reaped
    assert _count(synth_05.path, layout, num_workers=2) == len(layout)  # replaced


def test_two_streams_at_once_each_get_readers(synth_05) -> None:
    layout = _layout(synth_05.path)
    counts: list[int] = []

    def run() -> None:
        counts.append(_count(synth_05.path, layout, num_workers=1, batch_size=4))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == [len(layout)] * 2
    assert not _readers._shared.busy


def test_zero_copy_batches_are_views_until_released(synth_05) -> None:
    layout = _layout(synth_05.path, min_tissue=0.0)
    copies = {}
    for b in stream_tiles(synth_05.path, layout, target_mpp=0.5, tile_px=224, batch_size=4,
                          num_workers=2):  # fmt: skip
        copies.update(zip(b.indices.tolist(), b.images.copy(), strict=True))
    views = {}
    for b in stream_tiles(synth_05.path, layout, target_mpp=0.5, tile_px=224, batch_size=4,
                          num_workers=2, copy=False):  # fmt: skip
        assert not b.images.flags.owndata
        views.update(zip(b.indices.tolist(), b.images.copy(), strict=True))
        b.release()
        b.release()  # twice is harmless
    assert views.keys() == copies.keys()
    assert all(np.array_equal(views[i], copies[i]) for i in views)


def test_holding_every_buffer_is_an_error_not_a_hang(synth_05) -> None:
    layout = _layout(synth_05.path, min_tissue=0.0)
    held = []
    with pytest.raises(TilescopeError, match="release batches"):
        for b in stream_tiles(synth_05.path, layout, target_mpp=0.5, tile_px=224, batch_size=2,
                              num_workers=1, prefetch_batches=1, copy=False,
                              order=TileSchedule()):  # fmt: skip
            held.append(b)  # never released
    assert 1 <= len(held) <= 3
