"""A folder of stores and its cohort index: building or updating the index (`update_index`),
and searching the folder through it (`search_folder`), stores it does not cover directly."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexBusyError, IndexCorruptError, SearchCancelled, SearchError
from . import _ann
from ._append import Hooks
from ._layout import (
    INDEX_DIRNAME,
    Manifest,
    index_dir,
    index_name,
    is_index,
    model_identity,
)
from ._query import CohortIndex
from ._update import Found, Report, _remove_stray_ann, discover, update_model

Progress = Callable[[str], None]
RowsProgress = Callable[[int, int], None]
PathLikeT = str | PathLike[str]


def index_path_for(folder: PathLikeT, model: Mapping[str, Any]) -> Path:
    """Where the index of `model`'s stores in `folder` is (or would be)."""
    return index_dir(Path(folder)) / index_name(model)


def _warn_others(others: list[Path], folder: Path) -> None:
    if others:
        names = ", ".join(o.name for o in others)
        warnings.warn(f"{folder}: skipped zarr folders that are not embedding stores "
                      f"(exports?): {names}", stacklevel=3)  # fmt: skip


def _by_model(found: list[Found]) -> dict[str, list[Found]]:
    groups: dict[str, list[Found]] = {}
    for f in found:
        groups.setdefault(index_name(f.sig.get("model") or {}), []).append(f)
    return groups


