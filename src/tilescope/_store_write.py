"""Writing rows, failures, completion and publication of a store: the writer's half of
`EmbeddingStore` (see `tilescope.store` for the crash-safety rules these methods keep)."""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from . import _fsops
from ._store_io import WriterLock, open_group
from ._store_state import DONE, FAILED, bad_embedding_rows
from .errors import StoreError


class StoreWriting:
    """Mixin of `EmbeddingStore`: every method that writes."""

    path: Path
    _root: Path
    read_only: bool
    _group: zarr.Group
    _sig: dict[str, Any]
    _arr: dict[str, zarr.Array]
    _staged: dict[int, tuple[np.ndarray, np.ndarray]]
    _done: np.ndarray
    _failed: np.ndarray
    _lock: WriterLock | None
    flush_seconds: float
    _flushed_at: float
    n_tiles: int
    embed_dim: int
    chunk_rows: int

    @property
    def failures(self) -> list[tuple[int, str]]:  # pragma: no cover - defined by the store
        raise NotImplementedError

    @property
    def n_failed(self) -> int:  # pragma: no cover - defined by the store
        raise NotImplementedError

    @property
    def is_replacement(self) -> bool:
        """True while this store is being built beside the one it will replace."""
        return self._root != self.path

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Turn a file-system error while writing into a `StoreError` naming the store."""
        try:
            yield
        except OSError as exc:
            hint = "free some disk space, then run again" if exc.errno == errno.ENOSPC else (
                "check the folder's permissions, then run again")  # fmt: skip
            raise StoreError(
                f"{self.path}: could not {what} ({exc.strerror or exc}); {hint}: what was "
                "written so far is kept and resumed"
            ) from exc

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.path}: opened read-only; use create_or_resume to write")

    def write(self, start: int, embeddings: np.ndarray) -> None:
        """`write_rows` for the contiguous rows ``start .. start + len(embeddings)``."""
        self.write_rows(np.arange(start, start + len(embeddings)), embeddings)

    def write_rows(self, indices: np.ndarray, embeddings: np.ndarray) -> None:
        """Stage embeddings (K, D) of rows `indices` (K,); save chunks that become whole.

        A chunk is written (data first, then its done flags) once every row of it is done or
        staged. Staged rows of unfinished chunks are written by `flush`, on leaving a ``with``
        block, by `finalize`, and at least every `flush_seconds`, which bounds what a killed
        writer loses.
        """
        self._check_writable()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        emb = np.asarray(embeddings, dtype=np.float32)
        n, d, rows = self.n_tiles, self.embed_dim, self.chunk_rows
        if emb.shape != (len(idx), d) or (len(idx) and not 0 <= idx.min() <= idx.max() < n):
            raise StoreError(
                f"{self.path}: cannot write {emb.shape} embeddings to rows "
                f"{idx.min() if len(idx) else ''}..: the store holds {n} rows of width {d}"
            )
        if len(bad_embedding_rows(emb, np.ones(len(emb), bool))):
            raise StoreError(f"{self.path}: embeddings must be finite and L2-normalised")
        if not len(idx):
            return
        order = np.argsort(idx, kind="stable")
        idx, emb = idx[order], emb[order]
        chunk = idx // rows
        bounds = np.flatnonzero(np.diff(chunk)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(idx)], strict=True):
            c = int(chunk[a])
            c0, c1 = c * rows, min((c + 1) * rows, n)
            buf, staged = self._staged.setdefault(
                c, (np.zeros((c1 - c0, d), np.float32), np.zeros(c1 - c0, bool))
            )
            buf[idx[a:b] - c0] = emb[a:b]
            staged[idx[a:b] - c0] = True
            if np.all(staged | self._done[c0:c1] | self._failed[c0:c1]):
                self._flush_chunk(c)
        if self._staged and time.monotonic() - self._flushed_at > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write every staged row (partial chunks too) and mark it done."""
        for c in sorted(self._staged):
            self._flush_chunk(c)
        self._flushed_at = time.monotonic()

    def _flush_chunk(self, c: int) -> None:
        buf, staged = self._staged[c]
        c0 = c * self.chunk_rows
        runs = _runs(np.flatnonzero(staged))
        with self._writing("write embeddings"):
            for a, b in runs:  # data first ...
                self._arr["embeddings"][c0 + a : c0 + b] = buf[a:b]
            for a, b in runs:  # ... then the flags, so a done row always holds its final data
                self._arr["done"][c0 + a : c0 + b] = DONE
                self._done[c0 + a : c0 + b] = True
                self._failed[c0 + a : c0 + b] = False
        del self._staged[c]

    def record_failures(self, failures: Iterable[tuple[int, str]]) -> None:
        """Flush, then mark tiles that could not be read as failed (``done`` = 2) and list them
        in ``attrs["tilescope_failures"]`` (``{"index", "message"}``), together with earlier
        failures that are still not embedded. Failed rows are not retried on resume unless
        asked (`todo_indices(include_failed=True)`); they do not keep a store from completing.

        The messages are written before the flags, so a killed run never leaves a row marked
        failed without its message. Nothing is written when nothing changes.
        """
        new = [(int(i), str(m)) for i, m in failures]
        if self._staged:
            self._check_writable()
            self.flush()
        merged = {i: m for i, m in self.failures if not self._done[i]}
        merged.update(new)
        idx = np.array(sorted(merged), dtype=np.int64)
        rows: list[dict[str, int | str]] = [
            {"index": int(i), "message": merged[int(i)]} for i in idx
        ]
        listed = self._group.attrs.get("tilescope_failures")
        if np.array_equal(idx, np.flatnonzero(self._failed)) and (listed or []) == rows:
            return  # nothing changes (also on a read-only store)
        self._check_writable()
        with self._writing("record failed tiles"):
            if rows or listed is not None:
                self._group.attrs["tilescope_failures"] = rows  # messages first ...
            for a, b in _runs(idx):  # ... then the flags
                self._arr["done"][a:b] = FAILED
        self._failed[:] = False
        self._failed[idx] = True

    def finalize(self) -> None:
        """Flush, check every row is done (or recorded as failed), mark the store complete, and
        publish it (a replacement takes the old store's place).

        A complete store may hold failed rows (``n_failed`` in the signature): they are zeros,
        ``done`` = 2, and scoring, search and export leave them out.
        """
        self._check_writable()
        self.flush()
        left = int((~(self._done | self._failed)).sum())
        if left:
            raise StoreError(
                f"{self.path}: {left} of {self.n_tiles} tiles are not embedded yet; run the "
                "same command again to resume"
            )
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._set_signature(complete=True, completed=now, n_failed=self.n_failed)
        self.publish()

    def _set_signature(self, **changes: Any) -> None:
        with self._writing("update the signature"):
            self._sig = {**self._sig, **changes}
            self._group.attrs["tilescope"] = self._sig

    def publish(self) -> None:
        """Swap a replacement store into its place (atomically; see the module). A store that
        is no replacement is left as it is."""
        if not self.is_replacement:
            return
        self._check_writable()
        self.flush()
        with self._writing("replace the old store"):
            _fsops.publish(self._root, self.path)
        self._root = self.path
        self._group, _, self._arr = open_group(self.path, read_only=False)


# -- helpers ------------------------------------------------------------------------------------
def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Sorted indices as half-open runs ``(start, stop)``."""
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(idx)]])
    return [(int(idx[a]), int(idx[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]
