"""Saved score sets of a store (``scores/<name>``): written aside and swapped in, so a killed
save never loses the set it replaces."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import zarr
from zarr.storage import LocalStore

from . import _fsops
from ._signature import jsonable
from .errors import StoreError

if TYPE_CHECKING:
    from .store import EmbeddingStore

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
#: Attribute of a score set's group holding its meta (written last: a set without it is not
#: listed).
META_KEY = "tilescope_scores"
#: Temporaries of a save older than this (seconds) are leftovers of a killed run. Saves take
#: no lock (scores may be saved while a writer embeds), so a younger one may still be running.
LEFTOVER_AGE = 600.0


def check_score_name(store_path: Path, name: str) -> None:
    """Refuse names that are empty, hidden, or not plain (``A-Z a-z 0-9 _ . -``)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise StoreError(
            f"{store_path}: score name {name!r} must be non-empty, start with a letter, digit "
            "or _, and use only A-Z a-z 0-9 _ . -"
        )


def write_scores(
    store: EmbeddingStore, name: str, scores: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> None:
    """See `EmbeddingStore.write_scores`."""
    check_score_name(store.path, name)
    for key, arr in scores.items():
        if not _NAME.match(key) or np.shape(arr)[:1] != (store.n_tiles,):
            raise StoreError(f"{store.path}: score array {key!r} must have N={store.n_tiles} rows")
    store._check_generation()
    root = store._root
    full = {
        **jsonable(dict(meta)),
        "store_state": {
            "n_tiles": store.n_tiles,
            "n_done": store.n_done,
            "n_failed": store.n_failed,
            "complete": store.complete,
            "generation": store.generation,
        },
    }
    with store._writing("save scores"):
        group = zarr.open_group(LocalStore(root), mode="r+", use_consolidated=False)
        group.require_group("scores")
        target = root / "scores" / name
        _fsops.clean_leftovers(target, min_age=LEFTOVER_AGE)  # of killed saves, not running ones
        tmp = _fsops.temp_path(target)
        try:
            sub = zarr.open_group(LocalStore(tmp), mode="w-", zarr_format=3)
            for key, arr in scores.items():
                arr = np.asarray(arr)
                rows = max(1, min(store.chunk_rows, len(arr)))
                sub.create_array(key, data=arr, chunks=(rows,) + arr.shape[1:])
            sub.attrs[META_KEY] = full
            _fsops.publish(tmp, target)  # the old set stays until the new one is whole
        finally:
            _fsops.remove(tmp)


def score_names(store: EmbeddingStore) -> list[str]:
    """See `EmbeddingStore.score_names`."""
    folder = store._root / "scores"
    if not (folder / "zarr.json").exists():
        return []
    names = []
    for child in sorted(folder.iterdir()):
        if not child.is_dir() or not _NAME.match(child.name):
            continue
        try:
            group = zarr.open_group(LocalStore(child, read_only=True), mode="r", zarr_format=3)
            if META_KEY in group.attrs:
                names.append(child.name)
        except Exception:  # noqa: BLE001 - a damaged set is not listed; `tilescope check` says so
            continue
    return names


def read_scores(store: EmbeddingStore, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """See `EmbeddingStore.read_scores`."""
    from .errors import StoreCorruptError

    names = score_names(store)
    if name not in names:
        have = ", ".join(names) or "none"
        raise StoreError(f"{store.path}: no saved scores named {name!r} (saved: {have})")
    path = store._root / "scores" / name
    try:
        group = zarr.open_group(LocalStore(path, read_only=True), mode="r", zarr_format=3)
        arrays = {k: np.asarray(cast(zarr.Array, a)[:]) for k, a in group.arrays()}
        meta = dict(cast(Mapping[str, Any], group.attrs[META_KEY]))
    except Exception as exc:  # noqa: BLE001 - damaged chunks or metadata
        raise StoreCorruptError(
            f"{store.path}: the saved scores {name!r} are damaged ({exc}); score again and save "
            "under this name to replace them",
            array=f"scores/{name}",
        ) from exc
    store._check_generation()
    return arrays, meta
