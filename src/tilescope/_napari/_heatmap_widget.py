"""The *Prompt heatmap* widget: type classes and prompts, see where they are on the slide.

Scoring runs only the text tower on the stored embeddings (`tilescope.score`), in a worker
thread; the result becomes one heatmap per class (probability, fixed 0-1 scale), a
winning-class labels layer, the attention weights (attention pooling) and a slide-level call.
Layers carry the slide's name and are updated in place, so re-scoring keeps the user's
opacity, colormap, visibility and contrast, and results of another slide stay as they are.

`heatmap_layers` (in `_heatmap_layers`) builds the layers from scores alone. Live: once
scored, the prompts stay in force while the slide is embedded; each new batch is scored as it
lands and the layers, label and table are redrawn at most once a second. A store that is not
whole (or not there yet) is a normal state: tiles not embedded are clear and the label says
"partial: n of N tiles".
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
    Table,
    TextEdit,
)

from ..errors import StoreError
from ..live import LiveScores, RowsOverlay
from ..raster import TileGeometry
from ..score import PromptSet, save_scores
from ._common import (
    DockContainer,
    encoder_for_store,
    open_store,
    row,
    start_worker,
    swatch,
    untrained_suffix,
)
from ._heatmap_layers import ROLE, HeatmapRequest, HeatmapResult, build_result
from ._layers import (
    SlideFrame,
    label_colors,
    put_layers,
)
from ._live import HUB, LiveFollower
from ._messages import StatusLabel, compact_combo, notify_warning, report_error, wrapping
from ._slides import layer_of_file, no_slide_error, slide_choices, watch_viewer
from ._stores import StorePicker

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
#: What the widget says when the slide has no embedded tile yet.
WAITING = ("nothing embedded yet: the heatmaps fill in as 'Embed slide' embeds its tiles "
           "(those in view first)")  # fmt: skip


class PromptHeatmapWidget(LiveFollower, DockContainer):
    """Zero-shot heatmaps of typed classes over an embedded slide, with a slide-level label.

    One class per line, ``name: prompt; another prompt``; every prompt is put in every template
    (``;``-separated, each with one ``{}``). Parts: ``_slide``, ``_store`` (store picker),
    ``_prompts``, ``_templates``, ``_pooling``, ``_k``, ``_temperature``, ``_smooth``,
    ``_live``, ``_save``, ``_save_name``, ``_run``, ``_slide_label`` (slide-level call),
    ``_table`` (class scores, with each class's colour), ``_legend`` (what the heatmap colours
    mean), ``_status``. Set ``synchronous = True`` to run button presses inline (tests).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = viewer
        watch_viewer(viewer)
        self.synchronous = False
        self._slide = ComboBox(label="slide", choices=slide_choices(viewer))
        compact_combo(self._slide)
        self._store = StorePicker()
        self._prompts = TextEdit(label="classes", value=DEFAULT_PROMPTS)
        self._prompts.tooltip = "One class per line: 'name: prompt; another prompt'"
        self._prompts.native.setMinimumHeight(72)
        self._prompts.native.setMaximumHeight(100)
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
        self._save = CheckBox(text="save as")
        self._save.tooltip = "Save the scores in the store under this name (export reads them)"
        self._save_name = LineEdit(value="prompts")
        self._run = PushButton(text="Score prompts")
        self._slide_label = wrapping(Label(value=""))
        self._table = Table(columns=("score", "tiles won"))
        self._table.read_only = True
        self._table.native.verticalHeader().setDefaultSectionSize(20)
        self._table.native.setMinimumHeight(80)
        self._table.tooltip = "Slide-level score and tiles won per class, in the class's colour"
        self._legend = wrapping(Label(value=""))
        self._status = StatusLabel()
        options = row(self._pooling, self._k, self._temperature, labels=True)
        options.label, self._pooling.label = "pooling", ""
        more = row(self._smooth, self._save, self._save_name, labels=True)
        more.label, self._smooth.label = "smooth", ""
        self._save.label = self._save_name.label = ""
        self.extend(
            [self._slide, self._store, self._prompts, self._templates, options, more,
             row(self._run, self._live), self._slide_label, self._table, self._legend,
             self._status]
        )  # fmt: skip
        self._store.on_error = self._on_error
        self._run.changed.connect(self._on_run)
        self._pooling.changed.connect(self._sync_enabled)
        self._slide.changed.connect(self._store.set_slide)
        # QTextEdit.textChanged carries no value, so magicgui's `changed` never fires for it
        self._prompts.native.textChanged.connect(self._on_prompt_edit)
        self._templates.changed.connect(self._on_prompt_edit)
        viewer.layers.events.inserted.connect(self._slide.reset_choices)
        viewer.layers.events.removed.connect(self._slide.reset_choices)
        self._busy = False
        self._pending = False
        self._timer: Any = None
        self.last_result: HeatmapResult | None = None
        self._store.set_slide(self._slide.value)
        self._sync_enabled()
        self._live_init()

    def _sync_enabled(self, _: Any = None) -> None:
        self._k.enabled = self._pooling.value == "topk"
        self._temperature.enabled = self._pooling.value == "attention"

    # -- the work, usable synchronously in tests ---------------------------------------------
    def request(self) -> HeatmapRequest:
        layer = self._slide.value
        if layer is None:
            raise no_slide_error(self._viewer)
        self._store.set_slide(layer)
        templates = [t.strip() for t in str(self._templates.value).split(";") if t.strip()]
        frame = SlideFrame.of_layer(layer)
        return HeatmapRequest(
            store_path=self._store.value or HUB.active(slide=frame.path),  # None: not yet
            frame=frame,
            prompts=str(self._prompts.value),
            templates=templates or ["{}"],
            pooling=str(self._pooling.value),
            k=int(self._k.value),
            temperature=float(self._temperature.value),
            smooth=float(self._smooth.value),
            save_as=(str(self._save_name.value).strip() or None) if self._save.value else None,
        )

    def compute(self, req: HeatmapRequest,
                extra: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> HeatmapResult:  # fmt: skip
        """Encode the prompts, score the stored patches (and the `extra` rows a running
        embedding has reported but maybe not written yet), pool, rasterise (no Qt)."""
        t0 = time.perf_counter()
        if req.store_path is None:
            raise StoreError(f"{req.frame.label}: no store to score yet")
        store = open_store(req.store_path)
        encoder = encoder_for_store(store)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prompts = PromptSet.parse(req.prompts, templates=req.templates)
            # rows of tiles not embedded are NaN and left out of the pooling
            live = LiveScores.from_store(RowsOverlay(store, extra), prompts, encoder.encode_text,
                                         encoder.logit_scale)  # fmt: skip
        notes = [str(w.message) for w in caught]
        if req.save_as:
            if store.complete:
                pooled = live.pool(cast(Literal["mean", "topk", "attention"], req.pooling),
                                   k=req.k, temperature=req.temperature)  # fmt: skip
                save_scores(store, req.save_as, live.scores, prompts, meta={
                    "pooling": req.pooling, "slide_label": pooled.label,
                    "slide_scores": pooled.scores,
                })  # fmt: skip
            else:
                notes.append("scores not saved: the store is incomplete (finish embedding)")
        return build_result(req, live, TileGeometry.from_store(store),
                            trained=bool(encoder.trained), model_label=encoder.label,
                            complete=store.complete, seconds=time.perf_counter() - t0,
                            notes=notes)  # fmt: skip

    def apply(self, result: HeatmapResult, live: bool = False) -> list[Any]:
        """Add or update the layers and show the slide-level call (main thread); `live`: a
        redraw while the slide is embedded."""
        frame = result.request.frame
        p = result.pooled
        if p is None:  # nothing embedded yet: the heatmaps come with the first tiles
            self._status.value = f"{frame.label}: {WAITING}"
            self.last_result = result
            return []
        added = put_layers(self._viewer, result.layers, ROLE, frame.path)
        note = untrained_suffix(result.trained)
        part = f" · {result.coverage}" if result.coverage else ""
        self._slide_label.value = (
            f"<b>Slide label: {p.label}</b> ({p.method} pooling){part}{note}")  # fmt: skip
        self._table.value = {
            "data": [[f"{p.scores[c]:.3f}", result.tiles_won[c]] for c in result.classes],
            "index": result.classes,
            "columns": ["score", "tiles won"],
        }
        labels = next(ly for ly in added if ly.name.startswith("winning class"))
        self._paint_classes(label_colors(labels, len(result.classes)))
        shown = next(ly for ly in added if ly.metadata["tilescope"].get("class") == p.label)
        self._legend.value = (
            f"<b>p(class)</b> heatmaps: {shown.metadata['tilescope']['legend']}. "
            "<b>winning class</b>: the colours in the table."
        )
        saved = f"; saved as scores/{result.request.save_as}" if result.request.save_as else ""
        if live and self._live_complete is None:  # the run is still going
            self._status.value = (f"{frame.label}: {result.n_scored} tiles scored so far (live, "
                                  "as they are embedded)")  # fmt: skip
        elif live:
            ended = f"embedding stopped, {result.coverage}" if result.coverage else "slide done"
            self._status.value = f"{frame.label}: {result.n_scored} tiles scored ({ended})"
        else:
            self._status.value = (
                f"{frame.label}: {result.n_scored} tiles, {len(result.classes)} classes in "
                f"{result.seconds:.2f} s with {result.model_label}{saved}"
            )
        for note in result.notes:
            notify_warning(note)
        self.last_result = result
        return added

    def _paint_classes(self, colors: list[np.ndarray]) -> None:
        """A swatch of each class's winning-class colour before its name in the table."""
        table = self._table.native
        for row_index, rgba in enumerate(colors):
            item = table.verticalHeaderItem(row_index)
            if item is not None:
                item.setIcon(swatch(rgba))

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
        self._live_req = req  # these prompts stay in force while the slide is embedded
        if req.store_path is None:  # scored as soon as the first tiles are embedded
            self._live_ready(None, None)
            self._status.value = f"{req.frame.label}: {WAITING}"
            return
        self._start(req)

    def _start(self, req: HeatmapRequest) -> None:
        extra = self._live_computing(req.store_path)
        self._busy = True  # one run at a time: presses meanwhile re-run once it finishes
        self._run.enabled = False
        self._status.value = "scoring ..."
        start_worker(
            self.compute, req, extra, returned=self._on_result, errored=self._on_failed,
            finished=self._on_finished, sync=self.synchronous,
        )  # fmt: skip

    def _on_result(self, result: HeatmapResult) -> None:
        self.apply(result)
        self._live_ready(result.live, result.request.store_path)

    def _on_failed(self, exc: BaseException) -> None:
        self._live_failed()
        self._on_error(exc)

    def _live_start(self, store: Path) -> None:
        """The first tiles of a slide scored before it had a store: score them now."""
        if not self._busy and self._live_req is not None:
            self._live_req = replace(self._live_req, store_path=store)
            self._start(self._live_req)

    def _refresh_live(self) -> None:
        """Redraw the layers, label and table from the scores so far (GUI thread)."""
        live, req, last = self._live_obj, self._live_req, self.last_result
        if live is None or req is None or last is None or last.geometry is None or self._busy:
            return
        layer = layer_of_file(self._viewer, Path(req.frame.path))
        if layer is None:
            return  # the slide was closed
        req = replace(req, frame=SlideFrame.of_layer(layer), store_path=self._live_store,
                      save_as=None)  # fmt: skip
        result = build_result(
            req,
            live,
            last.geometry,
            trained=last.trained,
            model_label=last.model_label,
            complete=self._live_complete,
        )
        self.apply(result, live=True)

    def _on_error(self, exc: BaseException) -> None:
        report_error(self._status, exc)

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
