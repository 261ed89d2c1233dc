"""`TileSchedule`: the order in which a stream reads tiles, changeable while it runs.

A schedule holds the tiles still to read, grouped in *blocks* (neighbouring tiles that the
readers fetch with one read; `tilescope.tiles` decides the blocks). Tiles are handed out best
(lowest key) first, a block at a time: the best block's tiles go together, in key order, as
long as none of them is worse than the best tile of another block (a block that straddles the
edge of the view gives its tiles in the view now and the rest when their turn comes). Any
thread may, at any time:

- `prioritize` with one float key per tile (lower is sooner), or `prioritize_view` with the
  napari view (tiles in the view first, nearest its centre first, then outward) or
  `prioritize_near` a point: what has not been handed to a reader yet is re-ordered;
- `restrict` to some tiles, or `restrict_to_regions` (a drawn region, the current view), or
  lift the restriction;
- ask what `remaining` tiles have not been handed out.

Blocks already handed to a reader are not affected. A stream ends when no allowed tile is
left. A schedule serves one stream: `stream_tiles` (or `iter_embed_slide`) binds it to the
tiles it has to read (a resumed run: the store's missing rows).

Examples
--------
>>> schedule = TileSchedule()                                       # doctest: +SKIP
>>> gen = iter_embed_slide(slide, store, encoder=enc, order=schedule)  # doctest: +SKIP
>>> schedule.prioritize_near((cx, cy))  # later, from the GUI thread   # doctest: +SKIP
"""

from __future__ import annotations

import heapq
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import TilescopeError

#: Keys: one float per tile of the layout, or a function of the tile centres (N, 2), level-0.
Keys = np.ndarray | Sequence[float] | tuple[Any, Any] | Callable[[np.ndarray], Any]


