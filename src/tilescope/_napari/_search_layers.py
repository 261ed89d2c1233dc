"""The Region search widget's results: the request, the result, and building them from a store
(as it is, with the rows a running embedding has reported folded in) or from the live
similarity map while the slide is embedded (`search_result`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..figures import ColorScale
from ..live import LiveSimilarity, RowsOverlay, coverage_text
from ..raster import TileGeometry, heatmap
from ..search import NEG_WEIGHT, query_from_regions, top_k
from ._common import UNTRAINED_TAG, open_store
from ._layers import LayerData, SlideFrame, heatmap_layer, matches_layer, result_name

ROLE = "region-search"


@dataclass(frozen=True)
class SearchRequest:
    """Drawn regions as level-0 (x, y) polygons (or shapely regions with holes, from QuPath
    annotations) and the search options."""

    store_path: Path | None  # None: the slide has no store yet (searched once it has)
    frame: SlideFrame
    positive: list[Any]
    negative: list[Any] = field(default_factory=list)
    neg_weight: float = NEG_WEIGHT
    k: int = 10
    exclude_query: bool = True


@dataclass(frozen=True)
class StoreFacts:
    """What a live redraw needs of the store: where its tiles are and what made it."""

    coords: np.ndarray
    tile_l0: float
    slide_name: str
    geometry: TileGeometry
    model: dict[str, Any]
    n_tiles: int
    complete: bool


@dataclass
class SearchResult:
    """The query, the ranked matches (best first) and the layers that show them."""

    request: SearchRequest
    query: np.ndarray
    query_idx: np.ndarray
    match_idx: np.ndarray
    match_sim: np.ndarray
    centres: np.ndarray  # (k, 2) world (row, col) of each match's centre
    tile_world: float  # tile side in world units
    model: dict[str, Any]
    layers: list[LayerData]
    legend: str = ""
    live: LiveSimilarity | None = None
    facts: StoreFacts | None = None
    coverage: str = ""  # "partial: n of N tiles", or ""


def search_store(req: SearchRequest,
                 extra: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> SearchResult:  # fmt: skip
    """Tiles under the shapes -> query -> similarity of every tile -> top matches (no Qt).
    `extra`: rows a running embedding has reported that the store may not hold yet."""
    if req.store_path is None:
        raise ValueError("no store to search")
    store = open_store(req.store_path)
    rows = RowsOverlay(store, extra)
    query, pos, _ = query_from_regions(rows, req.positive, req.negative, req.neg_weight)
    facts = StoreFacts(store.coords, float(store.tile_l0), store.slide_name,
                       TileGeometry.from_store(store), dict(store.signature["model"]),
                       int(store.n_tiles), bool(store.complete))  # fmt: skip
    return search_result(req, LiveSimilarity.from_store(rows, query), facts, pos)


def search_result(req: SearchRequest, live: LiveSimilarity, facts: StoreFacts,
                  pos: np.ndarray, complete: bool | None = None) -> SearchResult:  # fmt: skip
    """The matches and layers of the similarities so far (any thread)."""
    sim = live.sim
    skip = ~live.done
    if req.exclude_query:
        skip[pos] = True
    top = top_k(sim, req.k, exclude=skip)
    tag = "" if facts.model.get("trained", True) else UNTRAINED_TAG
    meta = req.frame.meta(ROLE, store=str(req.store_path))
    xy = facts.coords[top]
    features = {
        "rank": np.arange(1, len(top) + 1),
        "similarity": sim[top].astype(np.float64),
        "slide": [facts.slide_name] * len(top),
        "x": xy[:, 0].astype(np.int64) if len(top) else np.zeros(0, np.int64),
        "y": xy[:, 1].astype(np.int64) if len(top) else np.zeros(0, np.int64),
    }
    hm = heatmap(sim, facts.geometry)
    scale = ColorScale.stretched(hm.raster)
    f = req.frame
    layers = [
        heatmap_layer(hm, f, result_name("similarity", f, tag), scale, colorbar=True,
                      metadata=meta),
        matches_layer(xy, facts.tile_l0, f, features, result_name("matches", f, tag),
                      metadata=meta),
    ]  # fmt: skip
    centres = f.tile_centres(xy, facts.tile_l0)
    tile_world = facts.tile_l0 * float(np.mean(np.abs(np.linalg.eigvals(f.matrix[:2, :2]))))
    whole = facts.complete if complete is None else complete
    coverage = coverage_text(int(live.done.sum()), facts.n_tiles, whole)
    return SearchResult(req, live.query, pos, top, sim[top], centres, tile_world, facts.model,
                        layers, scale.legend(), live, facts, coverage)  # fmt: skip
