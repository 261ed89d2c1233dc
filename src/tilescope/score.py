"""Prompt sets, patch scores and slide-level pooling (numpy only).

The zero-shot recipe is open_clip's ``build_zero_shot_classifier``: every template x prompt of
a class is encoded, the L2-normalised text embeddings are averaged per class and re-normalised,
giving a (C, D) text matrix. Patch scores are then matrix products with the stored L2-normalised
image embeddings: cosine (N, C), logits = logit_scale * cosine, probs = softmax over classes.

Heatmap rasters live in `tilescope.raster`; `TileGeometry`, `Heatmap`, `heatmap` and
`MAX_CELLS` are re-exported here so ``from tilescope.score import heatmap`` keeps working.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .errors import PromptError, SearchError
from .raster import MAX_CELLS, Heatmap, TileGeometry, heatmap

__all__ = [
    "MAX_CELLS",
    "Heatmap",
    "PatchScores",
    "PoolResult",
    "PromptSet",
    "PromptWarning",
    "TileGeometry",
    "heatmap",
    "load_scores",
    "pool",
    "save_scores",
    "score_patches",
    "text_matrix",
]

#: Attention pooling's default temperature, in cosine-similarity units.
ATTENTION_TEMPERATURE = 0.05
_SPLIT = re.compile(r"[;|]")


class PromptWarning(UserWarning):
    """A prompt set was accepted with a change (dropped empty prompt, merged class, ...)."""


@dataclass
class PromptSet:
    """Classes, each with one or more prompts, and the templates every prompt is put in.

    Parameters
    ----------
    classes
        Class name -> prompts. Prompts are stripped; empty ones are dropped with a
        `PromptWarning`; repeated prompts are kept once. A class left without prompts, or no
        class at all, raises `PromptError`. A single class is allowed with a warning: its
        softmax probability is always 1, only its cosine and logits carry information.
    templates
        Format strings with one ``{}`` where the prompt goes, e.g. ``"an H&E image of {}"``.
    """

    classes: dict[str, list[str]]
    templates: list[str] = field(default_factory=lambda: ["{}"])

    def __post_init__(self) -> None:
        cleaned: dict[str, list[str]] = {}
        for name, prompts in self.classes.items():
            name = " ".join(str(name).split())
            if not name:
                raise PromptError("a class has an empty name; give every class a name")
            kept = [" ".join(p.split()) for p in prompts]
            if not all(kept):
                warnings.warn(f"class {name!r}: empty prompt dropped", PromptWarning, stacklevel=3)
            kept = list(dict.fromkeys(p for p in kept if p))
            if not kept:
                raise PromptError(f"class {name!r} has no prompts; write e.g. '{name}: {name}'")
            if name in cleaned:
                warnings.warn(f"class {name!r} given twice; prompts merged", PromptWarning, 3)
            cleaned.setdefault(name, [])
            cleaned[name] += [p for p in kept if p not in cleaned[name]]
        if not cleaned:
            raise PromptError("no classes given; write e.g. 'tumor: invasive carcinoma'")
        if len(cleaned) == 1:
            warnings.warn(
                f"only one class ({next(iter(cleaned))!r}): softmax over one class is always 1; "
                "use its cosine or logits, or add a contrasting class such as 'normal tissue'",
                PromptWarning,
                stacklevel=3,
            )
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise PromptError(f"templates {self.templates!r}: each needs exactly one '{{}}'")
        self.classes = cleaned
        self.templates = list(self.templates)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def texts(self) -> list[str]:
        """Every class's prompts in every template, class by class, prompt-major."""
        return [
            t.replace("{}", p) for ps in self.classes.values() for p in ps for t in self.templates
        ]

    @classmethod
    def parse(cls, text: str | Sequence[str], templates: Sequence[str] = ("{}",)) -> PromptSet:
        """Parse prompts typed in a text box, a file or on the command line.

        One class per line (a sequence of strings counts as lines). Blank lines and lines
        starting with ``#`` are skipped. A line with a name before the first ``:`` or ``=``
        defines one class whose prompts are separated by ``;`` or ``|``; a line without one
        defines one class per ``;``/``|``-separated item, named by its prompt::

            tumor: invasive carcinoma; malignant epithelium
            normal=benign tissue|normal stroma
            necrosis; lymphocytes

        gives classes tumor (2 prompts), normal (2), necrosis and lymphocytes (1 each). Class
        names cannot contain ``:`` or ``=``. A class named twice is merged (prompts
        concatenated) with a `PromptWarning`. `templates` go to the `PromptSet`.
        """
        chunks = [text] if isinstance(text, str) else list(text)
        lines = [line for chunk in chunks for line in chunk.splitlines()]
        classes: dict[str, list[str]] = {}
        for lineno, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = re.search(r"[:=]", line)
            if m:
                name = " ".join(line[: m.start()].split())
                if not name:
                    raise PromptError(f"line {lineno} {raw!r}: no class name before {m[0]!r}")
                items = {name: _SPLIT.split(line[m.end() :])}
            else:
                parts = [" ".join(p.split()) for p in _SPLIT.split(line)]
                if not all(parts):
                    warnings.warn(f"line {lineno}: empty prompt dropped", PromptWarning, 2)
                items = {p: [p] for p in parts if p}
            for name, prompts in items.items():
                if name in classes:
                    warnings.warn(f"class {name!r} given twice; prompts merged", PromptWarning, 2)
                classes.setdefault(name, []).extend(prompts)
        return cls(classes, list(templates))


