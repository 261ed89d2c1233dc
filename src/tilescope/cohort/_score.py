"""Scoring many stores at once: a slide label per store and the top tiles of each class.

Each store is scored by `tilescope.score.score_store` with the text tower of the model that
made it: stores are grouped by model (id and weights digest), each model is loaded once. A
store that cannot be read, or whose model cannot be loaded, is reported and the others are
scored. Partial stores are scored on their embedded tiles and flagged as partial.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import TilescopeError
from ..score import ATTENTION_TEMPERATURE, PromptSet, score_store


@dataclass(frozen=True)
class TopTile:
    """One of the top tiles of a class in a slide: ranked by the class's cosine similarity
    (the evidence attention and top-k pooling weigh most), with its probability."""

    cls: str
    rank: int
    row: int
    x: int
    y: int
    size_l0: float
    cosine: float
    logit: float
    prob: float
    attention: float | None


@dataclass
class ScoredSlide:
    """The result for one store. ``state``: complete, partial (scored on its embedded tiles),
    empty (nothing embedded: no label) or error (see ``error``)."""

    store: Path
    slide: str = ""
    model: str = ""
    trained: bool | None = None
    state: str = "error"
    n_tiles: int = 0
    n_done: int = 0
    n_failed: int = 0
    label: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    pooling: str = ""
    error: str = ""
    top: list[TopTile] = field(default_factory=list)


def model_key(model: Mapping[str, Any]) -> tuple[str, str]:
    """What makes two stores' embeddings comparable: the model id and its weights digest."""
    return str(model.get("model_id", "?")), str(model.get("weights_digest", ""))


def score_stores(
    stores: Sequence[str | PathLike[str]],
    prompts: PromptSet,
    load: Callable[[Mapping[str, Any]], Any],
    *,
    method: Literal["mean", "topk", "attention"] = "attention",
    k: int = 50,
    temperature: float = ATTENTION_TEMPERATURE,
    top: int = 5,
    progress: Callable[[int, int, ScoredSlide], None] | None = None,
) -> list[ScoredSlide]:
    """Score every store against `prompts`; one `ScoredSlide` per store, in the given order.

    `load` returns the encoder of a store's model from its signature's ``model`` entry
    (`tilescope.models.load_encoder_for_store`); it is called once per model. `top` tiles per
    class are kept (0: none). `progress(i, n, result)` is called after each store.
    """
    from ..catalog import read_signature
    from ..store import EmbeddingStore

    out = [ScoredSlide(Path(s)) for s in stores]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, res in enumerate(out):
        sig = read_signature(res.store)
        if sig is None:
            res.error = f"{res.store}: not a Tilescope embedding store"
            continue
        res.slide = str(sig.get("slide", {}).get("name", res.store.stem))
        res.model = str(sig.get("model", {}).get("model_id", "?"))
        groups.setdefault(model_key(sig.get("model", {})), []).append(i)
    finished = 0
    for members in groups.values():
        first = read_signature(out[members[0]].store) or {}
        try:
            encoder = load(first.get("model", {}))
        except TilescopeError as exc:
            for i in members:
                out[i].error = f"{out[i].store}: its model could not be loaded: {exc}"
            continue
        for i in members:
            _score_one(out[i], EmbeddingStore, prompts, encoder, method, k, temperature, top)
            finished += 1
            if progress is not None:
                progress(finished, len(out), out[i])
    return out


def _score_one(
    res: ScoredSlide,
    store_cls: Any,
    prompts: PromptSet,
    encoder: Any,
    method: Literal["mean", "topk", "attention"],
    k: int,
    temperature: float,
    top: int,
) -> None:
    try:
        store = store_cls.open(res.store)
        res.slide, res.trained = store.slide_name, bool(encoder.trained)
        res.n_tiles, res.n_done, res.n_failed = store.n_tiles, store.n_done, store.n_failed
        if store.n_done == 0:
            res.state = "empty"
            res.error = "no tile embedded yet: run tilescope embed to finish it"
            return
        scores, pooled = score_store(store, prompts, encoder.encode_text, encoder.logit_scale,
                                     method=method, k=k, temperature=temperature)  # fmt: skip
    except (TilescopeError, OSError) as exc:
        res.state, res.error = "error", str(exc)
        return
    res.state = "complete" if store.n_todo == 0 else "partial"  # pooled over embedded tiles
    res.label, res.scores, res.pooling = pooled.label, dict(pooled.scores), pooled.method
    if top > 0:
        done = np.asarray(store.done, bool)
        res.top = _top_tiles(scores, pooled.attention, done, store.coords, store.tile_l0, top)


def _top_tiles(
    scores: Any, attention: np.ndarray | None, done: np.ndarray, coords: np.ndarray,
    size_l0: float, n: int,
) -> list[TopTile]:  # fmt: skip
    rows = np.flatnonzero(done)
    found: list[TopTile] = []
    for c, name in enumerate(scores.classes):
        cos = scores.cosine[rows, c]
        take = rows[np.argsort(-cos, kind="stable")[: min(n, len(rows))]]
        for rank, r in enumerate(take, start=1):
            found.append(TopTile(
                name, rank, int(r), int(coords[r, 0]), int(coords[r, 1]), float(size_l0),
                float(scores.cosine[r, c]), float(scores.logits[r, c]),
                float(scores.probs[r, c]),
                None if attention is None else float(attention[r, c]),
            ))  # fmt: skip
    return found
