"""`TileSchedule`: the order in which a stream reads tiles, changeable while it runs.

A schedule holds the tiles still to read, grouped in *blocks* (neighbouring tiles that the
readers fetch with one read; `tilescope.tiles` decides the blocks). Readers take whole blocks,
best first; a block's priority is the best (lowest) key among its remaining tiles. Any thread
may, at any time:

- `prioritize` with one float key per tile (lower is sooner; e.g. the distance to the centre
  of the napari view): what has not been handed to a reader yet is re-ordered;
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
        """Hand out up to `max_tiles` tiles of the best block (best keys first within it);
        None when no allowed tile is left."""
        with self._lock:
            while self._cursor < len(self._order):
                b = int(self._order[self._cursor])
                a, z = self._starts[b], self._starts[b + 1]
                free = np.flatnonzero(~self._taken[a:z] & self._allowed[a:z]) + a
                if not len(free):
                    self._cursor += 1
                    continue
                pick = free[np.lexsort((self._todo[free], self._key[free]))][:max_tiles]
                self._taken[pick] = True
                if len(pick) == len(free):
                    self._cursor += 1
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
        """Blocks with a pending tile, by their best pending key (ties: first tile index)."""
        pend = self._pending()
        n_blocks = len(self._starts) - 1
        if not n_blocks:
            self._order, self._cursor = np.zeros(0, np.int64), 0
            return
        key = np.where(pend, self._key, np.inf)
        best = np.minimum.reduceat(key, self._starts[:-1])
        live = np.add.reduceat(pend.astype(np.int64), self._starts[:-1]) > 0
        blocks = np.flatnonzero(live)
        first = self._todo[self._starts[:-1]][blocks]
        self._order = blocks[np.lexsort((first, best[blocks]))]
        self._cursor = 0


def _as_indices(indices: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
