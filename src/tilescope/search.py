"""Region search: tiles under drawn shapes, a query vector, exact cosine similarity, top matches.

All coordinates are level-0 pixels (x, y). Converting napari shapes (world micrometres, row/col
order) to level-0 pixels is the caller's job: ``xy = shape[:, ::-1] / level0_mpp``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike

from .errors import SearchError
from .regions import tiles_centred_in
from .store import FORMAT_NAME, MODEL_IDENTITY_KEYS, EmbeddingStore

__all__ = [
    "Match",
    "build_query",
    "query_from_regions",
    "search_stores",
    "similarity",
    "similarity_map",
    "tiles_in_shapes",
    "top_k",
]

#: A store path type; a TypeVar so that e.g. a dict keyed by Path fits (Mapping keys are invariant).
_PathT = TypeVar("_PathT", bound="str | PathLike[str]")


#: Default weight of "not like this" regions in `build_query` (see there for why 0.25).
NEG_WEIGHT = 0.25


def tiles_in_shapes(
    coords: ArrayLike,
    tile_l0: float,
    shapes_l0: Iterable[ArrayLike],
    *,
    eligible: np.ndarray | None = None,
) -> np.ndarray:
    """Indices (ascending) of tiles whose centre lies inside any of the shapes.

    Parameters
    ----------
    coords
        (N, 2) level-0 (x, y) of tile top-left corners.
    tile_l0
        Tile side in level-0 pixels; the centre is ``coords + tile_l0 / 2``.
    shapes_l0
        Polygons as (K, 2) level-0 (x, y) vertices, K >= 3, in order (either winding; the
        closing vertex may be repeated); a (2, 2) array is the axis-aligned rectangle with those
        two opposite corners; or shapely polygons (QuPath annotations), whose holes are cut
        out (`tilescope.regions.tiles_centred_in`: a centre on their outline does not count).
    eligible
        (N,) bool: only these tiles may be returned (e.g. the embedded ones).

    Notes
    -----
    Inside follows the even-odd (crossing number) rule with half-open edges: a rectangle
    ``[x0, x1] x [y0, y1]`` contains centres with ``x0 <= x < x1`` and ``y0 <= y < y1``, so
    shapes that share an edge never both claim a tile. A shape that holds no eligible centre
    (one smaller than a tile, say) selects the eligible tiles it overlaps most (by area; all
    of them on a tie), so a click-sized region still means the tile under it.
    """
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    centres = xy + float(tile_l0) / 2
    ok = np.ones(len(xy), bool) if eligible is None else np.asarray(eligible, bool).reshape(-1)
    hit = np.zeros(len(centres), dtype=bool)
    for shape in shapes_l0:
        if hasattr(shape, "geom_type"):  # a shapely region: its holes are cut out
            hit[tiles_centred_in(xy, float(tile_l0), shape, ok)] = True
            continue
        poly = _polygon(shape)
        lo, hi = poly.min(0), poly.max(0)
        cand = np.flatnonzero(np.all((centres >= lo) & (centres <= hi), axis=1) & ok)
        inside = cand[_points_in_polygon(centres[cand], poly)]
        if not len(inside):
            inside = _most_overlapped(xy, float(tile_l0), poly, ok)
        hit[inside] = True
    return np.flatnonzero(hit)


def _polygon(shape: ArrayLike) -> np.ndarray:
    poly = np.asarray(shape, dtype=np.float64)
    if poly.shape == (2, 2):
        (x0, y0), (x1, y1) = poly.min(0), poly.max(0)
        poly = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    if poly.ndim != 2 or poly.shape[1] != 2 or len(poly) < 3:
        raise SearchError(f"a shape must be (K>=3, 2) x, y vertices, got {poly.shape}")
    if not np.all(np.isfinite(poly)):
        raise SearchError("a shape's vertices must be finite numbers")
    return poly


def _most_overlapped(xy: np.ndarray, t: float, poly: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Eligible tiles with the largest overlap area with `poly` (none if it overlaps none)."""
    lo, hi = poly.min(0), poly.max(0)
    cand = np.flatnonzero(np.all((xy < hi) & (xy + t > lo), axis=1) & ok)
    if not len(cand):
        return cand
    areas = np.array([_clipped_area(poly, x, y, x + t, y + t) for x, y in xy[cand]])
    best = areas.max()
    if not best > 0:
        return cand[:0]
    return cand[areas >= best * (1 - 1e-9)]