def text_matrix(prompts: PromptSet, encode_text: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """(C, D) float32 class embeddings: encode all texts in one call, average, re-normalise."""
    texts = prompts.texts()
    emb = np.asarray(encode_text(texts), dtype=np.float64)
    if emb.ndim != 2 or len(emb) != len(texts) or not np.all(np.isfinite(emb)):
        raise PromptError(
            f"the text encoder returned {emb.shape} for {len(texts)} prompts; expected (P, D)"
        )
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    counts = [len(ps) * len(prompts.templates) for ps in prompts.classes.values()]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    mean = np.add.reduceat(emb, starts, axis=0) / np.asarray(counts)[:, None]
    return (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)).astype(
        np.float32
    )


@dataclass
class PatchScores:
    """Per-patch scores for C classes: cosine, logits (= logit_scale * cosine), probs."""

    classes: list[str]
    cosine: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    logit_scale: float


def score_patches(
    embeddings: np.ndarray, text: np.ndarray, logit_scale: float, classes: Sequence[str] = ()
) -> PatchScores:
    """Score N patch embeddings (N, D) against C class embeddings (C, D).

    ``probs`` is the softmax over classes of ``logit_scale * cosine`` (float32, rows sum to 1).
    `classes` names the rows of `text` (default "class0", "class1", ...).
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    txt = np.asarray(text, dtype=np.float32)
    if emb.ndim != 2 or txt.ndim != 2 or emb.shape[1] != txt.shape[1]:
        raise PromptError(
            f"embeddings {emb.shape} and text matrix {txt.shape} differ in width: encode the "
            "prompts with the model that made the store"
        )
    names = list(classes) or [f"class{i}" for i in range(len(txt))]
    if len(names) != len(txt):
        raise PromptError(f"{len(names)} class names for {len(txt)} text rows")
    cosine = emb @ txt.T
    logits = np.float32(logit_scale) * cosine
    return PatchScores(names, cosine, logits, _softmax(logits, axis=1), float(logit_scale))


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    z = x - np.max(x, axis=axis, keepdims=True) if x.size else x
    e = np.exp(z)
    return (e / np.sum(e, axis=axis, keepdims=True)).astype(np.float32)


# -- pooling ------------------------------------------------------------------------------------
@dataclass
class PoolResult:
    """Slide-level call: ``label`` is the class with the highest score."""

    label: str
    scores: dict[str, float]
    method: str
    attention: np.ndarray | None = None


def pool(
    scores: PatchScores,
    method: Literal["mean", "topk", "attention"] = "mean",
    *,
    k: int = 50,
    temperature: float = ATTENTION_TEMPERATURE,
    weights: np.ndarray | None = None,
) -> PoolResult:
    """Pool patch scores into one slide-level score per class.

    - ``mean``: ``score_c = sum_i w_i p_ic / sum_i w_i`` (w = 1 without `weights`); sums to 1.
    - ``topk`` (MI-Zero / CONCH): per class the mean of the ``min(k, N)`` largest patch logits,
      then softmax over classes; sums to 1. Patches with weight 0 are left out.
    - ``attention``: per class, attention over patches from that class's evidence,
      ``a_ic = w_i exp(s_ic / T) / sum_j w_j exp(s_jc / T)`` with ``s`` the cosine similarity
      and the temperature ``T`` in cosine units (default 0.05); the class's slide logit is the
      attention-weighted mean of its patch logits, ``L_c = sum_i a_ic l_ic``, and the scores
      are ``softmax_c(L)`` (sum to 1, comparable across classes). ``attention`` (N, C) holds
      ``a`` for display. Small T approaches max-pooling (one tile decides), large T the mean
      of logits; the default lets strong evidence count several times more than the rest
      without letting a single outlier tile decide.

    ``weights`` are optional non-negative per-patch weights (e.g. tissue fraction).

    Raises
    ------
    SearchError
        No patches (or all weights zero): nothing to pool.
    """
    n = len(scores.probs)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if len(w) != n or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise PromptError(f"weights must be {n} finite non-negative numbers")
    keep = w > 0
    if not keep.any():
        raise SearchError(
            "no tissue tiles to pool (the slide has no embedded tiles, or all weights are 0); "
            "check the tissue mask or lower min_tissue"
        )
    # patches with weight 0 take no part (their rows may be NaN: tiles not embedded)
    probs = np.where(keep[:, None], scores.probs, 0.0).astype(np.float64)
    logits = np.where(keep[:, None], scores.logits, 0.0).astype(np.float64)
    cosine = np.where(keep[:, None], scores.cosine, 0.0).astype(np.float64)
    attention = None
    if method == "mean":
        out = (w[:, None] * probs).sum(0) / w.sum()
    elif method == "topk":
        kk = max(1, min(int(k), int(keep.sum())))
        top = -np.partition(-logits[keep], kk - 1, axis=0)[:kk]
        out = _softmax(top.mean(0)[None, :], axis=1)[0].astype(np.float64)
    elif method == "attention":
        if not temperature > 0:
            raise PromptError(f"temperature must be positive, got {temperature}")
        with np.errstate(divide="ignore"):
            z = cosine / temperature + np.log(w)[:, None]
        attention = _softmax(z, axis=0)
        slide_logits = (attention.astype(np.float64) * logits).sum(0)
        out = _softmax(slide_logits[None, :], axis=1)[0].astype(np.float64)
    else:
        raise PromptError(f"unknown pooling method {method!r}; use mean, topk or attention")
    result = {c: float(v) for c, v in zip(scores.classes, out, strict=True)}
    return PoolResult(scores.classes[int(np.argmax(out))], result, method, attention)


# -- persistence --------------------------------------------------------------------------------
def save_scores(
    store: Any, name: str, scores: PatchScores, prompts: PromptSet, meta: dict | None = None
) -> None:
    """Write `scores` to ``scores/<name>`` of an `EmbeddingStore` with the prompts as meta."""
    full = {
        "classes": scores.classes,
        "prompts": prompts.classes,
        "templates": prompts.templates,
        "logit_scale": scores.logit_scale,
        "model_id": store.model_id,
        **(meta or {}),
    }
    arrays = {"cosine": scores.cosine, "logits": scores.logits, "probs": scores.probs}
    store.write_scores(name, arrays, full)


def load_scores(store: Any, name: str) -> tuple[PatchScores, dict[str, Any]]:
    """Read back what `save_scores` wrote: the scores and their meta."""
    arrays, meta = store.read_scores(name)
    scores = PatchScores(
        list(meta["classes"]),
        arrays["cosine"],
        arrays["logits"],
        arrays["probs"],
        float(meta["logit_scale"]),
    )
    return scores, meta


def score_store(
    store: Any,
    prompts: PromptSet,
    encode_text: Callable[[list[str]], np.ndarray],
    logit_scale: float,
    *,
    method: Literal["mean", "topk", "attention"] = "attention",
    k: int = 50,
    temperature: float = ATTENTION_TEMPERATURE,
) -> tuple[PatchScores, PoolResult]:
    """Score every tile of a store against a prompt set and pool to a slide label.

    Only the text tower runs (`encode_text`); the image embeddings come from the store.
    Tiles not embedded (failed to read, or not yet) are left out of the pooling, and their
    rows of the scores are NaN.
    """
    text = text_matrix(prompts, encode_text)
    scores = score_patches(store.embeddings, text, logit_scale, prompts.class_names)
    done = np.asarray(store.done, bool)
    if not done.all():
        for arr in (scores.cosine, scores.logits, scores.probs):
            arr[~done] = np.nan
    pooled = pool(scores, method, k=k, temperature=temperature, weights=done.astype(float))
    return scores, pooled
