"""Results that grow while a slide is being embedded: per-tile scores, one batch at a time.

A live view keeps one value per tile of the store (NaN until the tile is embedded) and folds
in each batch as it lands (`EmbedProgress.indices` and ``.embeddings``): only the new rows are
scored, a ``(n, D) x (D, C)`` product; the prompts' text matrix and the search query are
computed once. Pooling and the heatmap raster are recomputed from the per-tile arrays
(`pool`, `tilescope.raster.heatmap`: a few vectorised passes), never from the store.

numpy only: no napari, no Qt, no model (the text matrix comes from the caller's encoder).

Examples
--------
>>> live = LiveScores.from_store(store, prompts, enc.encode_text, enc.logit_scale)  # doctest: +SKIP
>>> for report in iter_embed_slide(slide, store_path, encoder=enc):           # doctest: +SKIP
...     if report.indices is not None:
...         live.add(report.indices, report.embeddings)
...         label = live.pool("attention").label
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from .errors import SearchError
from .score import ATTENTION_TEMPERATURE, PatchScores, PoolResult, PromptSet, pool, score_patches
from .score import text_matrix as _text_matrix
from .search import similarity

__all__ = ["LiveScores", "LiveSimilarity", "RowsOverlay", "coverage_text"]


def coverage_text(n_done: int, n_tiles: int, complete: bool | None = None) -> str:
    """``"partial: 612 of 36,864 tiles"`` while tiles are still to embed, else ``""``.

    `complete` (the store's own flag) counts a store whose missing tiles all failed to read
    as whole; without it, any tile not done makes it partial.
    """
    whole = complete if complete is not None else n_done >= n_tiles
    return "" if whole else f"partial: {n_done:,} of {n_tiles:,} tiles"


class RowsOverlay:
    """A store as it is on disk with rows that are not there yet folded in.

    A store being embedded stages its rows in memory and writes them every few seconds, so
    another reader lags behind the rows a run has reported. ``done`` and ``embeddings`` here
    include `batches` (``(indices, embeddings)`` pairs, e.g. the reports of the running
    embedding); everything else (``coords``, ``tile_l0``, ``signature`` ...) is the store's.
    """

    def __init__(self, store: Any, batches: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> None:
        self._store = store
        done = np.asarray(store.done, bool)
        emb = np.asarray(store.embeddings)
        if batches:
            done, emb = done.copy(), np.array(emb, np.float32)
            for idx, rows in batches:
                emb[np.asarray(idx, np.int64)] = rows
                done[np.asarray(idx, np.int64)] = True
        self.done, self.embeddings = done, emb

    @property
    def n_done(self) -> int:
        return int(self.done.sum())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class LiveScores:
    """Prompt scores of every tile of a store, filled in as tiles are embedded.

    Parameters
    ----------
    text
        (C, D) class embeddings (`tilescope.score.text_matrix`).
    logit_scale
        The model's logit scale.
    classes
        The C class names.
    n_tiles
        Rows of the store.
    """

    def __init__(self, text: np.ndarray, logit_scale: float, classes: list[str],
                 n_tiles: int) -> None:  # fmt: skip
        self.text = np.asarray(text, np.float32)
        self.logit_scale = float(logit_scale)
        self.classes = list(classes)
        c = len(self.classes)
        self.cosine = np.full((n_tiles, c), np.nan, np.float32)
        self.logits = np.full((n_tiles, c), np.nan, np.float32)
        self.probs = np.full((n_tiles, c), np.nan, np.float32)
        self.done = np.zeros(n_tiles, bool)

    @classmethod
    def from_store(cls, store: Any, prompts: PromptSet,
                   encode_text: Callable[[list[str]], np.ndarray],
                   logit_scale: float) -> LiveScores:  # fmt: skip
        """Score the rows a store holds now (as `tilescope.score.score_store` does); later
        rows come through `add`."""
        text = _text_matrix(prompts, encode_text)
        live = cls(text, logit_scale, prompts.class_names, int(store.n_tiles))
        done = np.asarray(store.done, bool)
        if done.any():
            live.add(np.flatnonzero(done), np.asarray(store.embeddings)[done])
        return live

    def add(self, indices: np.ndarray, embeddings: np.ndarray) -> None:
        """Score rows `indices` from their embeddings (n, D); rows seen before are scored
        again (the same embeddings give the same scores)."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if not len(idx):
            return
        s = score_patches(embeddings, self.text, self.logit_scale, self.classes)
        self.cosine[idx], self.logits[idx], self.probs[idx] = s.cosine, s.logits, s.probs
        self.done[idx] = True

    @property
    def n_done(self) -> int:
        return int(self.done.sum())

    @property
    def scores(self) -> PatchScores:
        """The per-tile scores (views of this object's arrays; NaN where not embedded)."""
        return PatchScores(self.classes, self.cosine, self.logits, self.probs, self.logit_scale)

    def pool(self, method: Literal["mean", "topk", "attention"] = "attention", *, k: int = 50,
             temperature: float = ATTENTION_TEMPERATURE) -> PoolResult:  # fmt: skip
        """The slide-level call over the tiles embedded so far (`tilescope.score.pool`);
        `~tilescope.errors.SearchError` while none is."""
        return pool(self.scores, method, k=k, temperature=temperature,
                    weights=self.done.astype(np.float64))  # fmt: skip


class LiveSimilarity:
    """Similarity of every tile of a store to a fixed query, filled in as tiles are embedded.

    ``sim`` is (N,) float32, NaN where a tile is not embedded (as `similarity_map` gives).
    """

    def __init__(self, query: np.ndarray, n_tiles: int) -> None:
        self.query = np.asarray(query, np.float32).reshape(-1)
        self.sim = np.full(n_tiles, np.nan, np.float32)
        self.done = np.zeros(n_tiles, bool)

    @classmethod
    def from_store(cls, store: Any, query: np.ndarray) -> LiveSimilarity:
        live = cls(query, int(store.n_tiles))
        done = np.asarray(store.done, bool)
        if done.any():
            live.add(np.flatnonzero(done), np.asarray(store.embeddings)[done])
        return live

    def add(self, indices: np.ndarray, embeddings: np.ndarray) -> None:
        idx = np.asarray(indices, np.int64).reshape(-1)
        if not len(idx):
            return
        emb = np.asarray(embeddings, np.float32)
        if emb.ndim != 2 or emb.shape[1] != len(self.query):
            raise SearchError(f"rows of width {emb.shape[-1]} do not fit a query of width "
                              f"{len(self.query)}: the query comes from another model")  # fmt: skip
        self.sim[idx] = similarity(emb, self.query)
        self.done[idx] = True