class TileSchedule:
    """A thread-safe, re-orderable queue of the tiles of one layout, in blocks.

    Parameters
    ----------
    indices
        Only these tiles (indices into the layout); None: every tile the stream has to read.
    keys
        Initial keys (see `prioritize`); None keeps grid order.
    """

    def __init__(self, indices: Sequence[int] | np.ndarray | None = None, *,
                 keys: Keys | None = None) -> None:  # fmt: skip
        self._lock = threading.Lock()
        self._bound = threading.Event()
        self._wanted = None if indices is None else _as_indices(indices)
        self._keys_in: Keys | None = keys
        self._allowed_in: np.ndarray | Callable[[Any], np.ndarray] | None = None
        self.layout: Any = None
        self._todo = np.zeros(0, np.int64)

    @classmethod
    def from_order(cls, indices: Sequence[int] | np.ndarray) -> TileSchedule:
        """Exactly these tiles, in this order (as far as blocks allow: a block goes when its
        earliest tile is due)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        first = np.unique(idx, return_index=True)[1]
        idx = idx[np.sort(first)]
        return cls(idx, keys=(idx, np.arange(len(idx), dtype=np.float64)))

    # -- the user's side (any thread) ---------------------------------------------------------
    @property
    def bound(self) -> bool:
        """True once a stream has bound the schedule (`layout` is set)."""
        return self._bound.is_set()

    def wait_bound(self, timeout: float | None = None) -> bool:
        """Wait until a stream binds the schedule; False on timeout."""
        return self._bound.wait(timeout)

    def prioritize(self, keys: Keys) -> None:
        """Re-order what has not been handed to a reader: lower keys first.

        `keys` is an (N,) array over the layout's tiles (NaN = last), a pair ``(indices,
        keys)`` for some tiles (the others go last), or a function of the tile centres
        ``(N, 2)`` in level-0 pixels returning (N,) keys (usable before the schedule is
        bound). Ties keep grid order.
        """
        with self._lock:
            if not self.bound:
                self._keys_in = keys
                return
            self._key = self._resolve_keys(keys)
            self._reorder()

    def prioritize_near(self, point: tuple[float, float]) -> None:
        """Nearest tiles first: key = distance from the tile's centre to `point` (level 0)."""
        px, py = float(point[0]), float(point[1])
        self.prioritize(lambda c: np.hypot(c[:, 0] - px, c[:, 1] - py))

    def prioritize_view(self, box: tuple[float, float, float, float]) -> None:
        """View first: the tiles that overlap `box` (level-0 ``(x0, y0, x1, y1)``, e.g. the
        napari view) first, nearest its centre first, then outward in rings around it
        (`view_keys`). Usable before the schedule is bound; call it again when the view moves.
        """
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise TilescopeError(f"view box {box!r}: four finite level-0 coordinates")
        view = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        self.prioritize(lambda c: view_keys(c, view, _step(self.layout)))

    def restrict(self, indices: Sequence[int] | np.ndarray | None) -> None:
        """Read only these tiles from now on (None: every tile again). Tiles already handed
        out are not taken back."""
        allowed = None if indices is None else _as_indices(indices)
        with self._lock:
            self._allowed_in = allowed
            if self.bound:
                self._apply_restriction()
                self._reorder()

    def restrict_to_regions(self, regions: Any) -> None:
        """Read only the tiles that overlap these level-0 regions (boxes ``(x, y, w, h)``
        and/or shapely polygons; `tilescope.regions.tiles_overlapping`), from now on; usable
        before the schedule is bound. ``restrict(None)`` lifts it."""
        from .regions import as_geometries, tiles_overlapping

        geoms = as_geometries(regions)  # checked now, in the caller's thread
        with self._lock:
            self._allowed_in = lambda lay: tiles_overlapping(lay.coords, lay.tile_l0, geoms)
            if self.bound:
                self._apply_restriction()
                self._reorder()

    def remaining(self) -> np.ndarray:
        """Sorted indices of the allowed tiles not yet handed to a reader."""
        with self._lock:
            if not self.bound:
                return np.zeros(0, np.int64)
            return np.sort(self._todo[self._pending()])

    @property
    def n_remaining(self) -> int:
        with self._lock:
            return int(self._pending().sum()) if self.bound else 0

    @property
    def n_allowed(self) -> int:
        """Tiles this stream reads in all (handed out and remaining) under the restriction in
        force (0 before the schedule is bound)."""
        with self._lock:
            return int((self._allowed | self._taken).sum()) if self.bound else 0

    def todo(self) -> np.ndarray:
        """Sorted indices of every tile the stream was bound to read (restricted or not)."""
        with self._lock:
            return np.sort(self._todo) if self.bound else np.zeros(0, np.int64)

    def handed_out(self) -> np.ndarray:
        """Sorted indices of the tiles handed to a reader so far (being read or embedded, or
        done)."""
        with self._lock:
            if not self.bound:
                return np.zeros(0, np.int64)
            return np.sort(self._todo[self._taken])

    # -- the stream's side --------------------------------------------------------------------
    def bind(self, layout: Any, todo: np.ndarray, groups: np.ndarray) -> None:
        """Attach to `layout`: read `todo` (sorted indices, intersected with the schedule's
        own `indices`), in blocks ``groups[i]`` (one block id per layout tile)."""
        with self._lock:
            if self.bound:
                raise TilescopeError("this TileSchedule is already bound to a stream; make one "
                                     "schedule per stream")  # fmt: skip
            todo = np.asarray(todo, dtype=np.int64)
            if self._wanted is not None:
                todo = np.intersect1d(todo, self._wanted)
            groups = np.asarray(groups, dtype=np.int64)
            order = np.lexsort((todo, groups[todo]))
            self._todo = todo[order]  # tiles sorted by block, then index
            g = groups[self._todo]
            starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if len(g) else np.zeros(0, int)
            self._starts = np.r_[starts, len(g)].astype(np.int64)
            self._taken = np.zeros(len(self._todo), bool)
            self._allowed = np.ones(len(self._todo), bool)
            self.layout = layout
            self._centres: np.ndarray | None = None
            self._key = np.arange(len(self._todo), dtype=np.float64)  # grid order
            self._bound.set()
            if self._keys_in is not None:
                self._key = self._resolve_keys(self._keys_in)
            self._apply_restriction()
            self._reorder()

    def take(self, max_tiles: int) -> np.ndarray | None:
        """Hand out up to `max_tiles` tiles of the best block, best keys first, and only those
        no worse than the best tile of the next block; None when no allowed tile is left."""
        with self._lock:
            heap = self._heap
            while heap:
                _, first, b = heapq.heappop(heap)
                a, z = self._starts[b], self._starts[b + 1]
                free = np.flatnonzero(~self._taken[a:z] & self._allowed[a:z]) + a
                if not len(free):
                    continue
                free = free[np.lexsort((self._todo[free], self._key[free]))]
                limit = heap[0][0] if heap else np.inf  # the next block's best key
                n = max(1, int(np.searchsorted(self._key[free], limit, side="right")))
                pick = free[: min(n, max_tiles)]
                self._taken[pick] = True
                if len(pick) < len(free):  # the rest waits for its turn
                    heapq.heappush(heap, (float(self._key[free[len(pick)]]), first, b))
                return self._todo[pick]
            return None

    # -- internals (under the lock) -----------------------------------------------------------
    def _pending(self) -> np.ndarray:
        return ~self._taken & self._allowed

    def _apply_restriction(self) -> None:
        allowed = self._allowed_in
        if allowed is None:
            self._allowed[:] = True
            return
        if callable(allowed):
            allowed = allowed(self.layout)
        self._allowed = np.isin(self._todo, allowed)

    def _resolve_keys(self, keys: Keys) -> np.ndarray:
        """Keys aligned with ``self._todo`` (float64, NaN -> +inf)."""
        n = len(self.layout)
        if callable(keys):
            if self._centres is None:
                half = float(self.layout.tile_l0) / 2
                self._centres = np.asarray(self.layout.coords, np.float64) + half
            centres: np.ndarray = self._centres
            full = np.asarray(keys(centres), dtype=np.float64).reshape(-1)
        elif isinstance(keys, tuple) and len(keys) == 2:
            idx, val = (np.asarray(v).reshape(-1) for v in keys)
            full = np.full(n, np.inf)
            full[idx.astype(np.int64)] = val.astype(np.float64)
        else:
            full = np.asarray(keys, dtype=np.float64).reshape(-1)
        if len(full) != n:
            raise TilescopeError(f"keys must give one value per tile of the layout ({n}), got "
                                 f"{len(full)}")  # fmt: skip
        key = full[self._todo]
        return np.where(np.isnan(key), np.inf, key)

    def _reorder(self) -> None:
        """A heap of the blocks with a pending tile: (best pending key, first tile, block)."""
        pend = self._pending()
        n_blocks = len(self._starts) - 1
        if not n_blocks:
            self._heap: list[tuple[float, int, int]] = []
            return
        key = np.where(pend, self._key, np.inf)
        best = np.minimum.reduceat(key, self._starts[:-1])
        live = np.add.reduceat(pend.astype(np.int64), self._starts[:-1]) > 0
        blocks = np.flatnonzero(live)
        first = self._todo[self._starts[:-1]][blocks]
        self._heap = list(zip(best[blocks].tolist(), first.tolist(), blocks.tolist(),
                              strict=True))  # fmt: skip
        heapq.heapify(self._heap)


