"""A chunked, cached multiscale view of a slide: what napari draws (no napari here).

`Pyramid` serves every resolution level in fixed chunks:

- **Stored levels** (the file's own) are read in chunks aligned to the file's tiles
  (``openslide.level[n].tile-width/height``; a whole number of tiles near `DEFAULT_CHUNK` px),
  else in `DEFAULT_CHUNK` px chunks. A chunk is one `Slide.read_region` call.
- **Virtual levels** (coarser than the coarsest stored level, or filling a gap of more than 4x
  between stored levels) halve the level before them: a chunk is the exact 2x box reduce of
  at most 2 x 2 chunks of that finer pyramid level (which are cached in turn), so no read is
  ever larger than one chunk and the coarsest level (at most `min_size` px) stays cheap.

Decoded chunks live in an LRU `ChunkCache` with a byte budget (shared by every pyramid of the
process unless one is given), so panning back over seen tissue decodes nothing. Missing chunks
of one request are decoded in parallel threads; after each request the ring of chunks around
it is decoded ahead in a background thread (`prefetch`). Everything is thread-safe: napari's
asynchronous slicing calls `LazyLevel.__getitem__` from its own thread.
"""

from __future__ import annotations

import atexit
import itertools
import math
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._chunk_cache import DEFAULT_CACHE_BYTES, ChunkCache, decode_pool, shared_cache
from ._pyramid_levels import (
    DEFAULT_CHUNK,
    MAX_LEVEL_GAP,
    WHOLE_LEVEL_PX,
    LevelSpec,
    box_reduce2,
    plan_levels,
    tile_size,
)

if TYPE_CHECKING:
    from .slide import Slide

__all__ = [
    "DEFAULT_CACHE_BYTES", "DEFAULT_CHUNK", "MAX_LEVEL_GAP", "WHOLE_LEVEL_PX", "ChunkCache",
    "LazyLevel", "LevelSpec", "Pyramid", "ReadStats", "box_reduce2", "shared_cache", "tile_size",
]  # fmt: skip

_IDLE_SECONDS = 2.0  # the prefetch thread exits after this long without work
_PREFETCH_DEPTH = 2  # virtual levels at most this many halvings below a stored level


@dataclass
class ReadStats:
    """What a pyramid asked OpenSlide for: calls, pixels, the largest call, chunks made."""

    reads: int = 0
    read_px: int = 0
    max_read_px: int = 0
    prefetch_reads: int = 0
    virtual_chunks: int = 0


_tokens = itertools.count()


