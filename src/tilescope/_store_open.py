"""Opening a store for writing: resume it from its own tiles, repair it, replace it aside,
or create it. See `EmbeddingStore.resume_or_create` and the `tilescope.store` docstring."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from . import _fsops
from ._signature import (
    new_store_signature,
    requested_signature,
    same_slide_file,
    signature_differences,
    signature_notices,
)
from ._store_io import WRITE_HINT, WriterLock, cannot_create_lock, check_replaceable, open_group
from ._store_state import DONE, FAILED, MISSING, TODO, Problem, read_state, scan_embeddings
from .errors import OVERWRITE_WORDS, StoreCorruptError, StoreError, StoreMismatchError

if TYPE_CHECKING:
    from .store import EmbeddingStore

_LAYOUT_ARRAYS = ("coords", "grid_rc", "tissue")
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr LocalStore's temporary files


@dataclass
class Layout:
    """The tiles of a store: (N, 2) int64 coords, (N, 2) int32 grid_rc, (N,) float32 tissue."""

    coords: Any
    grid_rc: Any
    tissue: Any

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)
        self.grid_rc = np.asarray(self.grid_rc, dtype=np.int32).reshape(-1, 2)
        self.tissue = np.asarray(self.tissue, dtype=np.float32).reshape(-1)

    @classmethod
    def of(cls, obj: Any) -> Layout:
        return cls(obj.coords, obj.grid_rc, obj.tissue)


def replacement_path(p: Path) -> Path:
    """Where an ``overwrite`` builds the store that will replace `p`."""
    return p.with_name(f".{p.name}.replacing")


def _absent(p: Path) -> bool:
    if p.is_dir() and not p.is_symlink():
        return not any(p.iterdir())  # an empty folder holds nothing to lose
    return not (p.exists() or p.is_symlink())


def resume_or_create(
    cls: type[EmbeddingStore],
    p: Path,
    signature: Mapping[str, Any],
    embed_dim: int,
    make_layout: Callable[[], Any],
    *,
    overwrite: bool,
    chunk_rows: int,
    retry_failed: bool,
    compare_layout: bool,
) -> EmbeddingStore:
    if embed_dim < 1 or chunk_rows < 1:
        raise StoreError(f"{p}: embed_dim and chunk_rows must be positive")
    req = requested_signature(p, signature, embed_dim=embed_dim, chunk_rows=chunk_rows)
    try:
        lock = WriterLock(p)  # one writer per store; released by close() or when dropped
    except OSError as exc:
        if not cannot_create_lock(exc):
            raise StoreError(f"{p}: cannot create the writer lock ({exc.strerror})") from exc
        return _finished_without_lock(cls, p, req, exc, retry_failed, compare_layout, make_layout)
    try:
        store = _resume_locked(cls, p, req, make_layout, overwrite, compare_layout)
    except BaseException:
        lock.release()
        raise
    store._lock = lock
    return store


def _compare(store: EmbeddingStore, req: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    diffs = signature_differences(store._sig, req)
    if store.complete:  # nothing left to write: another tilescope version may reuse it
        diffs = [d for d in diffs if not d.startswith("tilescope_version")]
    return diffs, signature_notices(store._sig, req)


def _layout_diffs(store: EmbeddingStore, make_layout: Callable[[], Any]) -> list[str]:
    """The requested tiles differ from the store's (rows whose layout is damaged aside)."""
    lay = Layout.of(make_layout())
    ok = np.ones(store.n_tiles, bool)
    for pr in store.problems:
        if pr.array in _LAYOUT_ARRAYS:
            ok[pr.rows] = False
    if len(lay.coords) != store.n_tiles or not (
        np.array_equal(store.coords[ok], lay.coords[ok])
        and np.array_equal(store.grid_rc[ok], lay.grid_rc[ok])
    ):
        return ["tile coordinates differ from the requested layout"]
    return []


def _mismatch(p: Path, diffs: list[str]) -> StoreMismatchError:
    aside = replacement_path(p)
    pending = (
        f"\nan unfinished replacement is kept beside it ({aside.name}); overwriting resumes it"
        if aside.exists()
        else ""
    )
    return StoreMismatchError(
        f"{p}: this store was made with other parameters:\n  " + "\n  ".join(diffs)
        + f"\nchoose another output path, or {OVERWRITE_WORDS} (the new store is built beside "
        "it and replaces it when finished)" + pending,
        differences=diffs,
    )  # fmt: skip