def view_keys(centres: np.ndarray, box: tuple[float, float, float, float],
              step: float) -> np.ndarray:  # fmt: skip
    """Keys (lower is sooner) that put the tiles of a view first, then the rest outward.

    `centres` are tile centres (N, 2) and `box` the view ``(x0, y0, x1, y1)``, level-0 px;
    `step` is the tile stride. A tile overlaps the view when its centre is less than half a
    tile outside `box`: those come first, in rings one tile wide around the view's centre
    (key = whole tiles from the centre). The others follow in rectangular rings two tiles wide
    around the view, nearest first, so what lies just off screen on any side comes next.
    """
    c = np.asarray(centres, np.float64).reshape(-1, 2)
    x0, y0, x1, y1 = box
    step = max(float(step), 1e-9)
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    dx, dy = np.abs(c[:, 0] - cx), np.abs(c[:, 1] - cy)
    out = np.maximum(np.maximum(dx - hw, dy - hh), 0.0) / step  # tiles outside the view
    inside = out < 0.5
    first = np.floor(np.hypot(dx, dy) / step)
    offset = math.ceil(math.hypot(hw, hh) / step) + 2.0  # past every tile of the view
    return np.where(inside, first, offset + np.floor((out - 0.5) / 2.0))


def _step(layout: Any) -> float:
    """A layout's tile stride in level-0 px (its tile size without overlap)."""
    return float(getattr(layout, "stride_l0", None) or layout.tile_l0)


def _as_indices(indices: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
