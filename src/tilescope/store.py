"""The embedding store: one zarr v3 group per slide, resumable, with a provenance signature.

Layout (zarr v3, a directory ``NAME.zarr``; any zarr v3 reader can read it)::

    NAME.zarr/                   group; attributes "tilescope" = the signature (below) and,
                                 if any tile failed, "tilescope_failures" = [{index, message}]
      coords      (N, 2) int64   level-0 pixel (x, y) of each tile's top-left corner
      grid_rc     (N, 2) int32   (row, col) of each tile in the tile grid
      tissue      (N,)   float32 tissue fraction of each tile, 0..1
      embeddings  (N, D) float32 L2-normalised image embeddings (after the model's projection),
                                 uncompressed chunks of chunk_rows (4096) x D; a row whose
                                 done flag is 0 is not valid (fill value 0)
      done        (N,)   uint8   1 once the embeddings row is written; 2 the tile could not be
                                 read (listed in "tilescope_failures", row stays zeros); 0 not
                                 yet
      scores/<name>/             one group per saved scoring: attribute "tilescope_scores" =
                                 meta (classes, prompts, templates, logit_scale, model_id);
                                 arrays cosine, logits, probs (N, C) float32

Rows are tiles in grid order. ``coords = origin + round(grid_rc[:, ::-1] * stride_l0)``; tile
i covers level-0 pixels ``[x, x + tile_l0) x [y, y + tile_l0)``.

Signature ``attrs["tilescope"]`` (JSON): ``format`` = "tilescope-embeddings",
``format_version`` = 1, ``tilescope_version``, ``model`` (encoder provenance: model_id,
weights_digest, trained, embed_dim, logit_scale, ...), ``grid`` (target_mpp, tile_px,
overlap_px, stride_px, min_tissue, ...), ``layout`` (downsample = level-0 px per target px,
tile_l0, stride_l0, origin [x0, y0], grid_shape [rows, cols]), ``slide`` (name, size_bytes,
dimensions, mpp, header_sha256, ...), ``level0_mpp`` (a number or [x, y]), ``embed_dim``,
``n_tiles``, ``chunk_rows``, ``created`` (ISO 8601, UTC), ``complete`` (true once every row is
done; then also ``completed``).

Crash safety: a new store is built under a temporary name and renamed into place. Rows are
staged in memory and written chunk by chunk (and at least every ``FLUSH_SECONDS``); a chunk's
done flags are written only after its data. zarr's LocalStore writes each file to a temporary
name and renames it over the target, so a killed writer leaves every file old or new, never
torn: a row marked done always holds its final embedding, and rows not marked done are
recomputed on resume. There is no fsync (this guards against a killed process, not against
power loss), and one writer per store at a time.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from os import PathLike
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr
from zarr.storage import LocalStore

from ._signature import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MODEL_IDENTITY_KEYS,
    full_signature,
    jsonable,
    signature_differences,
)
from ._store_io import WriterLock, open_group, remove_store
from .errors import StoreError, StoreMismatchError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MODEL_IDENTITY_KEYS",
    "EmbeddingStore",
    "signature_differences",
]

#: Values of the ``done`` array.
TODO, DONE, FAILED = 0, 1, 2
CHUNK_ROWS = 4096
#: Staged rows are written at least this often (seconds), bounding what a killed writer loses.
FLUSH_SECONDS = 5.0
ARRAYS = ("coords", "grid_rc", "tissue", "embeddings", "done")
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr LocalStore's temporary files
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class EmbeddingStore:
    """Patch embeddings of one slide in a zarr v3 group; see the module docstring for the layout.

    Use `create_or_resume` to write and `open` to read; do not call the constructor directly.

    Examples
    --------
    >>> store = EmbeddingStore.create_or_resume(  # doctest: +SKIP
    ...     "slide.zarr", signature=sig, coords=xy, grid_rc=rc, tissue=t, embed_dim=512)
    >>> with store:  # doctest: +SKIP
    ...     for start, stop in store.pending_ranges():
    ...         store.write(start, encode(tiles[start:stop]))
    ...     store.finalize()
    """

    def __init__(self, path: Path, group: zarr.Group, *, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        self._group = group
        self._sig: dict[str, Any] = dict(cast(Mapping[str, Any], group.attrs["tilescope"]))
        # _open_group checked that each of ARRAYS is an array
        self._arr = {name: cast(zarr.Array, group[name]) for name in ARRAYS}
        self._staged: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._emb_cache: np.ndarray | None = None
        self._lock: WriterLock | None = None  # a writer's lock, held while this object lives
        self.flush_seconds = FLUSH_SECONDS
        self._flushed_at = time.monotonic()
        flags = np.asarray(self._arr["done"][:])
        self._done = flags == DONE
        self._failed = flags == FAILED
        emb = self._arr["embeddings"]
        self.n_tiles, self.embed_dim = int(emb.shape[0]), int(emb.shape[1])
        self.chunk_rows = int(emb.chunks[0])
        self.coords: np.ndarray = np.asarray(self._arr["coords"][:])  # (N, 2) level-0 x, y
        self.grid_rc: np.ndarray = np.asarray(self._arr["grid_rc"][:])  # (N, 2) row, col
        self.tissue: np.ndarray = np.asarray(self._arr["tissue"][:])  # (N,) 0..1
        self.model_id = str(self._sig["model"]["model_id"])
        self.slide_name = str(self._sig["slide"].get("name", path.stem))
        mpp = self._sig["level0_mpp"]  # a number or [mpp_x, mpp_y]
        self.level0_mpp = float(np.mean(mpp))
        self.tile_l0 = float(self._sig["layout"]["tile_l0"])

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | PathLike[str]) -> EmbeddingStore:
        """Open an existing store read-only (saving scores is still allowed)."""
        p = Path(path)
        if not p.exists():
            raise StoreError(f"{p}: no such embedding store; embed the slide first")
        return cls(p, open_group(p, read_only=True), read_only=True)

    @classmethod
    def create_or_resume(
        cls,
        path: str | PathLike[str],
        *,
        signature: Mapping[str, Any],
        coords: np.ndarray,
        grid_rc: np.ndarray,
        tissue: np.ndarray,
        embed_dim: int,
        overwrite: bool = False,
        chunk_rows: int = CHUNK_ROWS,
    ) -> EmbeddingStore:
        """Create a store, or resume one made with an equal signature and layout.

        Parameters
        ----------
        path
            Store directory, conventionally ``NAME.zarr``.
        signature
            At least model, grid, layout, slide, level0_mpp (`level0_mpp` a number or [x, y]).
        coords, grid_rc, tissue
            The tile layout: (N, 2) level-0 (x, y), (N, 2) (row, col), (N,) tissue fraction.
        embed_dim
            Embedding width D.
        overwrite
            Delete an existing store at `path` (mismatching or corrupt) and start afresh.
        chunk_rows
            Rows per chunk of ``embeddings`` for a new store.

        Raises
        ------
        StoreMismatchError
            The existing store was made with other parameters (each difference is listed).
        StoreCorruptError
            Something that is not a readable Tilescope store is at `path`. Neither error
            changes anything on disk.
        """
        p = Path(path)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        n = len(coords)
        grid_rc = np.asarray(grid_rc, dtype=np.int32).reshape(-1, 2)
        tissue = np.asarray(tissue, dtype=np.float32).reshape(-1)
        if len(grid_rc) != n or len(tissue) != n:
            raise StoreError(f"{p}: coords, grid_rc and tissue must have the same length")
        if int(embed_dim) < 1 or chunk_rows < 1:
            raise StoreError(f"{p}: embed_dim and chunk_rows must be positive")
        sig = full_signature(p, signature, n=n, embed_dim=int(embed_dim), chunk_rows=chunk_rows)
        lock = WriterLock(p)  # one writer per store; released by close() or when dropped
        try:
            store = cls._create_or_resume(p, sig, coords, grid_rc, tissue, overwrite, chunk_rows)
        except BaseException:
            lock.release()
            raise
        store._lock = lock
        return store

    @classmethod
    def _create_or_resume(
        cls,
        p: Path,
        sig: dict[str, Any],
        coords: np.ndarray,
        grid_rc: np.ndarray,
        tissue: np.ndarray,
        overwrite: bool,
        chunk_rows: int,
    ) -> EmbeddingStore:
        n, embed_dim = len(coords), int(sig["embed_dim"])
        if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
            pass  # an empty folder holds nothing to lose: create the store in it
        elif p.exists() or p.is_symlink():
            if overwrite:
                remove_store(p)
            else:
                store = cls(p, open_group(p, read_only=False), read_only=False)
                store._check_resume(sig, coords, grid_rc, tissue)
                for f in p.rglob("*.partial"):  # temporaries of a killed writer
                    if _PARTIAL.search(f.name):
                        f.unlink()
                return store
        # build under a temporary name and rename: a store path never holds half a store
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
        try:
            group = zarr.open_group(LocalStore(tmp), mode="w-", zarr_format=3)
            rows, d = max(1, min(chunk_rows, n)), int(embed_dim)
            group.create_array("coords", data=coords, chunks=(rows, 2))
            group.create_array("grid_rc", data=grid_rc, chunks=(rows, 2))
            group.create_array("tissue", data=tissue, chunks=(rows,))
            group.create_array(
                "embeddings", shape=(n, d), dtype="float32", chunks=(rows, d),
                compressors=None, fill_value=0.0,
            )  # fmt: skip
            group.create_array("done", shape=(n,), dtype="uint8", chunks=(rows,), fill_value=0)
            group.attrs["tilescope"] = sig
            os.replace(tmp, p)  # also onto an empty folder
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return cls(p, open_group(p, read_only=False), read_only=False)

    def _check_resume(
        self, sig: dict[str, Any], coords: np.ndarray, grid_rc: np.ndarray, tissue: np.ndarray
    ) -> None:
        diffs = signature_differences(self._sig, sig)
        if self.complete:  # nothing left to write: another tilescope version may reuse it
            diffs = [d for d in diffs if not d.startswith("tilescope_version")]
        if not diffs:
            if not np.array_equal(self.coords, coords) or not np.array_equal(self.grid_rc, grid_rc):
                diffs.append("tile coordinates differ from the requested layout")
            elif not np.allclose(self.tissue, tissue, atol=1e-6, equal_nan=True):
                diffs.append("tissue fractions differ from the requested layout")
        if diffs:
            raise StoreMismatchError(
                f"{self.path}: this store was made with other parameters:\n  "
                + "\n  ".join(diffs)
                + "\nUse another output path, or --overwrite / overwrite=True to replace it."
            )

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()
        self.close()

    def close(self) -> None:
        """Flush staged rows (if writable) and let other writers in."""
        if not self.read_only:
            self.flush()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{self.n_done}/{self.n_tiles} done"
        return f"EmbeddingStore({str(self.path)!r}, {self.model_id}, D={self.embed_dim}, {state})"

    # -- metadata and arrays ----------------------------------------------------------------
    @property
    def signature(self) -> dict[str, Any]:
        """A copy of the provenance signature (``attrs["tilescope"]``)."""
        return jsonable(self._sig)

    @property
    def complete(self) -> bool:
        return bool(self._sig.get("complete", False))

    @property
    def embeddings(self) -> np.ndarray:
        """(N, D) float32, read whole (kept in memory if read-only); rows not done are zeros."""
        if self._emb_cache is not None:
            return self._emb_cache
        emb = self.read_embeddings()
        if self.read_only:
            self._emb_cache = emb
        return emb

    def read_embeddings(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of the embeddings, read from disk and not kept."""
        if self._emb_cache is not None:
            return self._emb_cache[start:stop]
        return np.asarray(self._arr["embeddings"][start:stop])

    @property
    def done(self) -> np.ndarray:
        """(N,) bool: rows written to disk and marked done."""
        return self._done.copy()

    @property
    def n_done(self) -> int:
        return int(self._done.sum())

    def todo_indices(self, *, include_failed: bool = False) -> np.ndarray:
        """Rows neither done on disk nor staged in memory, ascending (int64).

        Rows recorded as failed are left out unless `include_failed` (to retry them)."""
        todo = ~self._done if include_failed else ~(self._done | self._failed)
        rows = self.chunk_rows
        for c, (_, staged) in self._staged.items():
            todo[c * rows : c * rows + len(staged)] &= ~staged
        return np.flatnonzero(todo).astype(np.int64)

    def pending_ranges(self) -> list[tuple[int, int]]:
        """`todo_indices` as sorted half-open ``(start, stop)`` runs."""
        return _runs(self.todo_indices())

    # -- writing ----------------------------------------------------------------------------
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
        norms = np.linalg.norm(emb, axis=1)
        if not np.all(np.isfinite(emb)) or not np.allclose(norms, 1.0, atol=1e-2):
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

    def record_failures(self, failures: Iterable[tuple[int, str]]) -> None:
        """Flush, then mark tiles that could not be read as failed (``done`` = 2) and list them
        in ``attrs["tilescope_failures"]`` (``{"index", "message"}``), together with earlier
        failures that are still not embedded. Failed rows are not retried on resume unless
        asked (`todo_indices(include_failed=True)`); they do not keep a store from completing.
        """
        self._check_writable()
        self.flush()
        merged = {i: m for i, m in self.failures if not self._done[i]}
        merged.update((int(i), str(m)) for i, m in failures)
        idx = np.array(sorted(merged), dtype=np.int64)
        for a, b in _runs(idx):
            self._arr["done"][a:b] = FAILED
        self._failed[:] = False
        self._failed[idx] = True
        rows: list[dict[str, int | str]] = [
            {"index": int(i), "message": merged[int(i)]} for i in idx
        ]
        if rows or "tilescope_failures" in self._group.attrs:
            self._group.attrs["tilescope_failures"] = rows

    @property
    def n_failed(self) -> int:
        return int(self._failed.sum())

    @property
    def failures(self) -> list[tuple[int, str]]:
        """Tiles that could not be read and are not embedded: (row, message)."""
        rows = self._group.attrs.get("tilescope_failures") or []
        # JSON written by record_failures: a list of {"index": int, "message": str}
        return [(int(r["index"]), str(r["message"])) for r in cast(list[dict[str, Any]], rows)]

    @staticmethod
    def is_complete(path: str | PathLike[str]) -> bool:
        """True if `path` holds a readable store marked complete; never raises."""
        try:
            return EmbeddingStore.open(path).complete
        except (StoreError, OSError):
            return False

    def _flush_chunk(self, c: int) -> None:
        buf, staged = self._staged[c]
        c0 = c * self.chunk_rows
        runs = _runs(np.flatnonzero(staged))
        for a, b in runs:  # data first ...
            self._arr["embeddings"][c0 + a : c0 + b] = buf[a:b]
        for a, b in runs:  # ... then the flags, so a done row always holds its final data
            self._arr["done"][c0 + a : c0 + b] = DONE
            self._done[c0 + a : c0 + b] = True
            self._failed[c0 + a : c0 + b] = False
        del self._staged[c]

    def finalize(self) -> None:
        """Flush, check every row is done (or recorded as failed) and mark the store complete.

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
        self._sig = {**self._sig, "complete": True, "completed": now, "n_failed": self.n_failed}
        self._group.attrs["tilescope"] = self._sig

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.path}: opened read-only; use create_or_resume to write")

    # -- scores -----------------------------------------------------------------------------
    def write_scores(
        self, name: str, scores: Mapping[str, np.ndarray], meta: Mapping[str, Any]
    ) -> None:
        """Save arrays with N rows under ``scores/<name>``, replacing a previous one.

        Allowed on stores opened read-only (embeddings stay untouched). The store must be
        complete. ``meta`` (JSON) is written last; a set without it is not listed.
        """
        if not _NAME.match(name):
            raise StoreError(f"{self.path}: score name {name!r} may use only A-Z a-z 0-9 _ . -")
        if not self.complete:
            raise StoreError(
                f"{self.path}: the store is incomplete ({self.n_done}/{self.n_tiles} tiles); "
                "finish embedding (run the same command again) before saving scores"
            )
        for key, arr in scores.items():
            if not _NAME.match(key) or np.shape(arr)[:1] != (self.n_tiles,):
                raise StoreError(
                    f"{self.path}: score array {key!r} must have N={self.n_tiles} rows"
                )
        root = zarr.open_group(LocalStore(self.path), mode="r+", use_consolidated=False)
        parent = root.require_group("scores")
        group = parent.create_group(name, overwrite=True)
        for key, arr in scores.items():
            arr = np.asarray(arr)
            group.create_array(
                key, data=arr, chunks=(max(1, min(self.chunk_rows, len(arr))),) + arr.shape[1:]
            )
        group.attrs["tilescope_scores"] = jsonable(dict(meta))

    def score_names(self) -> list[str]:
        """Names of complete saved score sets, sorted."""
        if not (self.path / "scores" / "zarr.json").exists():
            return []
        parent = cast(zarr.Group, open_group(self.path, read_only=True)["scores"])
        return sorted(k for k, g in parent.groups() if "tilescope_scores" in g.attrs)

    def read_scores(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and meta of the score set `name`."""
        if name not in self.score_names():
            have = ", ".join(self.score_names()) or "none"
            raise StoreError(f"{self.path}: no saved scores named {name!r} (saved: {have})")
        group = cast(zarr.Group, open_group(self.path, read_only=True)[f"scores/{name}"])
        arrays = {k: np.asarray(a[:]) for k, a in group.arrays()}
        return arrays, dict(cast(Mapping[str, Any], group.attrs["tilescope_scores"]))


# -- helpers ------------------------------------------------------------------------------------
def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Sorted indices as half-open runs ``(start, stop)``."""
    if len(idx) == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(idx)]])
    return [(int(idx[a]), int(idx[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]
