"""The Prompt heatmap widget's results: what it asks for, what it gets, and the layers.

`heatmap_layers` builds the layers from scores alone (no model, no store reading) and
`build_result` pools the per-tile scores so far (`tilescope.live.LiveScores`) into a result:
both run for a full scoring and again for every live redraw while the slide is embedded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from ..figures import ColorScale
from ..live import LiveScores, coverage_text
from ..raster import TileGeometry, heatmap
from ..score import PatchScores, PoolResult
from ._common import UNTRAINED_TAG
from ._layers import LayerData, SlideFrame, heatmap_layer, labels_layer, result_name

ROLE = "prompt-heatmap"


@dataclass(frozen=True)
class HeatmapRequest:
    """Everything `PromptHeatmapWidget.compute` needs, read from the widget on the main thread."""

    store_path: Path | None  # None: the slide has no store yet (scored live once it has)
    frame: SlideFrame
    prompts: str
    templates: list[str]
    pooling: str = "attention"
    k: int = 50
    temperature: float = 0.05
    smooth: float = 0.0
    save_as: str | None = None


@dataclass
class HeatmapResult:
    """Layers to add and the slide-level call, ready for `PromptHeatmapWidget.apply`.
    ``pooled`` is None while no tile of the store is embedded (no layers then)."""

    request: HeatmapRequest
    classes: list[str]
    pooled: PoolResult | None
    tiles_won: dict[str, int]
    layers: list[LayerData]
    trained: bool
    model_label: str
    n_scored: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    coverage: str = ""  # "partial: n of N tiles", or "" when the store is whole
    live: LiveScores | None = None  # the per-tile scores, for live updates
    geometry: TileGeometry | None = None


def build_result(req: HeatmapRequest, live: LiveScores, geometry: TileGeometry, *,
                 trained: bool, model_label: str, complete: bool | None, seconds: float = 0.0,
                 notes: list[str] | None = None) -> HeatmapResult:  # fmt: skip
    """Pool the scores so far and turn them into layers (no model, no store; any thread)."""
    coverage = coverage_text(live.n_done, len(live.done), complete)
    base = dict(request=req, classes=live.classes, trained=trained, model_label=model_label,
                n_scored=live.n_done, seconds=seconds, notes=notes or [], coverage=coverage,
                live=live, geometry=geometry)  # fmt: skip
    if not live.n_done:
        return HeatmapResult(pooled=None, tiles_won={}, layers=[], **base)  # type: ignore[arg-type]
    method = cast(Literal["mean", "topk", "attention"], req.pooling)
    pooled = live.pool(method, k=req.k, temperature=req.temperature)
    meta = {"store": str(req.store_path)}
    layers = heatmap_layers(live.scores, pooled, geometry, live.done, req.frame, trained=trained,
                            smooth=req.smooth, meta=meta)  # fmt: skip
    winners = np.argmax(live.probs[live.done], axis=1)
    won = {name: int(np.sum(winners == c)) for c, name in enumerate(live.classes)}
    return HeatmapResult(pooled=pooled, tiles_won=won, layers=layers, **base)  # type: ignore[arg-type]


def heatmap_layers(
    scores: PatchScores,
    pooled: PoolResult,
    geometry: TileGeometry,
    done: np.ndarray,
    frame: SlideFrame,
    *,
    trained: bool,
    smooth: float = 0.0,
    meta: dict[str, Any] | None = None,
) -> list[LayerData]:
    """One probability heatmap per class (fixed 0-1 scale; the slide label's shown, with its
    colour bar), the winning class (labels), and the attention weights of the slide label's
    class (attention pooling). Tiles not in `done` are NaN (clear)."""
    tag = "" if trained else UNTRAINED_TAG
    meta = frame.meta(ROLE, **(meta or {}))
    classes = list(scores.classes)
    layers: list[LayerData] = []
    raw = []
    for c, name in enumerate(classes):
        raw.append(heatmap(scores.probs[:, c], geometry))
        hm = heatmap(scores.probs[:, c], geometry, smooth_sigma=smooth) if smooth else raw[-1]
        shown = name == pooled.label
        layers.append(
            heatmap_layer(hm, frame, result_name(f"p({name})", frame, tag),
                          ColorScale.probability(), visible=shown, colorbar=shown,
                          metadata={**meta, "class": name})
        )  # fmt: skip
    win = result_name("winning class", frame, tag)
    layers.append(labels_layer(raw, classes, frame, win, metadata=meta))
    if pooled.attention is not None:
        att = np.where(done, pooled.attention[:, classes.index(pooled.label)], np.nan)
        hm = heatmap(att, geometry)
        scale = ColorScale.stretched(hm.raster, "attention weight", "viridis")
        name = result_name(f"attention ({pooled.label})", frame, tag)
        layers.append(heatmap_layer(hm, frame, name, scale, visible=False,
                                    metadata={**meta, "class": pooled.label}))  # fmt: skip
    return layers
