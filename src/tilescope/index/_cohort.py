"""Searching stores and folders of stores together: folders through their cohort index,
single stores directly (`tilescope.search.search_stores`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ..search import Match, _store_paths, search_stores
from ._folder import _folder_of_stores, search_folder


@dataclass
class CohortResult:
    """Matches over stores and folders, and what to tell the user about how they were found."""

    matches: list[Match]
    notes: list[str]
    indexes: list[str]  # the folder indexes used
    n_indexed: int  # stores searched through an index
    n_direct: int  # stores read directly
    approximate: bool = False  # an approximate index answered (a near match may be missed)


def search_cohort(
    query: np.ndarray,
    targets: str | PathLike[str] | Sequence[str | PathLike[str]],
    *,
    model: Mapping[str, Any],
    k: int = 20,
    per_slide: int | None = None,
    exclude: Mapping[Any, Sequence[int] | np.ndarray] | None = None,
    use_index: bool = True,
    exact: bool = False,
    progress: Callable[[str], None] | None = None,
    on_rows: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CohortResult:
    """The `k` best matches over stores and folders of stores, best first: what
    ``tilescope search --against`` and the Region search widget's *Search other slides* use.

    A folder is searched through its cohort index (`tilescope.index.search_folder`: built or
    brought up to date first, `progress` hears about it and `on_rows` gets (rows written,
    rows to write); partial stores read directly); a store path is read directly
    (`search_stores`). ``use_index=False`` reads every store, as before the index existed;
    ``exact`` never uses the approximate index. `should_stop` is polled while an index is
    written: True commits the stores written so far and raises `SearchCancelled`.
    A cohort index folder (``FOLDER/tilescope-index``) is refused, naming FOLDER.
    """
    entries = [targets] if isinstance(targets, (str, PathLike)) else list(targets)
    for entry in entries:
        _folder_of_stores(Path(entry))
    folders = [Path(p) for p in entries if _is_folder_of_stores(Path(p))]
    stores = [p for p in entries if not _is_folder_of_stores(Path(p))]
    if not use_index:
        stores, folders = entries, []
    found: list[Match] = []
    notes: list[str] = []
    indexes: list[str] = []
    n_indexed = n_direct = 0
    approximate = False
    for folder in folders:
        res = search_folder(query, folder, model=model, k=k, per_slide=per_slide,
                            exclude=exclude, mode="exact" if exact else "auto",
                            progress=progress, on_rows=on_rows,
                            should_stop=should_stop)  # fmt: skip
        found += res.matches
        notes += res.notes
        approximate = approximate or res.approximate
        indexes += [str(res.index)] if res.index else []
        n_indexed, n_direct = n_indexed + res.n_indexed, n_direct + res.n_direct
    if stores:
        found += search_stores(query, stores, model=model, k=k, exclude=exclude,
                               per_slide=per_slide)  # fmt: skip
        n_direct += len(_store_paths(stores))
    unique = {(str(Path(m.store).resolve()), m.index): m for m in found}  # a store in two targets
    ranked = sorted(unique.values(), key=lambda m: (-m.similarity, m.store, m.index))
    if per_slide is not None:
        seen: dict[str, int] = {}
        capped = []
        for m in ranked:
            key = str(Path(m.store).resolve())
            if seen.get(key, 0) < per_slide:
                seen[key] = seen.get(key, 0) + 1
                capped.append(m)
        ranked = capped
    return CohortResult(ranked[:k], notes, indexes, n_indexed, n_direct, approximate)


def _is_folder_of_stores(p: Path) -> bool:
    return p.is_dir() and p.suffix != ".zarr" and not (p / "zarr.json").exists()
