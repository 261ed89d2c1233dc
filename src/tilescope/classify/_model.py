"""The classifier itself: a linear softmax model, its JSON file, fitting and region-wise CV."""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from .._signature import MODEL_IDENTITY_KEYS, jsonable
from .._version import __version__
from ..errors import TilescopeError

if TYPE_CHECKING:
    from ._data import TrainingSet

CLASSIFIER_FORMAT = "tilescope-classifier"
FORMAT_VERSION = 1
#: Inverse regularisation strength of the logistic regression (on standardised embeddings).
DEFAULT_C = 0.1
MAX_FOLDS = 5


class ClassifierError(TilescopeError):
    """A classifier cannot be trained, read, or applied to this store."""


class ClassifierWarning(UserWarning):
    """A classifier was applied to tiles unlike those it was trained on (size, µm/px)."""


@dataclass(frozen=True)
class CrossValidation:
    """Region-wise cross-validated accuracy (out-of-fold predictions of held-out regions)."""

    accuracy: float
    balanced_accuracy: float
    n_folds: int
    recall: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "balanced_accuracy": self.balanced_accuracy,
                "n_folds": self.n_folds, "recall": self.recall, "by": "region"}  # fmt: skip


@dataclass
class Classifier:
    """A linear softmax classifier over a model's embeddings; see the module docstring."""

    classes: list[str]
    colors: list[tuple[int, int, int]]
    weights: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)
    model: dict[str, Any]  # identity of the embedding model (MODEL_IDENTITY_KEYS + model_id)
    grid: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    cv: CrossValidation | None = None
    cv_note: str = ""  # why there is no cross-validation
    created: str = ""

    def predict_proba(self, embeddings: ArrayLike) -> np.ndarray:
        """(N, C) float32 class probabilities of embeddings (N, D)."""
        e = np.asarray(embeddings, dtype=np.float32)
        if e.ndim != 2 or e.shape[1] != self.weights.shape[1]:
            raise ClassifierError(f"embeddings {e.shape} do not fit a classifier of width "
                                  f"{self.weights.shape[1]}")  # fmt: skip
        with one_blas_thread():  # float32: unit-norm embeddings, logits need no more
            z = e @ self.weights.T.astype(np.float32) + self.bias.astype(np.float32)
        z -= z.max(axis=1, keepdims=True) if len(z) else 0
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def check_store(self, store: Any, *, where: str = "the classifier") -> None:
        """Refuse a store embedded with another model; warn on another tile size or µm/px."""
        have = model_identity(store.signature["model"])
        diffs = [k for k in MODEL_IDENTITY_KEYS if k in have and k in self.model
                 and have[k] != self.model[k]]  # fmt: skip
        if diffs or "weights_digest" not in have or "weights_digest" not in self.model:
            want, got = self.model.get("weights_digest", "?"), have.get("weights_digest", "?")
            raise ClassifierError(
                f"{store.path}: embedded with {have.get('model_id')} (weights {str(got)[:12]}), "
                f"but {where} was trained on embeddings of {self.model.get('model_id')} (weights "
                f"{str(want)[:12]}); differs in {', '.join(diffs) or 'weights_digest'}. Train a "
                "classifier on this slide's embeddings, or embed the slide with that model."
            )
        grid = store.signature.get("grid", {})
        for key, unit in (("target_mpp", "µm/px"), ("tile_px", "px tiles")):
            if key in self.grid and key in grid and float(grid[key]) != float(self.grid[key]):
                warnings.warn(
                    f"{store.path}: {grid[key]} {unit}, but {where} was trained on "
                    f"{self.grid[key]} {unit}; its predictions may be off",
                    ClassifierWarning, stacklevel=3,
                )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return jsonable({
            "format": CLASSIFIER_FORMAT, "format_version": FORMAT_VERSION,
            "tilescope_version": __version__, "created": self.created,
            "classes": self.classes, "colors": [list(c) for c in self.colors],
            "weights": self.weights.tolist(), "bias": self.bias.tolist(),
            "model": self.model, "grid": self.grid, "training": self.training,
            "cv": self.cv.as_dict() if self.cv else None, "cv_note": self.cv_note,
        })  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """What a score set's meta records about the classifier (no weights)."""
        d = self.as_dict()
        return {
            k: d[k] for k in ("format", "created", "model", "grid", "training", "cv", "cv_note")
        }

    def save(self, path: str | PathLike[str]) -> Path:
        """Write the classifier as JSON (temporary name, then renamed into place)."""
        dest = Path(path)
        if dest.is_dir():
            raise ClassifierError(f"{dest}: is a folder; name a .json file for the classifier")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_text(json.dumps(self.as_dict(), indent=1, allow_nan=False))
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
        return dest

    @classmethod
    def load(cls, path: str | PathLike[str]) -> Classifier:
        """Read a classifier saved by `save`."""
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ClassifierError(f"{p}: no such classifier file") from None
        except (OSError, ValueError) as exc:
            raise ClassifierError(f"{p}: not a readable classifier file ({exc})") from None
        if not isinstance(d, dict) or d.get("format") != CLASSIFIER_FORMAT:
            raise ClassifierError(f"{p}: not a Tilescope classifier (save one with "
                                  "tilescope classify --train ... --write-classifier)")  # fmt: skip
        try:
            w = np.asarray(d["weights"], dtype=np.float64)
            b = np.asarray(d["bias"], dtype=np.float64)
            classes = [str(c) for c in d["classes"]]
            colors = [tuple(int(v) for v in c[:3]) for c in d["colors"]]
            ok = w.ndim == 2 and w.shape[0] == len(classes) == len(b) == len(colors)
            cv = CrossValidation(**{k: d["cv"][k] for k in ("accuracy", "balanced_accuracy",
                                 "n_folds", "recall")}) if d.get("cv") else None  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ClassifierError(f"{p}: damaged classifier file ({exc})") from None
        if not ok or not np.all(np.isfinite(w)) or not np.all(np.isfinite(b)):
            raise ClassifierError(f"{p}: damaged classifier file (weights do not fit classes)")
        return cls(classes, colors, w, b, dict(d.get("model") or {}), dict(d.get("grid") or {}),  # type: ignore[arg-type]
                   dict(d.get("training") or {}), cv, str(d.get("cv_note", "")),
                   str(d.get("created", "")))  # fmt: skip


