"""The *Embed slide* widget: tile, embed and store a slide in a worker thread, with a Cancel."""

from __future__ import annotations

import threading
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.types import FileDialogMode
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    PushButton,
    SpinBox,
)

from ..embed import EmbedProgress, EmbedResult, iter_embed_slide, store_path_for
from ..grid import TileGrid
from ._common import (
    BACKEND_CHOICES,
    DEFAULT_STORE_DIR,
    DEVICE_CHOICES,
    get_encoder,
    notify_error,
    notify_info,
    slide_choices,
    slide_layers,
    start_worker,
    untrained_suffix,
)

if TYPE_CHECKING:
    import napari

MODEL_TOOLTIP = (
    "The model: biomedclip (default), tiny-random (small, UNTRAINED: for trying the pipeline), "
    "an open_clip hub id (hf-hub:ORG/REPO), the path of a local snapshot folder (or "
    "local-dir:/path), or an open_clip built-in with its weights tag (ViT-B-32:laion2b_s34b_b79k)"
)


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


class EmbedWidget(Container):
    """Embed the chosen slide layer with BiomedCLIP (or another model) into a zarr store.

    An existing store for this slide and these settings is reused: only missing tiles are
    embedded. Cancel stops after the batch in flight and keeps everything written.
    Set ``synchronous = True`` to run the button inline (tests).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = viewer
        self._slide = ComboBox(label="slide", choices=slide_choices(viewer))
        # a free-text field: any model load_encoder takes (a combo box offers only a fixed list)
        self._model = LineEdit(label="model", value="biomedclip", tooltip=MODEL_TOOLTIP)
        self._mpp = FloatSpinBox(label="µm / px", value=0.5, min=0.05, max=32.0, step=0.05)
        self._tile = SpinBox(label="tile px", value=224, min=16, max=4096)
        self._overlap = SpinBox(label="overlap px", value=0, min=0, max=4095)
        self._slide_mpp = FloatSpinBox(
            label="slide µm/px", value=0.0, min=0.0, max=100.0, step=0.001,
            tooltip="Override the slide's own pixel size; 0 = use the file's value",
        )  # fmt: skip
        self._device = ComboBox(label="device", choices=DEVICE_CHOICES, value="auto")
        self._backend = ComboBox(
            label="backend", choices=BACKEND_CHOICES, value="auto",
            tooltip="What runs the image tower: torch, or OpenVINO (CPU; bf16 where the CPU has "
            "it). auto: OpenVINO on a CPU with native bf16, else torch",
        )  # fmt: skip
        self._out_dir = FileEdit(
            label="stores", mode=FileDialogMode.EXISTING_DIRECTORY, value=DEFAULT_STORE_DIR
        )
        self._overwrite = CheckBox(text="overwrite a store made with other settings")
        self._run = PushButton(text="Embed slide")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._status = Label(value="")
        self.extend(
            [self._slide, self._model, self._mpp, self._tile, self._overlap, self._slide_mpp,
             self._device, self._backend, self._out_dir, self._overwrite, self._run,
             self._cancel, self._status]
        )  # fmt: skip
        self._run.changed.connect(self._on_run)
        self._cancel.changed.connect(self._on_cancel)
        viewer.layers.events.inserted.connect(self._slide.reset_choices)
        viewer.layers.events.removed.connect(self._slide.reset_choices)
        self._cancel_event = threading.Event()
        self._worker: Any = None
        self._pbar: Any = None
        self.synchronous = False  # run the button inline (tests)
        self.last_result: EmbedResult | None = None

    # -- the work, usable synchronously in tests ---------------------------------------------
    def request(self) -> EmbedRequest:
        layer = self._slide.value
        if layer is None:
            from ..errors import TilescopeError

            raise TilescopeError("open a slide first (File > Open, or File > Open Sample)")
        slide_path = Path(layer.metadata["tilescope"]["path"])
        model = str(self._model.value).strip()
        if not model:
            from ..errors import ModelError

            raise ModelError("type a model: biomedclip, tiny-random, hf-hub:ORG/REPO or a folder")
        tile = int(self._tile.value)
        return EmbedRequest(
            slide_path=slide_path,
            store_path=store_path_for(slide_path, str(self._out_dir.value)),
            model=model,
            device=None if self._device.value == "auto" else str(self._device.value),
            grid=TileGrid(
                target_mpp=float(self._mpp.value), tile_px=tile, overlap_px=int(self._overlap.value)
            ),
            slide_mpp=float(self._slide_mpp.value) or None,
            overwrite=bool(self._overwrite.value),
            backend=str(self._backend.value),
        )

    def job(self, req: EmbedRequest) -> Generator[EmbedProgress, None, EmbedResult | None]:
        """Load the model, then embed; stops between batches when Cancel is pressed."""
        encoder = get_encoder(req.model, req.device, req.backend)
        req.store_path.parent.mkdir(parents=True, exist_ok=True)
        gen = iter_embed_slide(
            req.slide_path, req.store_path, encoder=encoder, grid=req.grid,
            slide_mpp=req.slide_mpp, overwrite=req.overwrite,
            batch_size=encoder.default_batch_size,
        )  # fmt: skip
        try:
            while not self._cancel_event.is_set():
                yield next(gen)
        except StopIteration as stop:
            return stop.value
        finally:
            gen.close()
        return None

    # -- Qt side ------------------------------------------------------------------------------
    def _on_run(self) -> None:
        try:
            req = self.request()
        except Exception as exc:  # a clear message, never a traceback dialog
            self._on_error(exc)
            return
        self._cancel_event.clear()
        self._set_running(True, f"loading {req.model} ...")
        self._worker = start_worker(
            self.job, req, yielded=self._on_progress,
            returned=lambda result: self._on_done(req, result), errored=self._on_error,
            finished=lambda: self._set_running(False), sync=self.synchronous,
        )  # fmt: skip

    def _on_cancel(self) -> None:
        self._cancel_event.set()
        self._status.value = "cancelling after the current batch ..."

    def _on_progress(self, p: EmbedProgress) -> None:
        from napari.utils import progress

        if p.stage == "tissue":
            self._status.value = f"{p.slide}: finding tissue ..."
            return
        if self._cancel.enabled is False:  # a late report after the run ended
            return
        if self._pbar is None:
            self._pbar = progress(total=max(p.total, 1), desc=f"Embedding {p.slide}")
        eta = f", ETA {p.eta:.0f} s" if p.eta is not None and p.done < p.total else ""
        self._status.value = f"{p.done}/{p.total} tiles, {p.rate:.1f} patches/s{eta}"
        pbar = self._pbar  # updating the bar processes Qt events, which may end the run
        pbar.n = p.done
        pbar.set_description(f"Embedding {p.slide} ({p.rate:.1f} patches/s{eta})")
        pbar.refresh()

    def _on_done(self, req: EmbedRequest, result: EmbedResult | None) -> None:
        self._set_running(False)
        self._close_pbar()
        if result is None:
            self._status.value = "cancelled; tiles done so far are kept, Embed again resumes"
            return
        self.last_result = result
        for layer in slide_layers(self._viewer):
            if Path(layer.metadata["tilescope"]["path"]) == req.slide_path:
                layer.metadata["tilescope"]["store"] = str(result.store_path)
        note = untrained_suffix(result.trained_model)
        msg = f"{result.n_tiles} tiles in {result.store_path.name}{note}"
        if result.failed:
            msg += f"; {len(result.failed)} tiles failed to read (recorded in the store)"
        self._status.value = msg
        notify_info(msg)

    def _on_error(self, exc: BaseException) -> None:
        self._set_running(False)
        self._close_pbar()
        self._status.value = f"error: {exc}"
        notify_error(exc)

    def _set_running(self, running: bool, message: str | None = None) -> None:
        self._run.enabled = not running
        self._cancel.enabled = running
        if message is not None:
            self._status.value = message

    def _close_pbar(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
