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

import itertools
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .slide import Slide

#: Chunk side (px) when the file reports no tiles, and the target for multiples of small tiles.
DEFAULT_CHUNK = 512
#: Default byte budget of the shared chunk cache (``TILESCOPE_VIEW_CACHE_MB`` overrides it).
DEFAULT_CACHE_BYTES = 512 * 2**20
#: Stored levels more than this apart (in downsample) get virtual 2x levels in between.
MAX_LEVEL_GAP = 4.0
#: A stored level this small (px a side) is read in one call: OpenSlide reads a region whose
#: origin is not a whole level pixel (levels whose downsample is not an integer, as in most
#: SVS files) through a sub-pixel resampling that costs about 2.5x per pixel; the origin
#: (0, 0) is always whole.
WHOLE_LEVEL_PX = 2048
_MAX_TILE = 2048  # larger "tiles" (strips, whole-level JPEGs) are read in DEFAULT_CHUNK chunks
_IDLE_SECONDS = 2.0  # the prefetch thread exits after this long without work


class ChunkCache:
    """A thread-safe LRU cache of arrays with a budget in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._max = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def max_bytes(self) -> int:
        return self._max

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        with self._lock:
            self._max = int(value)
            self._evict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            arr = self._items.get(key)
            if arr is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return arr

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: Hashable, arr: np.ndarray) -> None:
        if arr.nbytes > self._max:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._items[key] = arr
            self.nbytes += arr.nbytes
            self._evict()

    def drop(self, owner: Hashable) -> None:
        """Forget every entry whose key is a tuple starting with `owner`."""
        with self._lock:
            for key in [k for k in self._items if isinstance(k, tuple) and k[0] == owner]:
                self.nbytes -= self._items.pop(key).nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def _evict(self) -> None:
        while self.nbytes > self._max and self._items:
            _, arr = self._items.popitem(last=False)
            self.nbytes -= arr.nbytes


_shared: ChunkCache | None = None
_shared_lock = threading.Lock()


def shared_cache() -> ChunkCache:
    """The process-wide chunk cache (budget: ``TILESCOPE_VIEW_CACHE_MB`` or 512 MiB)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            mb = os.environ.get("TILESCOPE_VIEW_CACHE_MB")
            _shared = ChunkCache(int(float(mb) * 2**20) if mb else DEFAULT_CACHE_BYTES)
        return _shared


_pool: ThreadPoolExecutor | None = None


def _decode_pool() -> ThreadPoolExecutor:
    global _pool
    with _shared_lock:
        if _pool is None:
            n = max(2, min(4, os.cpu_count() or 1))
            _pool = ThreadPoolExecutor(n, thread_name_prefix="tilescope-chunks")
        return _pool


@dataclass(frozen=True)
class LevelSpec:
    """One pyramid level: `shape` (h, w) px, `chunk` (h, w) px, level-0 px per px, and the
    slide level it is read from (``None``: virtual, reduced from the level before it)."""

    shape: tuple[int, int]
    chunk: tuple[int, int]
    downsample: float
    stored: int | None


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
        self.specs = _plan_levels(slide, min_size, chunk)
        self.levels = [LazyLevel(self, i) for i in range(len(self.specs))]
        weakref.finalize(self, _release, self.cache, self._token, self._pf_slide)

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
                got = dict(zip(missing, _decode_pool().map(lambda k: self.chunk(*k), missing),
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


def box_reduce2(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Exact 2x box reduce of RGB uint8 `img` to `shape` (h, w): each output pixel is the mean
    of its 2 x 2 input pixels, rounded half up; an odd last row or column is repeated (so edge
    pixels average the pixels there are). Pillow's ``Image.reduce(2)`` computes exactly this,
    in C."""
    from PIL import Image

    out = np.asarray(Image.fromarray(np.ascontiguousarray(img)).reduce(2))
    if out.shape[:2] != tuple(shape):
        raise ValueError(f"2x reduce of {img.shape[:2]} gives {out.shape[:2]}, not {shape}")
    return out


def tile_size(slide: Slide, level: int) -> tuple[int, int] | None:
    """(h, w) of the file's tiles at `level`, as OpenSlide reports them, or ``None``."""
    props = slide.properties
    try:
        tw = int(props[f"openslide.level[{level}].tile-width"])
        th = int(props[f"openslide.level[{level}].tile-height"])
    except (KeyError, ValueError):
        return None
    return (th, tw) if 0 < tw <= _MAX_TILE and 0 < th <= _MAX_TILE else None


def _stored_chunk(slide: Slide, level: int, default: int) -> tuple[int, int]:
    """A whole number of the level's tiles, about `default` px a side (or `default`); a level
    of at most `WHOLE_LEVEL_PX` a side is one chunk."""
    w, h = slide.level_dimensions[level]
    if max(w, h) <= WHOLE_LEVEL_PX:
        return h, w
    tile = tile_size(slide, level)
    if tile is None:
        return default, default
    return tuple(t * max(1, round(default / t)) for t in tile)  # type: ignore[return-value]


def _plan_levels(slide: Slide, min_size: int, chunk: int) -> list[LevelSpec]:
    """Stored levels, virtual 2x levels in gaps wider than `MAX_LEVEL_GAP`, then virtual 2x
    levels until the longer side is at most `min_size`."""

    def virtual(prev: LevelSpec) -> LevelSpec:
        h, w = prev.shape
        return LevelSpec(((h + 1) // 2, (w + 1) // 2), prev.chunk, prev.downsample * 2, None)

    specs: list[LevelSpec] = []
    for i, ((w, h), ds) in enumerate(zip(slide.level_dimensions, slide.level_downsamples,
                                         strict=True)):  # fmt: skip
        while specs and ds > specs[-1].downsample * MAX_LEVEL_GAP * 1.01:
            specs.append(virtual(specs[-1]))
        specs.append(LevelSpec((h, w), _stored_chunk(slide, i, chunk), ds, i))
    while max(specs[-1].shape) > max(1, min_size):
        specs.append(virtual(specs[-1]))
    return specs


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