def update_index(
    folder: PathLikeT,
    *,
    rebuild: bool = False,
    ann: str = "auto",
    min_ann_rows: int = _ann.ANN_MIN_ROWS,
    chunk_rows: int | None = None,
    progress: Progress | None = None,
    on_rows: RowsProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[Report]:
    """Build or update the index of every model whose complete stores are in `folder` (one
    index per model); remove the index of a model that has no store left. One report each.

    `progress`, `on_rows` and `should_stop` are `update_model`'s: after a stop request the
    report of the index being written says ``cancelled`` (its stores written whole so far are
    committed) and the indexes of other models are left as they are."""
    root = _folder_of_stores(Path(folder))
    found, others = discover(root)
    _warn_others(others, root)
    complete = [f for f in found if f.complete]
    if not found:
        raise SearchError(f"{root}: no Tilescope embedding stores (*.zarr) in this folder or "
                          "its sub-folders; embed slides into it first")  # fmt: skip
    reports: list[Report] = []
    for _name, group in sorted(_by_model(complete).items()):
        if reports and reports[-1].cancelled:
            break
        model = model_identity(group[0].sig["model"])
        model_id = str(group[0].sig["model"].get("model_id", "?"))
        reports.append(update_model(root, model, model_id, group, rebuild=rebuild, ann=ann,
                                    chunk_rows=chunk_rows, min_ann_rows=min_ann_rows,
                                    progress=progress, on_rows=on_rows,
                                    should_stop=should_stop))  # fmt: skip
    partial = [f.rel for f in found if not f.complete]
    for r in reports:
        r.skipped += [(p, "not complete: embed it to the end to index it") for p in partial]
    if not (reports and reports[-1].cancelled):
        _drop_orphans(root, {r.path.name for r in reports})
    return reports


def _drop_orphans(root: Path, keep: set[str]) -> None:
    """Remove indexes of models that have no complete store left in the folder."""
    from .. import _fsops
    from ._layout import IndexLock

    here = index_dir(root)
    if not here.is_dir():
        return
    for p in here.glob("index-*.zarr"):
        if p.name not in keep:
            with IndexLock(p):
                _fsops.remove(p)
                _remove_stray_ann(p, None)


@dataclass
class FolderSearch:
    """Matches from a folder, and what the user should be told about how they were found."""

    matches: list[Any]
    notes: list[str] = field(default_factory=list)
    n_indexed: int = 0  # stores searched through the index
    n_direct: int = 0  # stores searched directly (partial, or not in the index)
    index: Path | None = None
    approximate: bool = False  # the approximate index answered (a near match may be missed)


def search_folder(
    query: np.ndarray,
    folder: PathLikeT,
    *,
    model: Mapping[str, Any],
    k: int = 20,
    per_slide: int | None = None,
    exclude: Mapping[Any, Sequence[int] | np.ndarray] | None = None,
    update: bool = True,
    mode: str = "auto",
    progress: Progress | None = None,
    on_rows: RowsProgress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FolderSearch:
    """The `k` best matches over every store in `folder` (sub-folders too), best first.

    Complete stores are searched through the folder's index, which is built or brought up to
    date first when `update` (`progress` hears about it, `on_rows` gets the rows written so
    far and the rows to write); stores it does not cover (partial ones, or new ones when the
    index cannot be updated: a read-only folder, another run updating it) are searched
    directly, and a note says so. Stores made with another model than `model` refuse the
    search, as `tilescope.search.search_stores` does.

    `should_stop` is polled while the index is written: when it returns True the update
    commits the stores written whole so far (see `update_model`) and `SearchCancelled` is
    raised, saying how far the index got; the next search goes on from there.
    """
    from ..search import _model_key, search_stores

    root = _folder_of_stores(Path(folder))
    want = _model_key(model)
    if "weights_digest" not in want:
        raise SearchError("model provenance without weights_digest; pass Encoder.provenance()")
    found, others = discover(root)
    _warn_others(others, root)
    if not found:
        raise SearchError(f"{root}: no Tilescope embedding stores (*.zarr) in this folder")
    bad = [f for f in found if {k2: (f.sig.get("model") or {}).get(k2) for k2 in want} != want]
    if bad:
        raise SearchError(
            f"these stores were made with a different model than the query ({want}):\n"
            + "\n".join(f"  {f.path}: model {model_identity(f.sig.get('model') or {})}"
                        for f in bad)
            + "\nre-embed those slides with the query's model, or move them out of "
            f"{root}"
        )  # fmt: skip
    out = FolderSearch([])
    hooks = Hooks.of(progress, on_rows, should_stop)
    covered: dict[str, Found] = {}
    found_at: list[Any] = []
    for name, group in sorted(_by_model([f for f in found if f.complete]).items()):
        path = index_dir(root) / name
        idx, ok_rel = _current(path, group, update, out, hooks)
        if idx is None:
            continue
        out.index = path
        covered.update({rel: f for rel, f in ok_rel.items()})
        allowed = idx.allowed(only=list(ok_rel), exclude=exclude)
        found_at += idx.search(query, k, per_slide=per_slide, allowed=allowed, mode=mode)
        if mode != "exact" and idx.manifest.ann is not None:
            out.approximate = True
            out.notes.append(f"{idx.n_live:,} patches of {root} searched through the approximate "
                             "index (reranked exactly): a near match can be missed")  # fmt: skip
        out.n_indexed += len(ok_rel)
    direct = [f for f in found if f.rel not in covered]
    if direct:
        out.n_direct = len(direct)
        out.notes.append(_direct_note(root, direct))
        found_at += search_stores(
            query, [f.path for f in direct], model=model, k=k, exclude=exclude,
            per_slide=per_slide,
        )  # fmt: skip
    ranked = sorted(found_at, key=lambda m: (-m.similarity, m.store, m.index))
    out.matches = ranked[:k]
    return out


def _direct_note(root: Path, direct: list[Found]) -> str:
    """What to tell the user about the stores of `root` read directly, not through its index."""
    partial = [f.rel for f in direct if not f.complete]
    other = [f.rel for f in direct if f.complete]

    def names(rels: list[str]) -> str:
        return ", ".join(rels[:3]) + (f" and {len(rels) - 3} more" if len(rels) > 3 else "")

    parts = []
    if partial:
        parts.append(f"{len(partial)} partial (the index holds complete stores only; they are "
                     f"indexed once embedded to the end): {names(partial)}")  # fmt: skip
    if other:
        parts.append(f"{len(other)} not in the index yet: {names(other)}")
    return f"{len(direct)} stores of {root} read directly, not through its index; " + "; ".join(
        parts
    )


def _current(
    path: Path, group: list[Found], update: bool, out: FolderSearch, hooks: Hooks
) -> tuple[CohortIndex | None, dict[str, Found]]:
    """The index at `path` (updated first if stale and allowed), and the stores of `group`
    it covers as they are now. A stop request during the update raises `SearchCancelled`."""
    say = hooks.say
    try:
        idx: CohortIndex | None = CohortIndex(path) if path.exists() else None
    except IndexCorruptError as exc:
        out.notes.append(str(exc))
        idx = None
    stale = idx is None or _stale(idx.manifest, group)
    if stale and update:
        root = path.parent.parent
        model = model_identity(group[0].sig["model"])
        say(f"updating the cohort index of {root} ({len(group)} complete stores)...")
        try:
            rep = update_model(root, model, str(group[0].sig["model"].get("model_id", "?")),
                               group, progress=say, on_rows=hooks.rows,
                               should_stop=hooks.stop)  # fmt: skip
        except IndexBusyError:
            out.notes.append(f"another run is updating the index of {root}; stores it does "
                             "not cover yet are searched directly")  # fmt: skip
        except OSError as exc:
            out.notes.append(f"cannot write the index in {root} ({exc.strerror or exc}); "
                             "stores it does not cover are searched directly")  # fmt: skip
        else:
            if rep.cancelled:
                raise SearchCancelled(
                    f"search cancelled while the index of {root} was being written: it holds "
                    f"{rep.n_stores} of the {len(group)} complete stores ({len(rep.added)} "
                    "added now); the next search goes on from there"
                )
            say(
                f"index {rep.path}: {rep.n_stores} stores, {rep.n_live:,} patches "
                f"(+{len(rep.added)} stores, -{len(rep.dropped)}; {rep.seconds:.1f} s)"
            )
            idx = CohortIndex(path)
    if idx is None:
        return None, {}
    now = {f.rel: f for f in group}
    ok = {e.path: now[e.path] for e in idx.manifest.stores
          if e.path in now and now[e.path].generation == e.generation}  # fmt: skip
    return idx, ok


def _stale(man: Manifest, group: list[Found]) -> bool:
    have = {(e.path, e.generation) for e in man.stores}
    return have != {(f.rel, f.generation) for f in group}


def _folder_of_stores(p: Path) -> Path:
    """`p`, refused with a message naming the folder to search when it is a cohort index (the
    ``tilescope-index`` folder or an index in it) rather than the folder of stores."""
    if is_index(p):
        cohort = p.parent if p.name == INDEX_DIRNAME else p.parent.parent
        raise SearchError(f"{p} is the cohort index of {cohort}, not a folder of stores: "
                          f"choose {cohort} (its index is used)")  # fmt: skip
    return p
