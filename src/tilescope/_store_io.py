"""On-disk mechanics of the store: opening and validating its group, the writer lock, what
``overwrite`` may replace, and reading the generation id. No embeddings logic here."""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr
from zarr.storage import LocalStore

from ._signature import FORMAT_NAME, FORMAT_VERSION, SIGNATURE_PARTS
from ._store_state import check_metadata
from .errors import OVERWRITE_WORDS, StoreBusyError, StoreCorruptError, StoreError

#: What to do about a store that cannot be read, worded for readers and for writers.
READ_HINT = "check the path, or embed the slide again into a new store"
WRITE_HINT = f"choose another path, or {OVERWRITE_WORDS}"


def open_group(
    p: Path, *, read_only: bool, hint: str = READ_HINT
) -> tuple[zarr.Group, dict[str, Any], dict[str, zarr.Array]]:
    """Open and validate a store's group, its signature and array metadata.

    Raises `StoreCorruptError` (ending with `hint`) without writing anything.
    """
    if not p.is_dir():
        raise StoreCorruptError(f"{p}: exists but is not a zarr store directory; {hint}")
    try:
        group = zarr.open_group(
            LocalStore(p, read_only=True), mode="r", zarr_format=3, use_consolidated=False
        )
        sig: object = group.attrs.get("tilescope")  # any JSON; checked below
        arrays = dict(group.arrays())
    except Exception as exc:  # zarr raises many kinds for damaged metadata
        raise StoreCorruptError(f"{p}: not a readable zarr v3 group ({exc}); {hint}") from exc
    if not isinstance(sig, Mapping) or sig.get("format") != FORMAT_NAME:
        raise StoreCorruptError(f"{p}: not a Tilescope embedding store (no signature); {hint}")
    if not isinstance(sig.get("format_version"), int):
        raise StoreCorruptError(f"{p}: damaged signature (no integer format_version); {hint}")
    if sig["format_version"] > FORMAT_VERSION:
        raise StoreError(
            f"{p}: store format {sig.get('format_version')!r} is newer than this "
            f"tilescope ({FORMAT_VERSION}); upgrade tilescope"
        )
    try:
        int(sig["n_tiles"]), int(sig["embed_dim"])
        missing = [k for k in (*SIGNATURE_PARTS, "complete") if k not in sig]
        missing += [k for k in ("model", "grid", "layout", "slide") if not isinstance(sig[k], dict)]
        missing += [k for k in ("model_id",) if k not in sig["model"]]
        missing += [k for k in ("tile_l0", "downsample") if k not in sig["layout"]]
        float(np.mean(sig["level0_mpp"]))
    except (KeyError, TypeError, ValueError) as exc:
        missing = [str(exc)]
    if missing:
        raise StoreCorruptError(f"{p}: damaged signature (missing or bad {missing}); {hint}")
    typed = {k: cast(zarr.Array, v) for k, v in arrays.items() if isinstance(v, zarr.Array)}
    try:
        check_metadata(p, typed, sig)
    except StoreCorruptError as exc:
        raise StoreCorruptError(f"{exc}; {hint}", array=exc.array) from None
    if read_only:
        return group, dict(sig), typed
    group = zarr.open_group(LocalStore(p), mode="r+", zarr_format=3, use_consolidated=False)
    return group, dict(sig), {k: cast(zarr.Array, group[k]) for k in typed}


def read_generation(p: Path) -> str | None:
    """The generation id in the signature at `p` right now (None if unreadable or absent)."""
    try:
        meta = json.loads((p / "zarr.json").read_text(encoding="utf-8"))
        gen = meta["attributes"]["tilescope"].get("generation")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return str(gen) if gen is not None else ""


def lock_path(p: Path) -> Path:
    """The writer lock file of a store: ``.NAME.zarr.lock`` beside it (kept between runs)."""
    return p.with_name(f".{p.name}.lock")


class WriterLock:
    """One writer per store, through `filelock` (an OS lock the system drops when the process
    dies, so a killed writer leaves no stale lock).

    `filelock` replaces the hand-written flock of earlier versions: it is maintained, works on
    Windows too, and falls back to a soft lock on file systems without ``flock``. Its lock file
    stays beside the store after release (removing it would race with the next writer).

    Raises `StoreBusyError` if another writer holds the lock, and `OSError` if the lock file
    cannot be created (a read-only folder): callers that have nothing to write go on without.
    """

    def __init__(self, p: Path) -> None:
        from filelock import FileLock, Timeout

        self.path = lock_path(p)
        p.parent.mkdir(parents=True, exist_ok=True)
        self._lock: Any = FileLock(self.path, timeout=0, thread_local=False)
        try:
            self._lock.acquire()
        except Timeout:
            raise StoreBusyError(
                f"{p}: another writer (a tilescope run here or in napari) is embedding into "
                "this store right now; wait for it to finish, or stop it and run again to resume"
            ) from None

    def release(self) -> None:
        if self._lock is not None and self._lock.is_locked:
            self._lock.release(force=True)
        self._lock = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def cannot_create_lock(exc: OSError) -> bool:
    """True for the errors of a folder where no lock file can be made (read-only, no access)."""
    return exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def check_replaceable(p: Path) -> None:
    """Refuse to replace anything at `p` that does not look like a store."""
    if p.is_dir() and not p.is_symlink():
        if p.suffix != ".zarr" and not (p / "zarr.json").exists() and any(p.iterdir()):
            raise StoreError(
                f"{p}: is a non-empty folder that is not a zarr store; refusing to delete it "
                "even with overwrite; choose a path ending in .zarr"
            )