def model_identity(model: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a store's model provenance that must match (and the id, for messages)."""
    keep = (*MODEL_IDENTITY_KEYS, "model_id")
    return {k: model[k] for k in keep if model.get(k) is not None}


def one_blas_thread() -> Any:
    """A context in which BLAS runs on one thread.

    The classifier's matrices are small (thousands x 512): threads add only overhead, and on a
    busy machine OpenBLAS's spinning threads made one fit 2.0 s instead of 0.1 s (measured on
    this project's 2-core test machine). threadpoolctl comes with scikit-learn.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _fit(x: np.ndarray, y: np.ndarray, n_classes: int, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression on standardised x; returns (W, b) on raw x for all n_classes."""
    from sklearn.linear_model import LogisticRegression

    mean, std = x.mean(0), x.std(0)
    std[std < 1e-12] = 1.0
    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    with one_blas_thread():
        lr.fit((x - mean) / std, y)
    coef, icpt = np.asarray(lr.coef_), np.asarray(lr.intercept_)
    if coef.shape[0] == 1:  # binary: sigmoid(z) = softmax([0, z])
        coef, icpt = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, icpt]
    w = np.zeros((n_classes, x.shape[1]))
    b = np.full(n_classes, -1e3)  # a class missing from this fit is never predicted
    w[lr.classes_] = coef / std
    b[lr.classes_] = icpt - (coef / std) @ mean
    return w, b


def cross_validate(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, classes: Sequence[str], c: float = DEFAULT_C
) -> tuple[CrossValidation | None, str]:
    """Hold out whole regions; returns the result, or None and the reason it cannot be done."""
    from sklearn.model_selection import StratifiedGroupKFold

    per_class = [len(np.unique(groups[y == k])) for k in range(len(classes))]
    folds = min(MAX_FOLDS, min(per_class))
    if folds < 2:
        few = [c_ for c_, n in zip(classes, per_class, strict=True) if n < 2]
        return None, (f"not measurable: draw at least two separate regions of "
                      f"{', '.join(map(repr, few))} to cross-validate by region")  # fmt: skip
    pred = np.full(len(y), -1)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0)
    for tr, te in splitter.split(x, y, groups):
        w, b = _fit(x[tr], y[tr], len(classes), c)
        pred[te] = np.argmax(x[te] @ w.T + b, axis=1)
    recall = {c_: float(np.mean(pred[y == k] == k)) for k, c_ in enumerate(classes)}
    acc = float(np.mean(pred == y))
    return CrossValidation(acc, float(np.mean(list(recall.values()))), folds, recall), ""


def train(
    store: Any, data: TrainingSet, *, c: float = DEFAULT_C, validate: bool = True
) -> Classifier:
    """Fit the classifier on a store's training tiles and cross-validate it by region."""
    if not c > 0:
        raise ClassifierError(f"regularisation C must be positive, not {c}")
    x = np.asarray(store.embeddings)[data.indices].astype(np.float64)
    cv, note = (cross_validate(x, data.labels, data.groups, data.classes, c) if validate
                else (None, "not computed"))  # fmt: skip
    w, b = _fit(x, data.labels, len(data.classes), c)
    sig = store.signature
    grid = {k: sig.get("grid", {}).get(k) for k in ("target_mpp", "tile_px", "overlap_px")}
    training = {
        "slide": store.slide_name, "store": store.path.name, "source": data.source,
        "tiles": data.tiles_per_class(), "regions": data.regions_per_class(),
        "left_out_ambiguous": data.n_ambiguous, "left_out_not_embedded": data.n_not_embedded,
        "C": c, "class_weight": "balanced",
    }  # fmt: skip
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Classifier(list(data.classes), list(data.colors), w, b, model_identity(sig["model"]),
                      grid, training, cv, note, now)  # fmt: skip
