"""The chunk cache of `tilescope.pyramid`: a thread-safe LRU with a byte budget, shared by every
pyramid of the process, and the threads that decode chunks in parallel."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: Default byte budget of the shared chunk cache (``TILESCOPE_VIEW_CACHE_MB`` overrides it).
DEFAULT_CACHE_BYTES = 512 * 2**20


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


def decode_pool() -> ThreadPoolExecutor:
    global _pool
    with _shared_lock:
        if _pool is None:
            n = max(2, min(4, os.cpu_count() or 1))
            _pool = ThreadPoolExecutor(n, thread_name_prefix="tilescope-chunks")
        return _pool
