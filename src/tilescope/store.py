"""The embedding store: one zarr v3 group per slide, resumable, with a provenance signature.

Layout (zarr v3, a directory ``NAME.zarr``; any zarr v3 reader can read it)::

    NAME.zarr/                   group; attributes "tilescope" = the signature (below) and,
                                 if any tile failed, "tilescope_failures" = [{index, message}]
      coords      (N, 2) int64   level-0 pixel (x, y) of each tile's top-left corner
      grid_rc     (N, 2) int32   (row, col) of each tile in the tile grid
      tissue      (N,)   float32 tissue fraction of each tile (of its part inside the slide)
      embeddings  (N, D) float32 L2-normalised image embeddings (after the model's projection),
                                 uncompressed chunks of chunk_rows (4096) x D; a row whose
                                 done flag is not 1 is not valid (zeros)
      done        (N,)   uint8   1 once the embeddings row is written; 2 the tile could not be
                                 read (listed in "tilescope_failures", row stays zeros); 0 not
                                 yet
      scores/<name>/             one group per saved scoring: attribute "tilescope_scores" =
                                 meta (classes, prompts, templates, logit_scale, model_id,
                                 store_state: n_tiles, n_done, n_failed, complete);
                                 arrays cosine, logits, probs (N, C) float32 (NaN: not embedded)

Rows are tiles in grid order. ``coords = origin + round(grid_rc[:, ::-1] * stride_l0)``; tile
i covers level-0 pixels ``[x, x + tile_l0) x [y, y + tile_l0)``. Fill values (format 2): a
missing chunk reads as done 255, coords/grid_rc -1, tissue NaN, values no written chunk holds.

Signature ``attrs["tilescope"]`` (JSON): ``format`` = "tilescope-embeddings",
``format_version`` = 2, ``tilescope_version``, ``generation`` (a random id, new for every
store created), ``model`` (encoder provenance: model_id, weights_digest, trained, embed_dim,
logit_scale, compute_precision, ...), ``grid`` (target_mpp, tile_px, overlap_px, stride_px,
min_tissue, edge_policy), ``tissue`` (the tissue detector's parameters), ``layout``
(downsample = level-0 px per target px, tile_l0, stride_l0, origin [x0, y0], grid_shape
[rows, cols]), ``slide`` (name, size_bytes, dimensions, mpp, header_sha256, ...),
``level0_mpp`` (a number or [x, y]), ``embed_dim``, ``n_tiles``, ``chunk_rows``, ``created``
(ISO 8601, UTC), ``complete`` (true once every row is done or failed; then ``completed``).

Crash safety. A new store is built under a temporary name and renamed into place. Rows are
staged in memory and written chunk by chunk (and at least every ``FLUSH_SECONDS``); a chunk's
done flags are written only after its data, and failure messages before the failure flags.
zarr's LocalStore writes each file to a temporary name and renames it over the target, so a
killed writer leaves every file old or new, never torn. There is no fsync (this guards against
a killed process, not against power loss). One writer per store (`filelock`).

Replacing (``overwrite``). The new store is built beside the old one (``.NAME.zarr.replacing``,
resumed by the next overwrite run if this one is killed) and swapped in atomically (see
`tilescope._fsops`) when the run finishes (`finalize` or `publish`); until then the old store
stays as it was. Readers see one store or the other, never a mix: every store has its own
``generation`` id; `open` checks that the id did not change while it read the small arrays,
and every later read (embeddings, scores) checks it again after reading, raising
`StoreReplacedError` if the store was swapped meanwhile.

Integrity. `open` runs the cheap checks of `tilescope._store_state` (shapes, dtypes, the
signature's layout, coords against the layout, readable done flags, embeddings chunk files of
the right size) and raises `StoreCorruptError` naming the store and the array. Every read of
embeddings checks that its done rows are finite unit vectors. A writer (`resume_or_create`)
runs the full check and repairs what re-embedding can: damaged rows are marked not done and
embedded again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from . import _store_scores
from ._signature import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MODEL_IDENTITY_KEYS,
    jsonable,
    signature_differences,
    signature_notices,
)
from ._store_io import READ_HINT, WriterLock, open_group, read_generation
from ._store_state import DONE, FAILED, TODO, Problem, StoreState, bad_embedding_rows, read_state
from ._store_write import StoreWriting, _runs
from .errors import OVERWRITE_WORDS, StoreCorruptError, StoreError, StoreReplacedError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MODEL_IDENTITY_KEYS",
    "EmbeddingStore",
    "signature_differences",
    "signature_notices",
]

CHUNK_ROWS = 4096
#: Staged rows are written at least this often (seconds), bounding what a killed writer loses.
FLUSH_SECONDS = 5.0
ARRAYS = ("coords", "grid_rc", "tissue", "embeddings", "done")
_ = (TODO, DONE, FAILED)  # the values of ``done``, re-exported for callers


def corrupt_error(p: Path, problems: list[Problem]) -> StoreCorruptError:
    """One error for the problems found, naming the store and the first damaged array."""
    fixable = all(pr.repairable for pr in problems)
    todo = (
        "embedding the slide into this store again repairs it (the damaged rows are embedded again)"
        if fixable
        else f"embed the slide again into a new store, or {OVERWRITE_WORDS}"
    )
    lines = "; ".join(pr.describe() for pr in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return StoreCorruptError(f"{p}: the store is damaged: {lines}{more}; {todo}",
                             array=problems[0].array)  # fmt: skip


class EmbeddingStore(StoreWriting):
    """Patch embeddings of one slide in a zarr v3 group; see the module docstring.

    Use `resume_or_create` (or `create_or_resume` with a layout at hand) to write and `open`
    to read; do not call the constructor directly.

    Examples
    --------
    >>> store = EmbeddingStore.create_or_resume(  # doctest: +SKIP
    ...     "slide.zarr", signature=sig, coords=xy, grid_rc=rc, tissue=t, embed_dim=512)
    >>> with store:  # doctest: +SKIP
    ...     for start, stop in store.pending_ranges():
    ...         store.write(start, encode(tiles[start:stop]))
    ...     store.finalize()
    """

    def __init__(
        self,
        path: Path,
        group: zarr.Group,
        sig: dict[str, Any],
        arrays: dict[str, zarr.Array],
        state: StoreState,
        *,
        read_only: bool,
        root: Path | None = None,
    ) -> None:
        self.path = path  #: where the store is (once published, for a replacement)
        self._root = root or path  # where its files are now
        self.read_only = read_only
        self._group = group
        self._sig = sig
        self._arr = arrays
        self._staged: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._emb_cache: np.ndarray | None = None
        self._lock: WriterLock | None = None  # a writer's lock, held while this object lives
        self.flush_seconds = FLUSH_SECONDS
        self._flushed_at = time.monotonic()
        self._done = state.flags == DONE
        self._failed = state.flags == FAILED
        self.problems: list[Problem] = state.problems  #: found on opening (writers only)
        self.notices: list[str] = []  #: provenance that differs from the run resuming it
        self.repaired: list[str] = []  #: damage a writer found and will re-embed
        emb = self._arr["embeddings"]
        self.n_tiles, self.embed_dim = int(emb.shape[0]), int(emb.shape[1])
        self.chunk_rows = int(emb.chunks[0])
        self.coords: np.ndarray = state.coords  # (N, 2) level-0 x, y
        self.grid_rc: np.ndarray = state.grid_rc  # (N, 2) row, col
        self.tissue: np.ndarray = state.tissue  # (N,) 0..1
        self.model_id = str(self._sig["model"]["model_id"])
        self.slide_name = str(self._sig["slide"].get("name", path.stem))
        self.level0_mpp = float(np.mean(self._sig["level0_mpp"]))  # a number or [x, y]
        self.tile_l0 = float(self._sig["layout"]["tile_l0"])

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | PathLike[str]) -> EmbeddingStore:
        """Open an existing store read-only (saving scores is still allowed).

        Raises `StoreCorruptError` if the cheap integrity checks fail (see the module).
        """
        p = Path(path)
        if not p.exists():
            raise StoreError(f"{p}: no such embedding store; embed the slide first")
        for _attempt in range(3):  # a store swapped in while we read: read the new one
            group, sig, arrays = open_group(p, read_only=True, hint=READ_HINT)
            state = read_state(p, arrays, sig)
            if read_generation(p) == sig.get("generation", ""):
                break
        else:
            raise StoreReplacedError(f"{p}: the store is being replaced; try again")
        if state.problems:
            raise corrupt_error(p, state.problems)
        return cls(p, group, sig, arrays, state, read_only=True)

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
        """`resume_or_create` with the layout given: (N, 2) level-0 (x, y) `coords`, (N, 2)
        `grid_rc`, (N,) `tissue`. A store whose tiles differ from `coords` / `grid_rc`
        counts as made with other parameters."""
        from ._store_open import Layout

        lay = Layout(coords, grid_rc, tissue)
        if len(lay.grid_rc) != len(lay.coords) or len(lay.tissue) != len(lay.coords):
            raise StoreError(f"{path}: coords, grid_rc and tissue must have the same length")
        return cls.resume_or_create(
            path,
            signature=signature,
            embed_dim=embed_dim,
            make_layout=lambda: lay,
            overwrite=overwrite,
            chunk_rows=chunk_rows,
            compare_layout=True,
        )

    @classmethod
    def resume_or_create(
        cls,
        path: str | PathLike[str],
        *,
        signature: Mapping[str, Any],
        embed_dim: int,
        make_layout: Callable[[], Any],
        overwrite: bool = False,
        chunk_rows: int = CHUNK_ROWS,
        retry_failed: bool = False,
        compare_layout: bool = False,
    ) -> EmbeddingStore:
        """Resume the store at `path` from its own tiles, or create it.

        Parameters
        ----------
        path
            Store directory, conventionally ``NAME.zarr``.
        signature
            At least model, grid, layout, slide, level0_mpp (no tile count: the store's own
            tiles are resumed, so a tissue mask that moved by a pixel changes nothing).
        embed_dim
            Embedding width D.
        make_layout
            Called only to create a store (or rebuild damaged layout arrays): returns an
            object with ``coords`` (N, 2), ``grid_rc`` (N, 2) and ``tissue`` (N,).
        overwrite
            Replace a store of the same slide made with other parameters, or an unreadable
            one. The replacement is built beside it and swapped in by `finalize`/`publish`.
            A store of another slide is never replaced.
        chunk_rows
            Rows per chunk of ``embeddings`` for a new store.
        retry_failed
            A complete store with failed tiles will be written (they are retried).
        compare_layout
            Also refuse a store whose tiles differ from ``make_layout()``'s.

        Returns
        -------
        EmbeddingStore
            Writable and locked; or, for a complete store with nothing to do in a folder
            where no lock file can be made (a read-only file system), read-only.

        Raises
        ------
        StoreMismatchError
            The store was made with other parameters (each is listed), or holds another slide.
        StoreCorruptError
            What is at `path` is not a readable store (without `overwrite`), or its layout is
            damaged beyond repair. Neither error changes anything on disk.
        StoreBusyError
            Another writer holds the store.
        """
        from ._store_open import resume_or_create

        return resume_or_create(
            cls, Path(path), signature, int(embed_dim), make_layout, overwrite=overwrite,
            chunk_rows=chunk_rows, retry_failed=retry_failed, compare_layout=compare_layout,
        )  # fmt: skip

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush staged rows (if writable) and let other writers in. Does not publish."""
        try:
            if not self.read_only:
                self.flush()
        finally:
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
        return cast(dict[str, Any], jsonable(self._sig))

    @property
    def complete(self) -> bool:
        return bool(self._sig.get("complete", False))

    @property
    def generation(self) -> str:
        """The id of this store's generation (new whenever a store is created or replaced)."""
        return str(self._sig.get("generation", ""))

    def _check_generation(self) -> None:
        """Raise `StoreReplacedError` if another store was swapped in since this one opened."""
        if self.read_only and read_generation(self._root) != self.generation:
            raise StoreReplacedError(
                f"{self.path}: the store was replaced (by an embed with overwrite) while it "
                "was being read; open it again"
            )

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
        """Rows ``start:stop`` of the embeddings, read from disk (not kept) and checked:
        every done row must be a finite unit vector, else `StoreCorruptError`."""
        if self._emb_cache is not None:
            return self._emb_cache[start:stop]
        a, b, _ = slice(start, stop).indices(self.n_tiles)
        try:
            block = np.asarray(self._arr["embeddings"][a:b])
        except Exception as exc:  # noqa: BLE001 - zarr raises many kinds for damaged chunks
            from ._store_state import scan_embeddings

            found = [pr for pr in scan_embeddings(self._arr["embeddings"], self._done)]
            raise corrupt_error(
                self.path, found or [Problem("embeddings", f"rows {a}-{b} cannot be read ({exc})")]
            ) from exc
        self._check_generation()
        bad = bad_embedding_rows(block, self._done[a:b])
        if len(bad):
            from ._store_state import rows_text

            raise corrupt_error(self.path, [Problem("embeddings", f"{rows_text(a + bad)} marked "
                                "done are not finite unit vectors (zeroed or overwritten data)",
                                a + bad)])  # fmt: skip
        return block

    @property
    def done(self) -> np.ndarray:
        """(N,) bool: rows written to disk and marked done."""
        return self._done.copy()

    @property
    def n_done(self) -> int:
        return int(self._done.sum())

    @property
    def n_failed(self) -> int:
        return int(self._failed.sum())

    @property
    def n_todo(self) -> int:
        """Rows neither embedded nor recorded as failed."""
        return self.n_tiles - self.n_done - self.n_failed

    def state_text(self) -> str:
        """'214 tiles, all embedded' / '112 of 214 tiles embedded (3 failed, 99 not yet)'."""
        if self.n_done == self.n_tiles:
            return f"{self.n_tiles} tiles, all embedded"
        parts = [f"{self.n_failed} failed"] if self.n_failed else []
        parts += [f"{self.n_todo} not embedded yet"] if self.n_todo else []
        return f"{self.n_done} of {self.n_tiles} tiles embedded ({', '.join(parts)})"

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

    @property
    def failures(self) -> list[tuple[int, str]]:
        """Tiles that could not be read and are not embedded: (row, message)."""
        rows = cast(list[dict[str, Any]], self._group.attrs.get("tilescope_failures") or [])
        # JSON written by record_failures: a list of {"index": int, "message": str}
        listed = {int(r["index"]): str(r["message"]) for r in rows}
        return [(int(i), listed.get(int(i), "(no message recorded)"))
                for i in np.flatnonzero(self._failed)]  # fmt: skip

    @staticmethod
    def is_complete(path: str | PathLike[str]) -> bool:
        """True if `path` holds a readable store marked complete; never raises."""
        try:
            return EmbeddingStore.open(path).complete
        except (StoreError, OSError):
            return False

    # -- scores -----------------------------------------------------------------------------
    def write_scores(
        self, name: str, scores: Mapping[str, np.ndarray], meta: Mapping[str, Any]
    ) -> None:
        """Save arrays with N rows under ``scores/<name>``, replacing a previous one.

        Allowed on stores opened read-only (embeddings stay untouched) and on partial stores:
        the meta records ``store_state`` (n_tiles, n_done, n_failed, complete). The new set is
        written aside and swapped in, so a killed save keeps the set it was replacing.
        Names must be plain (``A-Z a-z 0-9 _ . -``, not starting with ``.`` or ``-``).
        """
        _store_scores.write_scores(self, name, scores, meta)

    def score_names(self) -> list[str]:
        """Names of complete saved score sets, sorted."""
        return _store_scores.score_names(self)

    def read_scores(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and meta of the score set `name`."""
        return _store_scores.read_scores(self, name)
