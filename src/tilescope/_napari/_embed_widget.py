"""The *Embed slide* widget: tile, embed and store a slide in a worker thread, with a Cancel.

View first (`_viewfirst`): the tiles on screen are embedded first, nearest the view's centre
first, then outward, and the order follows the camera while the run goes on; or only this view,
or only drawn regions. Each batch is published to the live results hub (`_live.HUB`), so the
Prompt heatmap and Region search widgets fill in as the tiles land.
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.types import FileDialogMode
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    PushButton,
    SpinBox,
)

from ..catalog import default_store_dir, store_path_for
from ..embed import EmbedProgress, EmbedResult, iter_embed_slide
from ..errors import MissingMppError, ModelError
from ..grid import TileGrid
from ..schedule import TileSchedule
from ._common import (
    BACKEND_CHOICES,
    DEVICE_CHOICES,
    DockContainer,
    RunProgress,
    get_encoder,
    row,
    start_worker,
    untrained_suffix,
)
from ._embed_modes import EmbedModes, duration
from ._live import HUB, RunEvent, Throttle
from ._messages import StatusLabel, compact_combo, notify_info, report_error
from ._slides import no_slide_error, set_slide_mpp, slide_choices, slide_layers, watch_viewer
from ._stores import remember_folder, stores_changed
from ._viewfirst import (
    MODES,
    WHOLE,
    Coverage,
    ViewTracker,
)

if TYPE_CHECKING:
    import napari

MODEL_TOOLTIP = (
    "The model: biomedclip (default), tiny-random (small, UNTRAINED: for trying the pipeline), "
    "an open_clip hub id (hf-hub:ORG/REPO), the path of a local snapshot folder (or "
    "local-dir:/path), or an open_clip built-in with its weights tag (ViT-B-32:laion2b_s34b_b79k)"
)
#: The widget's control that replaces a store made with other settings (for error messages).
OVERWRITE = "tick 'overwrite a store made with other settings' to replace it"
#: What Cancel waits for, by the stage the run is in.
CANCEL_WAITS = {
    "model": "cancelling: the run stops as soon as the model has loaded ...",
    "tissue": "cancelling: the run stops as soon as tissue detection ends ...",
    "embedding": "cancelling after the current batch ...",
}


@dataclass(frozen=True)
class EmbedRequest:
    slide_path: Path
    store_path: Path
    model: str
    device: str | None
    grid: TileGrid
    slide_mpp: float | None
    overwrite: bool
    backend: str = "auto"
    mode: str = WHOLE
    view: tuple[float, float, float, float] | None = None  # level-0 box: embedded first
    regions: tuple[Any, ...] | None = None  # shapely polygons (level 0): only these


@dataclass
class EmbedRun:
    """One press of *Embed slide*: its cancel flag, stage, progress bar, tile order (follows
    the camera) and coverage layer. Reports of a run that has finished (or of an earlier run)
    are ignored."""

    request: EmbedRequest
    cancel: threading.Event = field(default_factory=threading.Event)
    stage: str = "model"
    finished: bool = False
    bar: RunProgress = field(default_factory=lambda: RunProgress("Embedding"))
    schedule: TileSchedule = field(default_factory=TileSchedule)
    tracker: ViewTracker | None = None
    coverage: Coverage | None = None
    redraw: Throttle | None = None
    started: bool = False  # the store exists and the hub knows the run
    start_done: int = -1  # tiles done when the embedding began


class EmbedWidget(EmbedModes, DockContainer):
    """Embed the chosen slide layer with BiomedCLIP (or another model) into a zarr store.

    An existing store for this slide and these settings is reused: only missing tiles are
    embedded. Cancel stops after the batch in flight (or as soon as the model load or the
    tissue detection returns) and keeps everything written.
    Set ``synchronous = True`` to run the button inline (tests).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = viewer
        watch_viewer(viewer)
        self._slide = ComboBox(label="slide", choices=slide_choices(viewer))
        compact_combo(self._slide)
        # a free-text field: any model load_encoder takes (a combo box offers only a fixed list)
        self._model = LineEdit(label="model", value="biomedclip", tooltip=MODEL_TOOLTIP)
        self._mpp = FloatSpinBox(label="µm / px", value=0.5, min=0.05, max=32.0, step=0.05)
        self._mpp.tooltip = "Resolution of the tiles (0.5 µm/px is about 20x)"
        self._tile = SpinBox(label="tile px", value=224, min=16, max=4096)
        self._overlap = SpinBox(label="overlap px", value=0, min=0, max=4095)
        self._slide_mpp = FloatSpinBox(
            label="slide µm/px", value=0.0, min=0.0, max=100.0, step=0.001,
            tooltip="The slide's own pixel size, for slides that do not record it (0 = the "
            "file's value); the slide is then shown in µm beside the others",
        )  # fmt: skip
        self._device = ComboBox(label="device", choices=DEVICE_CHOICES, value="auto")
        self._backend = ComboBox(
            label="backend", choices=BACKEND_CHOICES, value="auto",
            tooltip="What runs the image tower: torch, or OpenVINO (CPU; bf16 where the CPU has "
            "it). auto: OpenVINO on a CPU with native bf16, else torch",
        )  # fmt: skip
        self._out_dir = FileEdit(
            label="stores", mode=FileDialogMode.EXISTING_DIRECTORY, value=default_store_dir()
        )
        self._out_dir.tooltip = "Folder of the embedding stores (the other widgets look there)"
        self._overwrite = CheckBox(text="overwrite a store made with other settings")
        self._mode = ComboBox(label="embed", choices=MODES, value=WHOLE)
        self._mode.tooltip = (
            "whole slide, view first: the tiles on screen first (nearest the centre first), "
            "then outward; the order follows the view as you pan. this view only: the tiles on "
            "screen now. drawn regions only: the tiles under the shapes of the regions layer"
        )
        self._regions = ComboBox(label="regions", choices=self._shape_choices)
        compact_combo(self._regions, 10)
        self._regions.tooltip = "A shapes layer over the slide: only the tiles under its shapes"
        self._draw_regions = PushButton(text="Draw regions")
        regions = row(self._regions, self._draw_regions, labels=True)
        regions.label, self._regions.label, self._draw_regions.label = "regions", "", ""
        self._regions_row = regions
        self._run = PushButton(text="Embed slide")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._status = StatusLabel()
        self.extend(
            [self._slide, self._model, self._mpp, self._tile, self._overlap, self._slide_mpp,
             self._device, self._backend, self._out_dir, self._overwrite, self._mode,
             regions, row(self._run, self._cancel), self._status]
        )  # fmt: skip
        self._mode.changed.connect(self._sync_mode)
        self._draw_regions.changed.connect(self._on_draw_regions)
        self._run.changed.connect(self._on_run)
        self._cancel.changed.connect(self._on_cancel)
        self._slide.changed.connect(self._on_slide)
        self._slide_mpp.changed.connect(self._on_slide_mpp)
        self._out_dir.changed.connect(lambda v: remember_folder(v) if str(v) else None)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._slide.reset_choices)
            event.connect(self._regions.reset_choices)
        self._worker: Any = None
        self._active: EmbedRun | None = None
        self.synchronous = False  # run the button inline (tests)
        self.last_result: EmbedResult | None = None
        self._on_slide()
        self._sync_mode()

    # -- the slide's pixel size ----------------------------------------------------------------
    def _on_slide(self, _: Any = None) -> None:
        """Show the pixel size the user gave this slide (if it records none)."""
        layer = self._slide.value
        if layer is None:
            return
        meta = layer.metadata["tilescope"]
        given = meta.get("mpp") if meta.get("info", {}).get("mpp_source") != "slide" else None
        self._slide_mpp.value = float(given or 0.0)

    def _on_slide_mpp(self, value: float) -> None:
        layer = self._slide.value
        if layer is not None and value > 0:
            set_slide_mpp(self._viewer, layer, float(value))

    # -- the work, usable synchronously in tests ---------------------------------------------
    def request(self) -> EmbedRequest:
        """What to embed, checked before anything is loaded (a typo fails at once)."""
        layer = self._slide.value
        if layer is None:
            raise no_slide_error(self._viewer)
        meta = layer.metadata["tilescope"]
        slide_path = Path(meta["path"])
        model = str(self._model.value).strip()
        if not model:
            raise ModelError("type a model: biomedclip, tiny-random, hf-hub:ORG/REPO or a folder")
        slide_mpp = float(self._slide_mpp.value) or None
        has_own = meta.get("info", {}).get("mpp_source") == "slide"
        if slide_mpp is None and not has_own:
            raise MissingMppError(slide_path, "the slide does not record its pixel size")
        tile = int(self._tile.value)
        grid = TileGrid(
            target_mpp=float(self._mpp.value), tile_px=tile, overlap_px=int(self._overlap.value)
        )
        out_dir = Path(str(self._out_dir.value)).expanduser()
        return EmbedRequest(
            slide_path=slide_path,
            store_path=store_path_for(slide_path, out_dir),
            model=model,
            device=None if self._device.value == "auto" else str(self._device.value),
            grid=grid,
            slide_mpp=slide_mpp,
            overwrite=bool(self._overwrite.value),
            backend=str(self._backend.value),
            **self._where(layer),
        )

    def job(self, run: EmbedRun) -> Generator[Any, None, EmbedResult | None]:
        """Load the model, then embed; Cancel stops between batches, or as soon as the model
        load or the tissue detection returns."""
        req = run.request
        encoder = get_encoder(req.model, req.device, req.backend)
        if run.cancel.is_set():
            return None
        req.store_path.parent.mkdir(parents=True, exist_ok=True)
        gen = iter_embed_slide(
            req.slide_path, req.store_path, encoder=encoder, grid=req.grid,
            slide_mpp=req.slide_mpp, overwrite=req.overwrite,
            batch_size=encoder.default_batch_size, order=run.schedule,
            should_stop=run.cancel.is_set,  # the batches in flight are still reported
        )  # fmt: skip
        try:
            while True:
                yield next(gen)  # tissue detection runs inside the second next()
        except StopIteration as stop:
            return None if run.cancel.is_set() else stop.value
        finally:
            gen.close()

    # -- Qt side ------------------------------------------------------------------------------
    def _on_draw_regions(self, _: Any = None) -> None:
        if self._slide.value is None:  # nothing to draw on: no empty layer in pixels
            report_error(self._status, no_slide_error(self._viewer))
            return
        self.draw_regions()

    def _on_run(self, _: Any = None) -> None:
        try:
            req = self.request()
        except Exception as exc:  # a clear message, never a traceback dialog
            report_error(self._status, exc, OVERWRITE)
            return
        remember_folder(req.store_path.parent)
        run = self._active = EmbedRun(req)
        run.bar = RunProgress(f"Embedding {req.slide_path.name}")
        self._view_first(run)
        self._set_running(True)
        self._status.value = f"loading the model {req.model} ..."
        self._worker = start_worker(
            self.job, run, yielded=lambda p: self._on_progress(run, p),
            returned=lambda result: self._on_done(run, result),
            errored=lambda exc: self._on_error(run, exc),
            finished=lambda: self._on_finished(run), sync=self.synchronous,
        )  # fmt: skip

    def _on_cancel(self, _: Any = None) -> None:
        run = self._active
        if run is None or run.finished:
            return
        run.cancel.set()
        self._cancel.enabled = False
        self._status.value = CANCEL_WAITS.get(run.stage, CANCEL_WAITS["embedding"])

    def _on_progress(self, run: EmbedRun, p: EmbedProgress) -> None:
        if run.finished or run is not self._active:
            return  # a late report: the final status stays
        run.stage = "tissue" if p.stage == "tissue" else "embedding"
        if p.stage == "embedding":
            self._publish(run, p)  # also after Cancel: the batches in flight still land
        if run.cancel.is_set():
            return  # "cancelling ..." stays until the run stops
        if p.stage == "tissue":
            self._status.value = f"{p.slide}: finding tissue ..."
            return
        goal = self._goal(run, p)
        rate = f", {p.rate:.1f} tiles/s" if p.rate > 0 else ""
        left = goal - p.done
        eta = f", ETA {duration(left / p.rate)}" if p.rate > 0 and left > 0 else ""
        where = "" if run.request.mode == WHOLE or p.total == goal else (
            f" ({run.request.mode}: {goal - run.start_done} to embed)")  # fmt: skip
        self._status.value = f"{p.done}/{p.total} tiles{where}{rate}{eta}"
        run.bar.update(p.done, goal)  # may process Qt events: the run may end in there

    def _finish(self, run: EmbedRun, complete: bool = False) -> bool:
        """Mark `run` finished; False if it already was (or is not the current run)."""
        if run.finished:
            return False
        run.finished = True
        run.bar.close()
        if run.tracker is not None:
            run.tracker.close()
        if run.redraw is not None:
            run.redraw.cancel()
        if run.coverage is not None:
            if complete:  # the whole slide is embedded: nothing left to show
                run.coverage.remove()
            else:
                run.coverage.draw(running=False)
        if run.started:
            req = run.request
            HUB.publish(RunEvent("ended", str(req.slide_path), req.store_path,
                                 complete=complete))  # fmt: skip
        if run is self._active:
            self._set_running(False)
        return run is self._active

    def _on_done(self, run: EmbedRun, result: EmbedResult | None) -> None:
        if not self._finish(run, complete=result is not None and result.complete):
            return
        if result is None:
            self._status.value = "cancelled; tiles done so far are kept, Embed again resumes"
            return
        self.last_result = result
        for layer in slide_layers(self._viewer):
            if Path(layer.metadata["tilescope"]["path"]) == run.request.slide_path:
                layer.metadata["tilescope"]["store"] = str(result.store_path)
        stores_changed()
        note = untrained_suffix(result.trained_model)
        state = "complete" if result.complete else "partial"
        msg = f"{result.n_tiles} tiles in {result.store_path.name} ({state}){note}"
        if result.failed:
            msg += f"; {len(result.failed)} tiles failed to read (recorded in the store)"
        self._status.value = msg
        notify_info(msg)

    def _on_error(self, run: EmbedRun, exc: BaseException) -> None:
        if not self._finish(run):
            return
        report_error(self._status, exc, OVERWRITE)

    def _on_finished(self, run: EmbedRun) -> None:
        self._finish(run)  # a run that ended without result or error (worker quit)

    def _set_running(self, running: bool) -> None:
        self._run.enabled = not running
        self._cancel.enabled = running
