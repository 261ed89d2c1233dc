"""On-disk mechanics of the store: opening and validating its group, the writer lock,
deleting what ``overwrite`` replaces. No embeddings logic here."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from ._signature import FORMAT_NAME, FORMAT_VERSION, SIGNATURE_PARTS
from .errors import StoreCorruptError, StoreError


def open_group(p: Path, *, read_only: bool) -> zarr.Group:
    """Open and validate a store's group; raise StoreCorruptError without writing anything."""
    hint = "choose another path, or use --overwrite / overwrite=True to replace it"
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
        n, d = int(sig["n_tiles"]), int(sig["embed_dim"])
        missing = [k for k in (*SIGNATURE_PARTS, "complete") if k not in sig]
        missing += [k for k in ("model", "grid", "layout", "slide") if not isinstance(sig[k], dict)]
        missing += [k for k in ("model_id",) if k not in sig["model"]]
        missing += [k for k in ("tile_l0",) if k not in sig["layout"]]
        float(np.mean(sig["level0_mpp"]))
    except (KeyError, TypeError, ValueError) as exc:
        missing = [str(exc)]
    if missing:
        raise StoreCorruptError(f"{p}: damaged signature (missing or bad {missing}); {hint}")
    shapes = {
        "coords": (n, 2),
        "grid_rc": (n, 2),
        "tissue": (n,),
        "embeddings": (n, d),
        "done": (n,),
    }
    for name, shape in shapes.items():
        if name not in arrays:
            raise StoreCorruptError(f"{p}: the array {name!r} is missing; {hint}")
        if tuple(arrays[name].shape) != shape:
            raise StoreCorruptError(
                f"{p}: array {name!r} has shape {arrays[name].shape}, expected {shape}; {hint}"
            )
    if read_only:
        return group
    return zarr.open_group(LocalStore(p), mode="r+", zarr_format=3, use_consolidated=False)


class WriterLock:
    """An exclusive flock on ``.NAME.zarr.lock`` beside the store, removed when released.

    The OS drops a flock when its file closes or its process dies, so a killed writer leaves
    no stale lock. The file is checked to still be the one at the path after locking (another
    writer may have released and removed it meanwhile), the usual pattern for lock files
    that are deleted. Without fcntl (Windows) nothing is locked.
    """

    def __init__(self, p: Path) -> None:
        self.path = p.with_name(f".{p.name}.lock")
        self.fh: Any = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fh = open(self.path, "a+")  # noqa: SIM115 - held while writing
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                raise StoreError(
                    f"{p}: another writer (a tilescope run here or in napari) is embedding "
                    "into this store right now; wait for it to finish, or stop it and run "
                    "again to resume"
                ) from None
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fh = fh
                return
            fh.close()  # locked a file its owner had just removed: try again
        raise StoreError(f"{p}: could not lock {self.path}; try again")

    def release(self) -> None:
        if self.fh is not None:
            self.path.unlink(missing_ok=True)  # while still locked, then unlock
            self.fh.close()
            self.fh = None

    def __del__(self) -> None:
        self.release()


def remove_store(p: Path) -> None:
    """Delete what overwrite replaces, refusing anything that does not look like a store."""
    if p.is_dir() and not p.is_symlink():
        if p.suffix != ".zarr" and not (p / "zarr.json").exists() and any(p.iterdir()):
            raise StoreError(
                f"{p}: is a non-empty folder that is not a zarr store; refusing to delete it "
                "even with overwrite; choose a path ending in .zarr"
            )
        shutil.rmtree(p)
    else:
        p.unlink()
