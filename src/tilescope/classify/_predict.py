"""Applying a classifier to a store, and saving its output as a score set."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._model import Classifier


@dataclass(frozen=True)
class Prediction:
    """A classifier's output on one store; rows of tiles not embedded are NaN / -1."""

    classes: list[str]
    colors: list[tuple[int, int, int]]
    probs: np.ndarray  # (N, C) float32
    label: np.ndarray  # (N,) int16, -1 = not embedded
    uncertainty: np.ndarray  # (N,) float32, normalised entropy
    area_mm2: dict[str, float]  # winning-class area per class (of the embedded tiles)
    trained_model: bool = True
    n_tiles: int = 0  # tiles of the store's grid (0: not known)
    complete: bool = True  # the store was complete (its tiles not predicted all failed)

    @property
    def n_predicted(self) -> int:
        return int((self.label >= 0).sum())

    @property
    def coverage(self) -> str:
        """``"partial: n of N tiles"`` for a store still to embed, else ``""`` (as `score`)."""
        from ..live import coverage_text

        return coverage_text(self.n_predicted, self.n_tiles or len(self.label), self.complete)


def predict(store: Any, clf: Classifier, *, where: str = "the classifier") -> Prediction:
    """Apply `clf` to every embedded tile of `store` (after `Classifier.check_store`)."""
    clf.check_store(store, where=where)
    done = np.asarray(store.done, dtype=bool)
    n, k = store.n_tiles, len(clf.classes)
    emb = np.asarray(store.embeddings)
    p = clf.predict_proba(emb if done.all() else emb[done])  # no copy of a complete store
    probs = np.full((n, k), np.nan, dtype=np.float32)
    probs[done] = p
    label = np.full(n, -1, dtype=np.int16)
    label[done] = np.argmax(p, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    unc = np.full(n, np.nan, dtype=np.float32)
    unc[done] = ent / math.log(k)
    lay = store.signature["layout"]
    cell_mm2 = (float(lay["stride_l0"]) * store.level0_mpp / 1000.0) ** 2
    area = {c: float((label == j).sum() * cell_mm2) for j, c in enumerate(clf.classes)}
    trained = bool(store.signature["model"].get("trained", True))
    return Prediction(list(clf.classes), list(clf.colors), probs, label, unc, area, trained,
                      int(n), bool(store.complete))  # fmt: skip


def save_prediction(store: Any, name: str, clf: Classifier, pred: Prediction) -> None:
    """Save `pred` as the score set ``scores/<name>`` (see the module docstring)."""
    meta = {
        "kind": "classifier", "classes": pred.classes, "colors": [list(c) for c in pred.colors],
        "model_id": store.model_id, "weights_digest": clf.model.get("weights_digest"),
        "trained": pred.trained_model, "area_mm2": pred.area_mm2,
        "classifier": clf.summary(),
    }  # fmt: skip
    arrays = {"probs": pred.probs, "uncertainty": pred.uncertainty, "label": pred.label}
    store.write_scores(name, arrays, meta)


def classify_store(
    path: Any, clf: Classifier, name: str, *, where: str = "the classifier"
) -> Prediction:
    """Open the store at `path`, apply `clf` and save the result as ``scores/<name>``."""
    from ..store import EmbeddingStore

    store = EmbeddingStore.open(path)
    pred = predict(store, clf, where=where)
    save_prediction(store, name, clf, pred)
    return pred