def _clipped_area(poly: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> float:
    """Area of `poly` inside the box (Sutherland-Hodgman against a convex clip window)."""
    pts = [tuple(p) for p in poly]
    for axis, bound, keep_low in ((0, x0, False), (0, x1, True), (1, y0, False), (1, y1, True)):
        out: list[tuple[float, float]] = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            cur_in = cur[axis] <= bound if keep_low else cur[axis] >= bound
            prev_in = prev[axis] <= bound if keep_low else prev[axis] >= bound
            if cur_in != prev_in:
                f = (bound - prev[axis]) / (cur[axis] - prev[axis])
                cross = (prev[0] + f * (cur[0] - prev[0]), prev[1] + f * (cur[1] - prev[1]))
                out.append(cross)
            if cur_in:
                out.append(cur)
        pts = out
        if not pts:
            return 0.0
    a = np.asarray(pts)
    return float(
        abs(np.dot(a[:, 0], np.roll(a[:, 1], -1)) - np.dot(a[:, 1], np.roll(a[:, 0], -1))) / 2
    )


def _points_in_polygon(pts: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule; an edge counts when ``min(yi, yj) <= y < max(yi, yj)``."""
    x, y = pts[:, 0], pts[:, 1]
    inside = np.zeros(len(pts), dtype=bool)
    xj, yj = poly[-1]
    for xi, yi in poly:
        if yi != yj:
            crosses = (yi > y) != (yj > y)
            x_at = xi + (y - yi) * (xj - xi) / (yj - yi)
            inside ^= crosses & (x < x_at)
        xj, yj = xi, yi
    return inside


def build_query(
    embeddings: np.ndarray,
    positive_idx: Sequence[int] | np.ndarray,
    negative_idx: Sequence[int] | np.ndarray | None = None,
    neg_weight: float = NEG_WEIGHT,
) -> np.ndarray:
    """A unit query vector (D,) from example tiles, Rocchio style.

    ``q = mean(E[pos]) - neg_weight * mean(E[neg])``, then L2-normalised. Tiles in both sets
    count as positive only. Negatives push the query away from what they look like.

    The default weight, 0.25, follows Rocchio relevance feedback, whose classic weights put
    the non-relevant examples at a fifth to a third of the relevant ones (beta = 0.75 against
    gamma = 0.15-0.25). A weight of 1 lets a "not like this" region that resembles the query
    (near-duplicate tissue, cosine ~0.9) cancel most of it: the query becomes the small
    difference between the two, and the ranking follows that instead of the tissue.

    Raises
    ------
    SearchError
        No positive tiles, or positives and negatives cancel out.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    pos = np.unique(np.asarray(positive_idx, dtype=np.int64))
    if len(pos) == 0:
        raise SearchError(
            "the drawn region covers no embedded tissue tiles; draw over tissue (a tile counts "
            "when its centre is inside the shape)"
        )
    if not (np.isfinite(neg_weight) and neg_weight >= 0):
        raise SearchError(f"the 'not like this' weight must be 0 or more, not {neg_weight!r}")
    q = emb[pos].astype(np.float64).mean(0)
    if negative_idx is not None:
        neg = np.setdiff1d(np.asarray(negative_idx, dtype=np.int64), pos)
        if len(neg) and neg_weight:
            q -= float(neg_weight) * emb[neg].astype(np.float64).mean(0)
    norm = np.linalg.norm(q)
    if not norm > 1e-6:
        raise SearchError(
            "positive and negative regions cancel out; draw them over different tissue or "
            "lower the negative weight"
        )
    return (q / norm).astype(np.float32)


def query_from_regions(
    store: Any,
    positive_shapes: Iterable[ArrayLike],
    negative_shapes: Iterable[ArrayLike] = (),
    neg_weight: float = NEG_WEIGHT,
    *,
    empty_message: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The query of a store's regions: ``(query, positive rows, negative rows)``.

    `store` is an `EmbeddingStore`, or anything with its ``done``, ``coords``, ``tile_l0``
    and ``embeddings`` (`tilescope.live.RowsOverlay`: a store being embedded).

    Only embedded tiles count (``store.done``): a tile whose read failed, or that an
    interrupted run has not reached, is in neither set. The shapes are level-0 polygons as in
    `tiles_in_shapes` (a shape smaller than a tile selects the tile it overlaps most). A tile
    in both sets counts as positive only, and is not among the negative rows returned; the
    query is `build_query` of the two sets.

    Raises
    ------
    SearchError
        The positive shapes hold no embedded tile (`empty_message`, if given, says so); the
        negative shapes hold tiles but all of them are positive too (the "not like this"
        regions would be ignored); or positives and negatives cancel out.
    """
    done = store.done
    pos = tiles_in_shapes(store.coords, store.tile_l0, positive_shapes, eligible=done)
    neg_all = tiles_in_shapes(store.coords, store.tile_l0, negative_shapes, eligible=done)
    if not len(pos) and empty_message is not None:
        raise SearchError(empty_message)
    neg = np.setdiff1d(neg_all, pos)
    if len(neg_all) and not len(neg) and len(pos):
        raise SearchError(
            f"the 'not like this' regions hold {len(neg_all)} tiles, all of them inside the "
            "query regions too (a tile in both counts as like), so they would change nothing; "
            "draw them over other tissue"
        )
    return build_query(store.embeddings, pos, neg, neg_weight), pos, neg


def similarity(embeddings: np.ndarray, query: np.ndarray) -> np.ndarray:
    """(N,) float32 cosine similarity of L2-normalised embeddings (N, D) to a unit query (D,)."""
    emb = np.asarray(embeddings)
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    if emb.ndim != 2 or emb.shape[1] != len(q):
        raise SearchError(
            f"query of width {len(q)} does not fit embeddings {emb.shape}: make the query from "
            "stores of the same model"
        )
    if emb.dtype != np.float32:
        emb = emb.astype(np.float32)
    return emb @ q


def similarity_map(store: Any, query: np.ndarray) -> np.ndarray:
    """(N,) cosine similarity of every tile of an `EmbeddingStore` to `query`, NaN for the tiles
    not embedded (failed, or not yet): the similarity map drawn by napari and the PNGs."""
    done = np.asarray(store.done, dtype=bool)
    return np.where(done, similarity(store.embeddings, query), np.float32(np.nan))


def top_k(sim: np.ndarray, k: int, exclude: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Indices of the `k` highest similarities, best first; ties go to the lower index.

    ``exclude`` holds indices (or an (N,) bool mask) never returned; NaN never ranks.
    """
    s = np.asarray(sim).reshape(-1)
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float64)
    ok = np.isfinite(s)
    if exclude is not None:
        ex = np.asarray(exclude)
        if ex.dtype == bool:
            ok &= ~ex.reshape(-1)
        elif ex.size:
            ok[ex.astype(np.int64)] = False
    k = min(int(k), int(np.count_nonzero(ok)))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    neg = -s  # ascending order of neg = descending similarity
    if not ok.all():
        neg[~ok] = np.inf
    kth = neg[np.argpartition(neg, k - 1)[k - 1]]
    idx = np.flatnonzero(neg <= kth)  # every tie with the k-th value, so the index rule decides
    order = np.lexsort((idx, neg[idx]))[:k]
    return idx[order].astype(np.int64)


@dataclass(frozen=True)
class Match:
    """One matching tile: its store, slide, row, level-0 top-left (x, y) and similarity."""

    store: str
    slide_name: str
    index: int
    x: int
    y: int
    similarity: float
    tile_l0: float


def _model_key(prov: Mapping[str, Any]) -> dict[str, Any]:
    return {k: prov.get(k) for k in MODEL_IDENTITY_KEYS if prov.get(k) is not None}


def search_stores(
    query: np.ndarray,
    stores: str | PathLike[str] | Sequence[str | PathLike[str]],
    *,
    model: Mapping[str, Any],
    k: int = 20,
    exclude: Mapping[_PathT, Sequence[int] | np.ndarray] | None = None,
    per_slide: int | None = None,
) -> list[Match]:
    """The `k` best-matching tiles over several stores, best first, reading every store.

    For a folder of many stores, `tilescope.index.search_folder` answers from the folder's
    index instead (memory-mapped, built once, updated incrementally).

    Parameters
    ----------
    query
        Unit query vector (D,), e.g. from `build_query`.
    stores
        Store paths and folders of stores (every ``*.zarr`` embedding store in a folder is
        searched; other zarr folders, e.g. exports, are skipped with a warning).
    model
        Provenance of the model the query came from (``Encoder.provenance()`` or a store's
        ``signature["model"]``); its weights_digest, trained and embed_dim (those it has) must
        equal every store's (model_id may differ: the same weights from the hub or a folder).
    k
        Number of matches.
    exclude
        Store path -> row indices to leave out (e.g. the query tiles themselves).
    per_slide
        At most this many matches from any one store (slide); default no cap.

    Every store is checked before any is searched: if one was made with a different model the
    whole search is refused with a `SearchError` naming each such store, since similarities
    across models are meaningless. Rows of incomplete stores that are not done are skipped.
    Ties rank by store order, then row index. An unreadable store raises its `StoreError`.
    """
    paths = _store_paths(stores)
    want = _model_key(model)
    if "weights_digest" not in want:
        raise SearchError("model provenance without weights_digest; pass Encoder.provenance()")
    opened = [EmbeddingStore.open(p) for p in paths]
    bad = []
    for st in opened:
        have = {k2: st.signature["model"].get(k2) for k2 in want}
        if have != want or st.embed_dim != len(np.reshape(query, -1)):
            bad.append(f"  {st.path}: model {have} (D={st.embed_dim})")
    if bad:
        raise SearchError(
            f"these stores were made with a different model than the query ({want}):\n"
            + "\n".join(bad)
            + "\nre-embed those slides with the query's model, or leave them out of the search"
        )
    found: list[tuple[float, int, int, Match]] = []
    excl = {Path(p).resolve(): v for p, v in (exclude or {}).items()}
    for order, st in enumerate(opened):
        sim = similarity(st.read_embeddings(), query)  # one store in memory at a time
        skip = ~st.done
        if st.path.resolve() in excl:
            skip[np.asarray(excl[st.path.resolve()], dtype=np.int64)] = True
        for i in top_k(sim, k if per_slide is None else min(k, per_slide), exclude=skip):
            x, y = (int(v) for v in st.coords[i])
            m = Match(str(st.path), st.slide_name, int(i), x, y, float(sim[i]), st.tile_l0)
            found.append((-m.similarity, order, int(i), m))
    found.sort(key=lambda t: t[:3])
    return [t[3] for t in found[:k]]


def _is_embedding_store(path: Path) -> bool:
    """A folder whose zarr.json carries a Tilescope embeddings signature (cheap: one JSON)."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("attributes", {}).get("tilescope", {}).get("format") == FORMAT_NAME


def _store_paths(stores: str | PathLike[str] | Sequence[str | PathLike[str]]) -> list[Path]:
    """Store paths, each folder of stores expanded to its ``*.zarr`` stores; no duplicates."""
    entries = [stores] if isinstance(stores, (str, PathLike)) else list(stores)
    if not entries:
        raise SearchError("no stores to search; pass store paths or a folder of .zarr stores")
    paths: list[Path] = []
    for entry in entries:
        p = Path(entry)
        if p.is_dir() and p.suffix != ".zarr" and not (p / "zarr.json").exists():
            candidates = sorted(c for c in p.iterdir() if c.suffix == ".zarr" and c.is_dir())
            found = [c for c in candidates if _is_embedding_store(c)]
            if len(found) < len(candidates):
                other = ", ".join(c.name for c in candidates if c not in found)
                warnings.warn(f"{p}: skipped zarr folders that are not embedding stores "
                              f"(exports?): {other}", stacklevel=3)  # fmt: skip
            if not found:
                raise SearchError(f"{p}: no Tilescope embedding stores (*.zarr) in this folder")
            paths += found
        else:
            paths.append(p)
    seen: set[Path] = set()  # a store named twice (itself and in its folder) is searched once
    unique = []
    for p in paths:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique
