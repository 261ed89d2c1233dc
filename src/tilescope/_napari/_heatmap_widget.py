"""The *Prompt heatmap* widget: type classes and prompts, see where they are on the slide.

Scoring runs only the text tower on the stored embeddings (`tilescope.score`), in a worker
thread; the result becomes one heatmap per class, a winning-class labels layer, the attention
weights (attention pooling) and a slide-level call. Layers of the same name are updated in
place, so re-scoring with new prompts never piles up layers.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
    Table,
    TextEdit,
)

from ..score import (
    PoolResult,
    PromptSet,
    TileGeometry,
    heatmap,
    save_scores,
    score_store,
)
from ._common import (
    UNTRAINED_TAG,
    encoder_for_store,
    notify_error,
    notify_warning,
    open_store,
    require_store,
    row,
    slide_choices,
    start_worker,
    untrained_suffix,
)
from ._layers import LayerData, SlideFrame, heatmap_layer, labels_layer, put_layers

if TYPE_CHECKING:
    import napari

DEFAULT_PROMPTS = (
    "tumor: invasive carcinoma; malignant epithelium\n"
    "stroma: fibrous stroma\n"
    "lymphocytes: dense lymphocytic infiltrate\n"
    "background: adipose tissue; blank glass"
)
DEFAULT_TEMPLATES = "an H&E image of {}"
POOLING_CHOICES = ["attention", "topk", "mean"]
ROLE = "prompt-heatmap"


@dataclass(frozen=True)
class HeatmapRequest:
    """Everything `PromptHeatmapWidget.compute` needs, read from the widget on the main thread."""

    store_path: Path
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
    """Layers to add and the slide-level call, ready for `PromptHeatmapWidget.apply`."""

    request: HeatmapRequest
    classes: list[str]
    pooled: PoolResult
    tiles_won: dict[str, int]
    layers: list[LayerData]
    trained: bool
    model_label: str
    n_scored: int
    seconds: float
    notes: list[str] = field(default_factory=list)


class PromptHeatmapWidget(Container):
    """Zero-shot heatmaps of typed classes over an embedded slide, with a slide-level label.

    One class per line, ``name: prompt; another prompt``; every prompt is put in every template
    (``;``-separated, each with one ``{}``). Parts: ``_slide``, ``_prompts``, ``_templates``,
    ``_pooling``, ``_k``, ``_temperature``, ``_smooth``, ``_live``, ``_save``, ``_save_name``,
    ``_run``, ``_slide_label`` (slide-level call), ``_table`` (class scores), ``_status``.
    Set ``synchronous = True`` to run button presses inline (tests).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = viewer
        self.synchronous = False
        self._slide = ComboBox(label="slide", choices=slide_choices(viewer))
        self._prompts = TextEdit(label="classes", value=DEFAULT_PROMPTS)
        self._prompts.tooltip = "One class per line: 'name: prompt; another prompt'"
        self._prompts.native.setMinimumHeight(84)
        self._prompts.native.setMaximumHeight(110)
        self._templates = LineEdit(label="templates", value=DEFAULT_TEMPLATES)
        self._templates.tooltip = "Prompt templates separated by ';', each with one {}"
        self._pooling = ComboBox(label="pooling", choices=POOLING_CHOICES, value="attention")
        self._pooling.tooltip = (
            "attention: attention-weighted mean (temperature T); topk: mean of the k best "
            "patch logits per class (MI-Zero); mean: mean patch probability"
        )
        self._k = SpinBox(label="k", value=50, min=1, max=100_000)
        self._temperature = FloatSpinBox(label="T", value=0.05, min=0.005, max=10.0, step=0.005)
        self._temperature.tooltip = (
            "Attention temperature in cosine-similarity units: lower focuses the slide call on "
            "fewer, more typical tiles"
        )
        self._smooth = FloatSpinBox(
            label="smooth", value=0.0, min=0.0, max=10.0, step=0.5,
            tooltip="Gaussian smoothing of the heatmaps, in tile strides (0 = none)",
        )  # fmt: skip
        self._live = CheckBox(text="re-score as I type")
        self._save = CheckBox(text="save in the store as")
        self._save_name = LineEdit(value="prompts")
        self._run = PushButton(text="Score prompts")
        self._slide_label = Label(value="")
        self._table = Table(columns=("score", "tiles won"))
        self._table.read_only = True
        self._table.native.verticalHeader().setDefaultSectionSize(20)
        self._table.native.setMinimumHeight(104)
        self._status = Label(value="")
        options = row(self._pooling, self._k, self._temperature, labels=True)
        options.label, self._pooling.label = "pooling", ""
        more = row(self._smooth, self._save, self._save_name, labels=True)
        more.label, self._smooth.label = "smooth", ""
        self._save.label = self._save_name.label = ""
        self.extend(
            [self._slide, self._prompts, self._templates, options, more,
             row(self._run, self._live), self._slide_label, self._table, self._status]
        )  # fmt: skip
        self._run.changed.connect(self._on_run)
        self._pooling.changed.connect(self._sync_enabled)
        # QTextEdit.textChanged carries no value, so magicgui's `changed` never fires for it
        self._prompts.native.textChanged.connect(self._on_prompt_edit)
        self._templates.changed.connect(self._on_prompt_edit)
        viewer.layers.events.inserted.connect(self._slide.reset_choices)
        viewer.layers.events.removed.connect(self._slide.reset_choices)
        self._busy = False
        self._pending = False
        self._timer: Any = None
        self.last_result: HeatmapResult | None = None
        self._sync_enabled()

    def _sync_enabled(self, _: Any = None) -> None:
        self._k.enabled = self._pooling.value == "topk"
        self._temperature.enabled = self._pooling.value == "attention"

    # -- the work, usable synchronously in tests ---------------------------------------------
    def request(self) -> HeatmapRequest:
        layer = self._slide.value
        templates = [t.strip() for t in str(self._templates.value).split(";") if t.strip()]
        return HeatmapRequest(
            store_path=require_store(layer),
            frame=SlideFrame.of_layer(layer),
            prompts=str(self._prompts.value),
            templates=templates or ["{}"],
            pooling=str(self._pooling.value),
            k=int(self._k.value),
            temperature=float(self._temperature.value),
            smooth=float(self._smooth.value),
            save_as=(str(self._save_name.value).strip() or None) if self._save.value else None,
        )

    def compute(self, req: HeatmapRequest) -> HeatmapResult:
        """Encode the prompts, score the stored patches, pool, rasterise (no Qt; any thread)."""
        t0 = time.perf_counter()
        store = open_store(req.store_path)
        encoder = encoder_for_store(store)
        method = cast(Literal["mean", "topk", "attention"], req.pooling)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prompts = PromptSet.parse(req.prompts, templates=req.templates)
            # rows of tiles not embedded are NaN and left out of the pooling
            scores, pooled = score_store(
                store, prompts, encoder.encode_text, encoder.logit_scale,
                method=method, k=req.k, temperature=req.temperature,
            )  # fmt: skip
        notes = [str(w.message) for w in caught]
        done = store.done
        geometry = TileGeometry.from_store(store)
        tag = "" if encoder.trained else UNTRAINED_TAG
        meta = {"role": ROLE, "store": str(store.path)}
        classes = prompts.class_names
        layers: list[LayerData] = []
        raw = []
        for c, name in enumerate(classes):
            values = scores.probs[:, c]
            raw.append(heatmap(values, geometry))
            hm = heatmap(values, geometry, smooth_sigma=req.smooth) if req.smooth else raw[-1]
            layers.append(
                heatmap_layer(
                    hm, req.frame, f"p({name}){tag}", contrast_limits=(0.0, 1.0),
                    visible=name == pooled.label, metadata={**meta, "class": name},
                )
            )  # fmt: skip
        layers.append(labels_layer(raw, classes, req.frame, f"winning class{tag}", metadata=meta))
        if pooled.attention is not None:
            att = np.where(done, pooled.attention[:, classes.index(pooled.label)], np.nan)
            layers.append(
                heatmap_layer(
                    heatmap(att, geometry), req.frame, f"attention ({pooled.label}){tag}",
                    colormap="viridis", visible=False, metadata={**meta, "class": pooled.label},
                )
            )  # fmt: skip
        winners = np.argmax(scores.probs[done], axis=1)
        won = {name: int(np.sum(winners == c)) for c, name in enumerate(classes)}
        if req.save_as:
            if store.complete:
                save_scores(store, req.save_as, scores, prompts, meta={
                    "pooling": req.pooling, "slide_label": pooled.label,
                    "slide_scores": pooled.scores,
                })  # fmt: skip
            else:
                notes.append("scores not saved: the store is incomplete (finish embedding)")
        return HeatmapResult(
            req, classes, pooled, won, layers, bool(encoder.trained), encoder.label,
            int(done.sum()), time.perf_counter() - t0, notes,
        )  # fmt: skip

    def apply(self, result: HeatmapResult) -> list[Any]:
        """Add or update the layers and show the slide-level call (main thread)."""
        added = put_layers(self._viewer, result.layers, ROLE)
        p = result.pooled
        tag = untrained_suffix(result.trained)
        self._slide_label.value = f"<b>Slide label: {p.label}</b> ({p.method} pooling){tag}"
        self._table.value = {
            "data": [[f"{p.scores[c]:.3f}", result.tiles_won[c]] for c in result.classes],
            "index": result.classes,
            "columns": ["score", "tiles won"],
        }
        saved = f"; saved as scores/{result.request.save_as}" if result.request.save_as else ""
        self._status.value = (
            f"{result.n_scored} tiles, {len(result.classes)} classes in "
            f"{result.seconds:.2f} s with {result.model_label}{saved}"
        )
        for note in result.notes:
            notify_warning(note)
        self.last_result = result
        return added

    # -- Qt side ------------------------------------------------------------------------------
    def _on_run(self, _: Any = None) -> None:
        if self._busy:
            self._pending = True
            return
        try:
            req = self.request()
        except Exception as exc:
            self._on_error(exc)
            return
        self._busy = True  # one run at a time: presses meanwhile re-run once it finishes
        self._run.enabled = False
        self._status.value = "scoring ..."
        start_worker(
            self.compute, req, returned=self.apply, errored=self._on_error,
            finished=self._on_finished, sync=self.synchronous,
        )  # fmt: skip

    def _on_error(self, exc: BaseException) -> None:
        self._status.value = f"error: {exc}"
        notify_error(exc)

    def _on_finished(self) -> None:
        self._busy = False
        self._run.enabled = True
        if self._pending:
            self._pending = False
            self._on_run()

    def _on_prompt_edit(self, _: Any = None) -> None:
        """With 're-score as I type', score 0.6 s after the last keystroke."""
        if not self._live.value:
            return
        if self._timer is None:
            from qtpy.QtCore import QTimer

            self._timer = QTimer()
            self._timer.setSingleShot(True)
            self._timer.setInterval(600)
            self._timer.timeout.connect(self._on_run)
        self._timer.start()
