"""Stream the tiles of a layout as uint8 batches, read in parallel with bounded memory.

Reader threads each take a whole batch (a run of consecutive tile indices, so each reads
row-major and keeps its OpenSlide tile cache warm) with their own OpenSlide handle (OpenSlide
releases the GIL while decoding). At most `prefetch_batches` batches are read ahead of the
consumer, so memory does not grow with the slide. Batches are yielded in index order.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np

from .errors import GridError, RegionReadError
from .grid import TileLayout
from .slide import Slide

_JOIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class TileFailure:
    """A tile that could not be read."""

    index: int
    coords: tuple[int, int]
    message: str


@dataclass
class TileBatch:
    """Consecutive tiles of a layout.

    Attributes
    ----------
    indices
        (n,) int64 tile indices into the layout, increasing.
    images
        (n, tile_px, tile_px, 3) uint8 RGB tiles, ``images[k]`` is tile ``indices[k]``.
    failed
        Tiles of this batch that failed to decode (``on_error="skip"``); they are not in
        `indices`. ``len(indices) + len(failed)`` is the number of tiles the batch covered.
    """

    indices: np.ndarray
    images: np.ndarray
    failed: list[TileFailure] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)


def stream_tiles(
    slide: Slide | str | PathLike[str],
    layout: TileLayout,
    *,
    target_mpp: float,
    tile_px: int,
    batch_size: int = 64,
    num_workers: int = 2,
    prefetch_batches: int = 4,
    on_error: str = "skip",
    indices: Sequence[int] | np.ndarray | None = None,
    slide_mpp: float | None = None,
) -> Generator[TileBatch, None, None]:
    """Yield the tiles of `layout` as uint8 batches in index order.

    Parameters
    ----------
    slide
        An open `Slide` or a path (opened here and closed when the stream ends).
    layout
        Tile positions from `TileGrid.layout` on this slide.
    target_mpp, tile_px
        The grid's resolution and tile size; checked against the layout.
    batch_size
        Tiles per batch (the last batch may be smaller).
    num_workers
        Reader threads; 0 reads in the calling thread.
    prefetch_batches
        Batches read ahead of the consumer at most (memory bound: about
        ``(prefetch_batches + 1) * batch_size`` tiles). Fewer than `num_workers` leaves
        workers idle.
    on_error
        ``"skip"`` records a tile that fails to decode in `TileBatch.failed` and goes on;
        ``"raise"`` stops with `tilescope.errors.RegionReadError` once the batches before it
        have been yielded.
    indices
        Read only these tile indices (e.g. to resume); duplicates are read once, and batches
        follow increasing index order. ``None`` reads every tile.
    slide_mpp
        Level-0 µm per pixel, overriding the slide's own value (for slides without one).

    Yields
    ------
    TileBatch

    Notes
    -----
    Closing the generator (``break`` out of the loop, ``close()``, or dropping it) stops the
    reader threads after the tile each is reading.

    Examples
    --------
    >>> for batch in stream_tiles(path, layout, target_mpp=0.5, tile_px=224):  # doctest: +SKIP
    ...     features = encode(batch.images)
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("num_workers", num_workers, 0),
        ("prefetch_batches", prefetch_batches, 1),
        ("tile_px", tile_px, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    wanted = _requested(layout, indices)
    owned = True  # opened here, closed when the stream ends
    if not isinstance(slide, Slide):
        slide = Slide(slide, mpp=slide_mpp)
    elif slide_mpp is not None and slide_mpp != slide.mpp_x:
        slide = Slide(slide.path, mpp=slide_mpp)
    else:
        owned = False
    try:
        _check_layout(slide, layout, target_mpp, tile_px)
    except BaseException:
        if owned:
            slide.close()
        raise
    chunks = [wanted[i : i + batch_size] for i in range(0, len(wanted), batch_size)]
    reader = _Reader(slide, layout, float(target_mpp), int(tile_px), on_error)
    if num_workers == 0:
        return _serial(reader, chunks, owned)
    return _parallel(reader, chunks, int(num_workers), int(prefetch_batches), owned)


def _requested(layout: TileLayout, indices: Any) -> np.ndarray:
    n = len(layout)
    if indices is None:
        return np.arange(n, dtype=np.int64)
    idx = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
    if len(idx) and (idx[0] < 0 or idx[-1] >= n):
        raise IndexError(f"tile indices must be in 0..{n - 1}; got {idx[0]}..{idx[-1]}")
    return idx


def _check_layout(slide: Slide, layout: TileLayout, target_mpp: float, tile_px: int) -> None:
    expected = tile_px * slide.downsample_for_mpp(target_mpp)
    if not math.isclose(layout.tile_l0, expected, rel_tol=1e-6):
        raise GridError(
            f"{slide.name}: the layout's tiles are {layout.tile_l0:.2f} level-0 px but "
            f"tile_px={tile_px} at target_mpp={target_mpp} gives {expected:.2f}; make the "
            "layout with the same grid parameters and slide mpp"
        )


class _Stopped(Exception):
    """The consumer went away while a batch was being read."""


class _Reader:
    """Reads one chunk of tile indices into a `TileBatch`."""

    def __init__(
        self, slide: Slide, layout: TileLayout, mpp: float, tile_px: int, on_error: str
    ) -> None:
        self.slide = slide
        self.coords = layout.coords
        self.mpp = mpp
        self.tile_px = tile_px
        self.on_error = on_error
        self.stop = threading.Event()
        # warm metadata caches in this thread, so workers only read pixels
        _ = slide.mpp, slide.level_downsamples, slide.dimensions

    def read(self, chunk: np.ndarray) -> TileBatch:
        size = (self.tile_px, self.tile_px)
        images = np.empty((len(chunk), self.tile_px, self.tile_px, 3), np.uint8)
        ok = np.ones(len(chunk), bool)
        failed: list[TileFailure] = []
        for k, i in enumerate(chunk):
            if self.stop.is_set():
                raise _Stopped
            x, y = (int(v) for v in self.coords[i])
            try:
                images[k] = self.slide.read_region_mpp((x, y), size, mpp=self.mpp)
            except RegionReadError as exc:
                if self.on_error == "raise":
                    raise
                ok[k] = False
                failed.append(TileFailure(int(i), (x, y), str(exc)))
        if failed:
            return TileBatch(chunk[ok], images[ok], failed)
        return TileBatch(chunk, images, failed)


def _serial(
    reader: _Reader, chunks: list[np.ndarray], owned: bool
) -> Generator[TileBatch, None, None]:
    try:
        for chunk in chunks:
            yield reader.read(chunk)
    finally:
        if owned:
            reader.slide.close()


def _parallel(
    reader: _Reader, chunks: list[np.ndarray], num_workers: int, prefetch: int, owned: bool
) -> Generator[TileBatch, None, None]:
    """Workers claim chunks in order, never more than `prefetch` ahead of the consumer."""
    cond = threading.Condition()
    results: dict[int, TileBatch | BaseException] = {}
    state = {"next_job": 0, "next_yield": 0}

    def claim() -> int | None:
        with cond:
            while True:
                job = state["next_job"]
                if reader.stop.is_set() or job >= len(chunks):
                    return None
                if job < state["next_yield"] + prefetch:
                    state["next_job"] = job + 1
                    return job
                cond.wait()

    def work() -> None:
        try:
            while (job := claim()) is not None:
                try:
                    result: TileBatch | BaseException = reader.read(chunks[job])
                except _Stopped:
                    return
                except BaseException as exc:  # handed to the consumer, raised in order
                    result = exc
                with cond:
                    results[job] = result
                    cond.notify_all()
                if isinstance(result, BaseException):
                    return
        finally:
            reader.slide.close_thread_handle()

    threads = [
        threading.Thread(target=work, name=f"tilescope-reader-{k}", daemon=True)
        for k in range(min(num_workers, len(chunks)))
    ]
    try:
        for t in threads:
            t.start()
        for job in range(len(chunks)):
            with cond:
                while job not in results:
                    if not any(t.is_alive() for t in threads) and job not in results:
                        raise RuntimeError("tile reader threads stopped unexpectedly")
                    cond.wait(timeout=1.0)
                result = results.pop(job)
                state["next_yield"] = job + 1
                cond.notify_all()
            if isinstance(result, BaseException):
                raise result
            yield result
    finally:
        reader.stop.set()
        with cond:
            cond.notify_all()
        for t in threads:
            t.join(_JOIN_TIMEOUT_S)
        # never close handles under a thread that is still (improbably) reading
        if owned and not any(t.is_alive() for t in threads):
            reader.slide.close()