def _resume_locked(
    cls: type[EmbeddingStore],
    p: Path,
    req: dict[str, Any],
    make_layout: Callable[[], Any],
    overwrite: bool,
    compare_layout: bool,
) -> EmbeddingStore:
    _fsops.clean_leftovers(p)  # temporaries of killed runs; we hold the lock
    aside = replacement_path(p)
    if _absent(p):
        if aside.exists():  # the old store was deleted during a replacement: keep its work
            rep = _resume_replacement(cls, p, aside, req, make_layout, compare_layout)
            rep.publish()
            return rep
        return _create(cls, p, p, req, make_layout)
    try:
        current: EmbeddingStore | None = _open_writer(cls, p, p)
    except StoreCorruptError:
        if not overwrite:
            raise
        check_replaceable(p)
        current = None
    if current is not None:
        diffs, notices = _compare(current, req)
        if compare_layout and not diffs:
            diffs = _layout_diffs(current, make_layout)
        if not diffs:
            current.notices = notices
            repair(current, make_layout)
            return current
        if not same_slide_file(current._sig, req):
            old = current._sig.get("slide") or {}
            raise StoreMismatchError(
                f"{p}: holds the store of another slide ({old.get('name', '?')}, "
                f"{old.get('size_bytes', '?')} bytes); refusing to replace it, even with "
                "overwrite; choose another output path",
                differences=diffs,
                can_overwrite=False,
            )
        if not overwrite:
            raise _mismatch(p, diffs)
    return _resume_replacement(cls, p, aside, req, make_layout, compare_layout)


def _resume_replacement(
    cls: type[EmbeddingStore],
    p: Path,
    aside: Path,
    req: dict[str, Any],
    make_layout: Callable[[], Any],
    compare_layout: bool,
) -> EmbeddingStore:
    _fsops.clean_leftovers(aside)
    if aside.exists():
        try:
            rep = _open_writer(cls, p, aside)
            diffs, notices = _compare(rep, req)
            if compare_layout and not diffs:
                diffs = _layout_diffs(rep, make_layout)
            if not diffs:
                rep.notices = notices
                repair(rep, make_layout)
                return rep
        except StoreCorruptError:
            pass
        _fsops.remove(aside)  # an unfinished replacement made with other settings
    return _create(cls, p, aside, req, make_layout)


def _open_writer(cls: type[EmbeddingStore], final: Path, root: Path) -> EmbeddingStore:
    group, sig, arrays = open_group(root, read_only=False, hint=WRITE_HINT)
    state = read_state(root, arrays, sig)
    store = cls(final, group, sig, arrays, state, read_only=False, root=root)
    for f in root.rglob("*.partial"):  # zarr's temporaries of a killed writer
        if f.is_file() and _PARTIAL.search(f.name):
            f.unlink()
    return store


def _create(
    cls: type[EmbeddingStore],
    final: Path,
    root: Path,
    req: dict[str, Any],
    make_layout: Callable[[], Any],
) -> EmbeddingStore:
    lay = Layout.of(make_layout())
    n, d = len(lay.coords), int(req["embed_dim"])
    if len(lay.grid_rc) != n or len(lay.tissue) != n:
        raise StoreError(f"{final}: coords, grid_rc and tissue must have the same length")
    sig = new_store_signature(req, n=n)
    rows = int(sig["chunk_rows"])
    tmp = _fsops.temp_path(root)  # built aside and renamed: a path never holds half a store
    try:
        group = zarr.open_group(LocalStore(tmp), mode="w-", zarr_format=3)
        group.create_array("coords", data=lay.coords, chunks=(rows, 2), fill_value=-1)
        group.create_array("grid_rc", data=lay.grid_rc, chunks=(rows, 2), fill_value=-1)
        group.create_array("tissue", data=lay.tissue, chunks=(rows,), fill_value=np.nan)
        group.create_array(
            "embeddings", shape=(n, d), dtype="float32", chunks=(rows, d),
            compressors=None, fill_value=0.0,
        )  # fmt: skip
        group.create_array("done", data=np.zeros(n, np.uint8), chunks=(rows,), fill_value=MISSING)
        group.attrs["tilescope"] = sig
        _fsops.publish(tmp, root)  # also onto an empty folder
    except OSError as exc:
        raise StoreError(
            f"{final}: could not create the store ({exc.strerror or exc}); check the free disk "
            "space and the folder's permissions"
        ) from exc
    finally:
        _fsops.remove(tmp)
    return _open_writer(cls, final, root)


