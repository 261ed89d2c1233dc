"""Searching a cohort index (`CohortIndex`, `search_index`); a folder of stores through its
index is `tilescope.index._folder`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexBusyError, SearchError
from . import _ann
from ._layout import Manifest, StoreEntry, check_array_meta, read_manifest
from ._scan import MappedIndex, exact_top_k

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
            # indexes written before `n_probe` scaled with the lists recorded 16: the rule holds
            nprobe = nprobe or max(int(ann["nprobe"]), _ann.n_probe(int(ann["nlist"])))
            rows, sims = self._approx(q, k, ok, per_slide, nprobe)
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
