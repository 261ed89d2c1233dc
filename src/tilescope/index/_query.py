"""Searching a cohort index, and a folder of stores through its index."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexBusyError, IndexCorruptError, SearchError
from . import _ann
from ._layout import (
    Manifest,
    StoreEntry,
    check_array_meta,
    index_dir,
    index_name,
    model_identity,
    read_manifest,
)
from ._scan import MappedIndex, exact_top_k
from ._update import Found, Report, _remove_stray_ann, discover, update_model

Progress = Callable[[str], None]
PathLikeT = str | PathLike[str]


def _match(folder: Path, e: StoreEntry, row: int, x: int, y: int, sim: float) -> Any:
    from ..search import Match

    return Match(str(folder / e.path), e.slide_name, row, x, y, sim, e.tile_l0)


class CohortIndex:
    """An opened index: a memory-mapped snapshot of one manifest (later updates are not
    seen; open it again for them)."""

    def __init__(self, path: PathLikeT) -> None:
        self.path = Path(path)
        self.folder = self.path.parent.parent
        ann: Any = None
        for _attempt in range(3):  # an index updated or swapped in while we opened it
            man = read_manifest(self.path)
            check_array_meta(self.path, man)
            ix = MappedIndex(self.path, man)
            try:
                ann = _ann.read(self.path, man.ann["file"], mmap=True) if man.ann else None
            except RuntimeError:  # its file was replaced meanwhile: read the new manifest
                continue
            if read_manifest(self.path).generation == man.generation:
                break
        else:
            raise IndexBusyError(f"{self.path}: the index is being rewritten; try again")
        self.manifest: Manifest = man
        self._ix = ix
        self._ann = ann
        self.entries = {e.id: e for e in man.stores}
        self._live = man.live_mask()

    @property
    def n_live(self) -> int:
        return self.manifest.n_live

    def _rows_of(self, stores: Mapping[Path, Any]) -> dict[int, Any]:
        """Entry id -> value, for stores named by path (resolved: links and spellings agree)."""
        by_path = {(self.folder / e.path).resolve(): e.id for e in self.manifest.stores}
        return {by_path[p]: v for p, v in stores.items() if p in by_path}

    def allowed(
        self,
        *,
        only: Sequence[str] | None = None,
        exclude: Mapping[Any, Sequence[int] | np.ndarray] | None = None,
    ) -> np.ndarray:
        """(n_rows,) bool: live rows of the stores `only` (relative paths; default all), minus
        the store rows in `exclude` (store path -> rows in that store)."""
        ok = self._live.copy()
        if only is not None:
            names = set(only)
            for e in self.manifest.stores:
                if e.path not in names:
                    ok[e.start : e.stop] = False
        if exclude:
            resolved = {Path(p).resolve(): v for p, v in exclude.items()}
            for sid, rows in self._rows_of(resolved).items():
                e = self.entries[sid]
                mine = self._ix.row[e.start : e.stop]
                want = np.asarray(rows, dtype=np.int64).reshape(-1)
                pos = np.searchsorted(mine, want)
                hit = (pos < len(mine)) & (mine[np.minimum(pos, len(mine) - 1)] == want)
                ok[e.start + pos[hit]] = False
        return ok

    def search(
        self,
        query: np.ndarray,
        k: int = 20,
        *,
        per_slide: int | None = None,
        allowed: np.ndarray | None = None,
        mode: str = "auto",
        nprobe: int | None = None,
    ) -> list[Any]:
        """The `k` best matches (`tilescope.search.Match`), best first.

        `mode`: "exact" (the float16 top k, exactly), "approx" (the approximate index, reranked
        exactly; rows it does not cover yet are searched exactly) or "auto" (approximate when
        the index has one). `per_slide` caps the matches of any one store.
        """
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if len(q) != self.manifest.embed_dim:
            raise SearchError(f"query of width {len(q)} does not fit the index "
                              f"{self.path} (D={self.manifest.embed_dim})")  # fmt: skip
        ok = self._live if allowed is None else allowed
        ann = self.manifest.ann
        if mode == "approx" and ann is None:
            raise SearchError(f"{self.path}: has no approximate index; run `tilescope index "
                              "--ann on` on its folder")  # fmt: skip
        if mode == "exact" or ann is None:
            rows, sims = exact_top_k(self._ix, q, k, ok, per_slide)
        else:
            rows, sims = self._approx(q, k, ok, per_slide, nprobe or int(ann["nprobe"]))
        ix = self._ix
        return [_match(self.folder, self.entries[int(ix.store_id[r])], int(ix.row[r]),
                       int(ix.coords[r, 0]), int(ix.coords[r, 1]), float(s))
                for r, s in zip(rows, sims, strict=True)]  # fmt: skip

    def _approx(
        self, q: np.ndarray, k: int, ok: np.ndarray, per_slide: int | None, nprobe: int
    ) -> tuple[np.ndarray, np.ndarray]:
        from ._scan import select

        assert self.manifest.ann is not None
        rows, sims = _ann.search(self._ann, self._ix, q, k, ok, per_slide=per_slide,
                                 nprobe=nprobe)  # fmt: skip
        covered = int(self.manifest.ann["n_rows"])
        if covered < self.manifest.n_rows:  # rows added since: scanned exactly
            tail = covered + np.flatnonzero(ok[covered:])
            rows = np.r_[rows, tail]
            sims = np.r_[sims, self._ix.rescore(q, tail)]
            pos = select(rows, sims, self._ix.store_id, k, per_slide)
            rows, sims = rows[pos], sims[pos]
        return rows, sims


def search_index(
    index_path: PathLikeT,
    query: np.ndarray,
    k: int = 20,
    *,
    per_slide: int | None = None,
    exclude: Mapping[Any, Sequence[int] | np.ndarray] | None = None,
    mode: str = "auto",
) -> list[Any] | list[list[Any]]:
    """Matches of one query (D,) or of each of several (B, D), best first, from an index.

    `exclude` maps store paths to rows of that store never returned (the query's own tiles);
    `per_slide` caps the matches of any one store (slide). See `CohortIndex.search`.
    """
    ix = CohortIndex(index_path)
    ok = ix.allowed(exclude=exclude)
    q = np.asarray(query, dtype=np.float32)
    if q.ndim == 1:
        return ix.search(q, k, per_slide=per_slide, allowed=ok, mode=mode)
    return [ix.search(row, k, per_slide=per_slide, allowed=ok, mode=mode) for row in q]


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
) -> list[Report]:
    """Build or update the index of every model whose complete stores are in `folder` (one
    index per model); remove the index of a model that has no store left. One report each."""
    root = Path(folder)
    found, others = discover(root)
    _warn_others(others, root)
    complete = [f for f in found if f.complete]
    if not found:
        raise SearchError(f"{root}: no Tilescope embedding stores (*.zarr) in this folder or "
                          "its sub-folders; embed slides into it first")  # fmt: skip
    reports = []
    for _name, group in sorted(_by_model(complete).items()):
        model = model_identity(group[0].sig["model"])
        model_id = str(group[0].sig["model"].get("model_id", "?"))
        reports.append(update_model(root, model, model_id, group, rebuild=rebuild, ann=ann,
                                    chunk_rows=chunk_rows, min_ann_rows=min_ann_rows,
                                    progress=progress))  # fmt: skip
    partial = [f.rel for f in found if not f.complete]
    for r in reports:
        r.skipped += [(p, "not complete: embed it to the end to index it") for p in partial]
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
) -> FolderSearch:
    """The `k` best matches over every store in `folder` (sub-folders too), best first.

    Complete stores are searched through the folder's index, which is built or brought up to
    date first when `update` (`progress` hears about it); stores it does not cover (partial
    ones, or new ones when the index cannot be updated: a read-only folder, another run
    updating it) are searched directly. Stores made with another model than `model` refuse
    the search, as `tilescope.search.search_stores` does.
    """
    from ..search import _model_key, search_stores

    root = Path(folder)
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
    say = progress or (lambda _m: None)
    covered: dict[str, Found] = {}
    found_at: list[Any] = []
    for name, group in sorted(_by_model([f for f in found if f.complete]).items()):
        path = index_dir(root) / name
        idx, ok_rel = _current(path, group, update, out, say)
        if idx is None:
            continue
        out.index = path
        covered.update({rel: f for rel, f in ok_rel.items()})
        allowed = idx.allowed(only=list(ok_rel), exclude=exclude)
        found_at += idx.search(query, k, per_slide=per_slide, allowed=allowed, mode=mode)
        if mode != "exact" and idx.manifest.ann is not None:
            out.notes.append(f"{idx.n_live:,} patches of {root} searched through the approximate "
                             "index (reranked exactly); --exact searches them all")  # fmt: skip
        out.n_indexed += len(ok_rel)
    direct = [f.path for f in found if f.rel not in covered]
    if direct:
        out.n_direct = len(direct)
        found_at += search_stores(
            query, direct, model=model, k=k, exclude=exclude, per_slide=per_slide
        )
    ranked = sorted(found_at, key=lambda m: (-m.similarity, m.store, m.index))
    out.matches = ranked[:k]
    return out


def _current(
    path: Path, group: list[Found], update: bool, out: FolderSearch, say: Progress
) -> tuple[CohortIndex | None, dict[str, Found]]:
    """The index at `path` (updated first if stale and allowed), and the stores of `group`
    it covers as they are now."""
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
                               group, progress=say)  # fmt: skip
            say(
                f"index {rep.path}: {rep.n_stores} stores, {rep.n_live:,} patches "
                f"(+{len(rep.added)} stores, -{len(rep.dropped)}; {rep.seconds:.1f} s)"
            )
            idx = CohortIndex(path)
        except IndexBusyError:
            out.notes.append(f"another run is updating the index of {root}; stores it does "
                             "not cover yet are searched directly")  # fmt: skip
        except OSError as exc:
            out.notes.append(f"cannot write the index in {root} ({exc.strerror or exc}); "
                             "stores it does not cover are searched directly")  # fmt: skip
    if idx is None:
        return None, {}
    now = {f.rel: f for f in group}
    ok = {e.path: now[e.path] for e in idx.manifest.stores
          if e.path in now and now[e.path].generation == e.generation}  # fmt: skip
    return idx, ok


def _stale(man: Manifest, group: list[Found]) -> bool:
    have = {(e.path, e.generation) for e in man.stores}
    return have != {(f.rel, f.generation) for f in group}