class Pyramid:
    """Every resolution of `slide` as chunked, cached levels (`levels`, finest first).

    Parameters
    ----------
    slide
        An open `Slide`.
    min_size
        Virtual levels are added until the coarsest level's longer side is at most this.
    chunk
        Chunk side in px for levels without tiles (default `DEFAULT_CHUNK`).
    cache
        Where decoded chunks live (default: the process-wide `shared_cache`).
    prefetch
        Decode the chunks around each request ahead, in a background thread.
    """

    def __init__(
        self,
        slide: Slide,
        *,
        min_size: int = 1024,
        chunk: int = DEFAULT_CHUNK,
        cache: ChunkCache | None = None,
        prefetch: bool = True,
    ) -> None:
        self.slide = slide
        self.cache = shared_cache() if cache is None else cache
        self.prefetch_enabled = prefetch
        self.stats = ReadStats()
        self._token = next(_tokens)
        self._lock = threading.Lock()
        self._inflight: dict[tuple[int, int, int], threading.Event] = {}
        self._pf_cond = threading.Condition()
        self._pf_queue: list[tuple[int, int, int]] = []
        self._pf_thread: threading.Thread | None = None
        # The prefetch thread reads through its own `Slide`, so closing the caller's slide
        # never closes a handle that thread is using (OpenSlide would crash).
        self._pf_slide: list[Slide] = []
        self._closed = False
        self.specs = plan_levels(slide, min_size, chunk)
        self.levels = [LazyLevel(self, i) for i in range(len(self.specs))]
        # at exit, `_stop_all_prefetching` runs instead: closing a handle under a running
        # prefetch read would abort the process
        weakref.finalize(self, _release, self.cache, self._token, self._pf_slide).atexit = False
        _live.add(self)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{s.shape[1]}x{s.shape[0]}" for s in self.specs)
        return f"Pyramid({self.slide.name!r}, levels [{shapes}])"

    def close(self) -> None:
        """Stop prefetching (waiting for the chunk being read) and free the cached chunks."""
        with self._pf_cond:
            self._closed = True
            self._pf_queue.clear()
            self._pf_cond.notify_all()
            thread = self._pf_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        _release(self.cache, self._token, self._pf_slide)

    def __enter__(self) -> Pyramid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- regions and chunks ----------------------------------------------------------------
    def read(
        self,
        level: int,
        y0: int,
        y1: int,
        x0: int,
        x1: int,
        *,
        parallel: bool = True,
        prefetch: bool = False,
    ) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of `level` (RGB uint8), assembled from its chunks.

        `parallel` decodes the missing chunks in worker threads; `prefetch` then queues the
        ring of chunks around the region for the background thread.
        """
        spec = self.specs[level]
        (h, w), (ch, cw) = spec.shape, spec.chunk
        y0, y1, x0, x1 = max(0, y0), min(h, y1), max(0, x0), min(w, x1)
        out = np.empty((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)
        if not out.size:
            return out
        rows, cols = range(y0 // ch, (y1 - 1) // ch + 1), range(x0 // cw, (x1 - 1) // cw + 1)
        keys = [(level, r, c) for r in rows for c in cols]
        got: dict[tuple[int, int, int], np.ndarray] = {}
        if parallel:
            missing = [k for k in keys if (self._token, *k) not in self.cache]
            if len(missing) > 1:
                got = dict(zip(missing, decode_pool().map(lambda k: self.chunk(*k), missing),
                               strict=True))  # fmt: skip
        for lv, r, c in keys:
            arr = got.get((lv, r, c))
            if arr is None:
                arr = self.chunk(lv, r, c)
            oy0, oy1 = max(y0, r * ch), min(y1, r * ch + arr.shape[0])
            ox0, ox1 = max(x0, c * cw), min(x1, c * cw + arr.shape[1])
            out[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0] = arr[
                oy0 - r * ch : oy1 - r * ch, ox0 - c * cw : ox1 - c * cw
            ]
        if prefetch and self.prefetch_enabled:
            self._prefetch_ring(level, rows, cols)
        return out

    def chunk(self, level: int, cy: int, cx: int) -> np.ndarray:
        """Chunk (cy, cx) of `level`, from the cache or decoded once (also across threads)."""
        key = (self._token, level, cy, cx)
        arr = self.cache.get(key)
        if arr is not None:
            return arr
        with self._lock:
            event = self._inflight.get(key[1:])
            owner = event is None
            if owner:
                event = self._inflight[key[1:]] = threading.Event()
        assert event is not None
        if not owner:  # another thread is decoding it: wait and take its result
            event.wait()
            arr = self.cache.get(key)
            return arr if arr is not None else self._build(level, cy, cx)
        try:
            arr = self._build(level, cy, cx)
            self.cache.put(key, arr)
        finally:
            with self._lock:
                del self._inflight[key[1:]]
            event.set()
        return arr

    def _build(self, level: int, cy: int, cx: int) -> np.ndarray:
        spec = self.specs[level]
        (h, w), (ch, cw) = spec.shape, spec.chunk
        y0, x0 = cy * ch, cx * cw
        if not (0 <= y0 < h and 0 <= x0 < w):
            raise IndexError(f"chunk ({cy}, {cx}) outside level {level} of {self.slide.path}")
        y1, x1 = min(h, y0 + ch), min(w, x0 + cw)
        if spec.stored is not None:
            arr = self._read_stored(spec, x0, y0, x1 - x0, y1 - y0)
        else:
            fine = self.read(level - 1, 2 * y0, 2 * y1, 2 * x0, 2 * x1, parallel=False)
            arr = box_reduce2(fine, (y1 - y0, x1 - x0))
            with self._lock:
                self.stats.virtual_chunks += 1
        arr.flags.writeable = False  # shared through the cache
        return arr

    def _read_stored(self, spec: LevelSpec, x: int, y: int, w: int, h: int) -> np.ndarray:
        assert spec.stored is not None
        ds = spec.downsample
        prefetching = threading.current_thread() is self._pf_thread
        slide = self._pf_slide[0] if prefetching else self.slide
        arr = slide.read_region((round(x * ds), round(y * ds)), spec.stored, (w, h))
        with self._lock:
            s = self.stats
            s.reads += 1
            s.read_px += w * h
            s.max_read_px = max(s.max_read_px, w * h)
            s.prefetch_reads += prefetching
        return arr

    # -- prefetch ---------------------------------------------------------------------------
    def _prefetch_ring(self, level: int, rows: range, cols: range) -> None:
        """Queue the chunks around rows x cols (nearest the centre first), replacing the queue:
        the latest view is the one that matters."""
        depth = next(d for d in range(level + 1) if self.specs[level - d].stored is not None)
        if depth > _PREFETCH_DEPTH:  # such a chunk needs more than 16 stored chunks: not ahead
            return
        (h, w), (ch, cw) = self.specs[level].shape, self.specs[level].chunk
        nr, nc = math.ceil(h / ch), math.ceil(w / cw)
        ring = [
            (level, r, c)
            for r in range(max(0, rows.start - 1), min(nr, rows.stop + 1))
            for c in range(max(0, cols.start - 1), min(nc, cols.stop + 1))
            if not (r in rows and c in cols)
        ]
        mid_r, mid_c = (rows.start + rows.stop - 1) / 2, (cols.start + cols.stop - 1) / 2
        ring.sort(key=lambda k: (k[1] - mid_r) ** 2 + (k[2] - mid_c) ** 2)
        ring = [k for k in ring if (self._token, *k) not in self.cache]
        with self._pf_cond:
            if self._closed:
                return
            self._pf_queue = ring
            if ring and self._pf_thread is None:
                self._pf_thread = threading.Thread(
                    target=self._prefetch_loop, name="tilescope-prefetch", daemon=True
                )
                self._pf_thread.start()
            self._pf_cond.notify_all()

    def _prefetch_loop(self) -> None:
        if not self._pf_slide:
            try:
                self._pf_slide.append(type(self.slide)(self.slide.path))
            except Exception:  # noqa: BLE001 - the file went away: nothing to prefetch
                with self._pf_cond:
                    self._pf_thread = None
                return
        try:
            while True:
                with self._pf_cond:
                    if not self._pf_queue and not self._closed:
                        self._pf_cond.wait(_IDLE_SECONDS)
                    if not self._pf_queue or self._closed:
                        if self._pf_thread is threading.current_thread():
                            self._pf_thread = None  # the next request starts a new thread
                        return
                    key = self._pf_queue.pop(0)
                try:
                    self.chunk(*key)
                except Exception:  # noqa: BLE001 - a demand read will raise it to the user
                    pass
        finally:
            self._pf_slide[0].close_thread_handle()


_live: weakref.WeakSet[Pyramid] = weakref.WeakSet()


@atexit.register
def _stop_all_prefetching() -> None:
    for pyramid in list(_live):
        pyramid.close()


def _release(cache: ChunkCache, token: int, pf_slide: list[Slide]) -> None:
    cache.drop(token)
    while pf_slide:
        pf_slide.pop().close()


class LazyLevel:
    """One pyramid level as a numpy-like array (h, w, 3) uint8 that reads only what is sliced.

    ``chunks`` tells napari (>= 0.9) the chunk grid, so it asks for whole chunks.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, pyramid: Pyramid, index: int) -> None:
        self.pyramid = pyramid
        self.index = index
        spec = pyramid.specs[index]
        self.spec = spec
        self.downsample = spec.downsample
        self.shape = (*spec.shape, 3)
        self.chunks = (*spec.chunk, 3)

    @property
    def slide(self) -> Slide:
        return self.pyramid.slide

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def virtual(self) -> bool:
        return self.spec.stored is None

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        kind = "virtual" if self.virtual else f"stored level {self.spec.stored}"
        return f"LazyLevel({self.shape[1]}x{self.shape[0]}, downsample {self.downsample:g}, {kind})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[:, :, :]
        return arr if dtype is None else arr.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        ys, xs, cs = key[:3]
        y0, y1, ystep = _bounds(ys, self.shape[0])
        x0, x1, xstep = _bounds(xs, self.shape[1])
        if y1 <= y0 or x1 <= x0:
            empty = np.zeros((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)
            return empty[::ystep, ::xstep][..., cs]
        region = self.pyramid.read(self.index, y0, y1, x0, x1, prefetch=True)
        out = region[::ystep, ::xstep]
        if isinstance(ys, (int, np.integer)):
            out = out[0]
            if isinstance(xs, (int, np.integer)):
                return out[0][cs]
            return out[:, cs]
        if isinstance(xs, (int, np.integer)):
            return out[:, 0][:, cs]
        return out[:, :, cs]


def _bounds(key: Any, n: int) -> tuple[int, int, int]:
    if isinstance(key, (int, np.integer)):
        i = int(key) + (n if key < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"index {key} out of range for axis of size {n}")
        return i, i + 1, 1
    if isinstance(key, slice):
        start, stop, step = key.indices(n)
        if step < 1:
            raise IndexError("LazyLevel supports only positive slice steps")
        return start, stop, step
    raise TypeError(f"LazyLevel supports integer and slice indexing, not {type(key).__name__}")