def _finished_without_lock(
    cls: type[EmbeddingStore],
    p: Path,
    req: dict[str, Any],
    exc: OSError,
    retry_failed: bool,
    compare_layout: bool,
    make_layout: Callable[[], Any],
) -> EmbeddingStore:
    """No lock file can be made here (read-only): fine for a finished store, nothing else."""
    why = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror or exc)
    if _absent(p):
        raise StoreError(f"{p}: cannot create a store here ({why})") from exc
    store = cls.open(p)
    diffs, notices = _compare(store, req)
    if compare_layout and not diffs:
        diffs = _layout_diffs(store, make_layout)
    if diffs:
        raise _mismatch(p, diffs)
    problems = scan_embeddings(store._arr["embeddings"], store._done)
    if not store.complete or (retry_failed and store.n_failed) or problems:
        need = problems[0].describe() if problems else store.state_text()
        raise StoreError(f"{p}: the store needs writing ({need}) but {why}") from exc
    store.notices = notices
    return store


def repair(store: EmbeddingStore, make_layout: Callable[[], Any]) -> None:
    """Full check of a store opened for writing; mark damaged rows not done (they are embedded
    again), rebuild damaged layout arrays from `make_layout`; raise if that cannot be done."""
    problems = list(store.problems) + scan_embeddings(store._arr["embeddings"], store._done)
    store.problems = []
    if not problems:
        return
    fatal = [pr for pr in problems if not pr.repairable]
    if fatal:
        from .store import corrupt_error

        raise corrupt_error(store.path, fatal)
    if any(pr.array in _LAYOUT_ARRAYS for pr in problems):
        _rebuild_layout(store, make_layout, problems)
    rows = [pr.rows for pr in problems if pr.array in ("embeddings", "done")]
    bad = np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int64)
    store._done[bad] = False
    store._failed[bad] = False
    flags = np.where(store._done, DONE, np.where(store._failed, FAILED, TODO)).astype(np.uint8)
    r = store.chunk_rows
    chunks = sorted({int(i) // r for i in bad} | _unreadable_done_chunks(problems, r))
    with store._writing("repair the store"):
        for c in chunks:
            store._arr["done"][c * r : (c + 1) * r] = flags[c * r : (c + 1) * r]
    if store.complete and store.n_todo:
        store._set_signature(complete=False)
    store.repaired = [pr.describe() for pr in problems]


def _unreadable_done_chunks(problems: list[Problem], rows: int) -> set[int]:
    return {int(i) // rows for pr in problems if pr.array == "done" for i in pr.rows}


def _rebuild_layout(
    store: EmbeddingStore, make_layout: Callable[[], Any], problems: list[Problem]
) -> None:
    damaged = np.zeros(store.n_tiles, bool)
    for pr in problems:
        if pr.array in _LAYOUT_ARRAYS:
            damaged[pr.rows] = True
            if not len(pr.rows):  # chunks that cannot be read: rows unknown, check them all
                damaged[:] = True
    fresh = Layout.of(make_layout())
    same = len(fresh.coords) == store.n_tiles
    if same:
        ok = ~damaged
        same = np.array_equal(fresh.coords[ok], store.coords[ok]) and np.array_equal(
            fresh.grid_rc[ok], store.grid_rc[ok]
        )
    if not same:
        raise StoreCorruptError(
            f"{store.path}: the store's tile layout is damaged "
            f"({'; '.join(pr.describe() for pr in problems if pr.array in _LAYOUT_ARRAYS)}) and "
            "the tiles found on the slide now differ from it, so it cannot be rebuilt; embed "
            f"the slide again into a new store, or {OVERWRITE_WORDS}",
            array=next(pr.array for pr in problems if pr.array in _LAYOUT_ARRAYS),
        )
    with store._writing("repair the tile layout"):
        for name in _LAYOUT_ARRAYS:
            store._arr[name][:] = getattr(fresh, name)
    store.coords, store.grid_rc, store.tissue = fresh.coords, fresh.grid_rc, fresh.tissue
