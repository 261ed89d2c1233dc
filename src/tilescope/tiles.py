"""Stream the tiles of a layout as uint8 batches: reader processes, block reads, any order.

Reader worker processes (`tilescope._readers`; ``num_workers=0`` reads in the calling thread)
each hold their own OpenSlide handle and fetch *blocks* of neighbouring tiles with one read
(`tilescope._blocks`), writing tiles into shared memory. The order is a `TileSchedule`: grid
order by default, a list of indices, or a schedule the caller re-orders while the stream runs
(view first). At most `prefetch_batches` batches are read ahead of the consumer, so memory
does not grow with the slide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from functools import partial
from os import PathLike
from typing import Any

import numpy as np

from ._blocks import ReadPlan, read_tiles
from ._torch_env import available_cpus
from .errors import GridError, RegionReadError
from .grid import TileLayout
from .schedule import TileSchedule
from .slide import Slide

#: Batches a consumer may hold unreleased with ``copy=False`` (one in the model, one being
#: submitted), on top of `prefetch_batches`.
HELD_BATCHES = 2

#: Shared memory for batches read ahead, at most, when `prefetch_batches` is automatic.
MAX_PREFETCH_BYTES = 512 * 2**20

#: What ``order=`` takes: None (grid order), indices (that order, only those), a schedule.
Order = Sequence[int] | np.ndarray | TileSchedule | None


def default_workers() -> int:
    """Reader processes by default: one per CPU this process may run on."""
    return available_cpus()


@dataclass(frozen=True)
class TileFailure:
    """A tile that could not be read."""

    index: int
    coords: tuple[int, int]
    message: str


@dataclass
class TileBatch:
    """Tiles of a layout, in schedule order.

    Attributes
    ----------
    indices
        (n,) int64 tile indices into the layout.
    images
        (n, tile_px, tile_px, 3) uint8 RGB tiles, ``images[k]`` is tile ``indices[k]``.
    failed
        Tiles of this batch that failed to decode (``on_error="skip"``); they are not in
        `indices`. ``len(indices) + len(failed)`` is the number of tiles the batch covered.
    """

    indices: np.ndarray
    images: np.ndarray
    failed: list[TileFailure] = field(default_factory=list)
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.indices)

    def release(self) -> None:
        """Give the batch's shared memory back to the readers (``copy=False`` streams: call
        it once `images` is no longer used; a no-op otherwise)."""
        release, self._release = self._release, None
        if release is not None:
            release()


def stream_tiles(
    slide: Slide | str | PathLike[str],
    layout: TileLayout,
    *,
    target_mpp: float,
    tile_px: int,
    batch_size: int = 64,
    num_workers: int | None = None,
    prefetch_batches: int | None = None,
    on_error: str = "skip",
    indices: Sequence[int] | np.ndarray | None = None,
    slide_mpp: float | None = None,
    order: Order = None,
    copy: bool = True,
) -> Generator[TileBatch, None, None]:
    """Yield the tiles of `layout` as uint8 batches, in the order `order` gives.

    Parameters
    ----------
    slide
        An open `Slide` or a path (opened here and closed when the stream ends).
    layout
        Tile positions from `TileGrid.layout` on this slide.
    target_mpp, tile_px
        The grid's resolution and tile size; checked against the layout.
    batch_size
        Tiles per batch (only the last batch may be smaller).
    num_workers
        Reader processes; None: one per CPU this process may use (`default_workers`); 0 reads
        in the calling thread (tests, debugging; also where processes cannot be started: no
        Unix sockets that pass descriptors, e.g. Windows, or a frozen application).
    prefetch_batches
        Batches read ahead of the consumer at most (memory: about ``prefetch_batches *
        batch_size`` tiles of shared memory, plus one block per reader). It is also how far
        a re-prioritised schedule lags: blocks already handed out are read as they are.
        None: enough for every reader to hold two blocks (at least 2; `auto_prefetch`).
    on_error
        ``"skip"`` records a tile that fails to decode in `TileBatch.failed` and goes on;
        ``"raise"`` stops with `tilescope.errors.RegionReadError` once the batches before it
        have been yielded.
    indices
        Read only these tile indices (e.g. a resume's missing rows); duplicates are read once.
        None reads every tile (or every tile of `order`).
    slide_mpp
        Level-0 µm per pixel, overriding the slide's own value (for slides without one).
    order
        None: grid order (block by block); a sequence of indices: those tiles in that order;
        a `TileSchedule`: its order, which may change while the stream runs.
    copy
        True: every batch owns its images. False: `images` is a view of shared memory, valid
        until `TileBatch.release` (hold at most `HELD_BATCHES` unreleased); saves a copy.

    Yields
    ------
    TileBatch

    Notes
    -----
    Tiles come a block at a time: a block is due when its best-placed tile is, and its
    tiles follow in key order. Closing the generator (``break``, ``close()``, dropping it)
    stops dispatching; the readers finish the block in hand and stay ready for the next
    stream. A reader process that dies raises `tilescope.errors.ReaderError`.

    Examples
    --------
    >>> for batch in stream_tiles(path, layout, target_mpp=0.5, tile_px=224):  # doctest: +SKIP
    ...     features = encode(batch.images)
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
    workers = default_workers() if num_workers is None else num_workers
    prefetch_given = prefetch_batches is not None
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("num_workers", workers, 0),
        ("prefetch_batches", prefetch_batches if prefetch_given else 1, 1),
        ("tile_px", tile_px, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    wanted = _requested(layout, indices)
    schedule = _schedule(order)
    owned = True  # opened here, closed when the stream ends
    if not isinstance(slide, Slide):
        slide = Slide(slide, mpp=slide_mpp)
    elif slide_mpp is not None and slide_mpp != slide.mpp_x:
        slide = Slide(slide.path, mpp=slide_mpp)
    else:
        owned = False
    try:
        _check_layout(slide, layout, target_mpp, tile_px)
        plan = ReadPlan.for_layout(slide, layout, int(tile_px))
        schedule.bind(layout, wanted, plan.groups(layout))
        prefetch = (
            int(prefetch_batches)
            if prefetch_batches is not None
            else auto_prefetch(plan, int(batch_size), int(workers))
        )
    except BaseException:
        if owned:
            slide.close()
        raise
    if workers == 0 or not _readers_available():
        return _serial(slide, plan, layout, schedule, int(batch_size), on_error, owned)
    return _parallel(slide, plan, layout, schedule, int(batch_size), int(workers),
                     prefetch, on_error, copy, owned)  # fmt: skip


def auto_prefetch(plan: ReadPlan, batch_size: int, workers: int) -> int:
    """Batches to read ahead so that each reader can hold `tilescope._feed.DEPTH` blocks:
    at least 2, and at most `MAX_PREFETCH_BYTES` of tiles."""
    from ._feed import DEPTH

    block = min(plan.block_cells**2, batch_size)
    want = max(2, math.ceil(workers * DEPTH * block / batch_size))
    tile_bytes = plan.tile_px * plan.tile_px * 3
    return max(2, min(want, MAX_PREFETCH_BYTES // (batch_size * tile_bytes)))


def _readers_available() -> bool:
    from ._readers import available

    return available()


def _schedule(order: Order) -> TileSchedule:
    if order is None:
        return TileSchedule()
    if isinstance(order, TileSchedule):
        return order
    return TileSchedule.from_order(np.asarray(order, dtype=np.int64))


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


def _batch(layout: TileLayout, tiles: np.ndarray, images: np.ndarray,
           messages: dict[int, str]) -> TileBatch:  # fmt: skip
    """A `TileBatch` of `tiles` whose failed ones (`messages`) are left out."""
    if not messages:
        return TileBatch(tiles, images)
    ok = np.array([int(t) not in messages for t in tiles], bool)
    failed = [TileFailure(int(t), (int(layout.coords[t][0]), int(layout.coords[t][1])),
                          messages[int(t)]) for t in tiles[~ok]]  # fmt: skip
    return TileBatch(tiles[ok], images[ok], failed)


def _serial(
    slide: Slide,
    plan: ReadPlan,
    layout: TileLayout,
    schedule: TileSchedule,
    batch_size: int,
    on_error: str,
    owned: bool,
) -> Generator[TileBatch, None, None]:
    """Read in the calling thread, block by block, in schedule order."""
    tp = plan.tile_px
    try:
        while True:
            images = np.empty((batch_size, tp, tp, 3), np.uint8)
            tiles: list[int] = []
            messages: dict[int, str] = {}
            while len(tiles) < batch_size:
                got = schedule.take(batch_size - len(tiles))
                if got is None:
                    break
                where = {int(t): len(tiles) + k for k, t in enumerate(got)}
                tiles.extend(int(t) for t in got)

                def emit(t: int, rgb: np.ndarray, where: dict[int, int] = where,
                         images: np.ndarray = images) -> None:  # fmt: skip
                    images[where[t]] = rgb

                reads = plan.reads(got, layout.coords[got], layout.grid_rc[got])
                messages.update(read_tiles(slide, plan, reads, emit))
            if not tiles:
                return
            if messages and on_error == "raise":
                raise RegionReadError(None, next(iter(messages.values())))
            yield _batch(layout, np.asarray(tiles, np.int64), images[: len(tiles)], messages)
    finally:
        if owned:
            slide.close()


def _parallel(slide: Slide, plan: ReadPlan, layout: TileLayout, schedule: TileSchedule,
              batch_size: int, workers: int, prefetch: int, on_error: str, copy: bool,
              owned: bool) -> Generator[TileBatch, None, None]:  # fmt: skip
    """Read in reader processes (see `tilescope._feed`)."""
    from . import _readers
    from ._feed import Feeder

    pool, private = _readers.acquire_pool()
    feeder: Feeder | None = None
    try:
        key = (str(slide.path), slide.mpp_override)
        feeder = feed = Feeder(pool, pool.ensure(workers), key, plan, layout, schedule,
                               batch_size, prefetch, held=0 if copy else HELD_BATCHES)  # fmt: skip
        while (slot := feed.next_batch()) is not None:
            tiles = np.asarray(slot.tiles, np.int64)
            messages = {t: slot.messages[t] for t in slot.messages}
            if messages and on_error == "raise":
                feed.release(slot)
                raise RegionReadError(None, next(iter(messages.values())))
            images = feed.images(slot)
            if copy:
                batch = _batch(layout, tiles, images.copy(), messages)
                feed.release(slot)
            else:
                batch = _batch(layout, tiles, images, messages)
                batch._release = partial(feed.release, slot)
            yield batch
    finally:
        if feeder is not None:
            feeder.close()
        _readers.release_pool(pool, private)
        if owned:
            slide.close()
