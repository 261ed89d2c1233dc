"""The *Export embeddings* widget: a slide's store as plain zarr or GeoJSON tiles, in a worker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.types import FileDialogMode
from magicgui.widgets import CheckBox, ComboBox, FileEdit, PushButton

from ..anonymize import slide_alias
from ..catalog import read_signature
from ..export import export_store
from ._common import DockContainer, start_worker
from ._messages import StatusLabel, compact_combo, notify_info, report_error
from ._slides import no_slide_error, slide_choices, watch_viewer
from ._stores import StorePicker

if TYPE_CHECKING:
    import napari

SUFFIX = {"zarr": ".zarr", "geojson": ".geojson"}
#: The widget's control that replaces an existing output (for error messages).
OVERWRITE = "tick 'overwrite an existing output' to replace it"


@dataclass(frozen=True)
class ExportRequest:
    store_path: Path
    out: Path
    dtype: str = "float16"
    fmt: str = "zarr"
    include_scores: bool = True
    overwrite: bool = False
    anonymize: bool = False


class ExportWidget(DockContainer):
    """Export the embeddings (and saved scores) of the chosen slide for other tools.

    Parts: ``_slide``, ``_store`` (store picker), ``_out``, ``_dtype``, ``_format``,
    ``_scores``, ``_anonymize``, ``_overwrite``, ``_run``, ``_status``. ``synchronous = True``
    runs the button inline (tests). With ``_anonymize`` ticked the export holds no slide file
    name, stem or path (`tilescope.anonymize`) and the suggested output is named by the
    slide's alias (``slide-<12 hex>``) instead of the slide.
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = viewer
        watch_viewer(viewer)
        self.synchronous = False
        self._slide = ComboBox(label="slide", choices=slide_choices(viewer))
        compact_combo(self._slide)
        self._store = StorePicker()
        self._format = ComboBox(label="format", choices=["zarr", "geojson"], value="zarr")
        self._dtype = ComboBox(label="dtype", choices=["float16", "float32"], value="float16")
        self._out = FileEdit(label="output", mode=FileDialogMode.OPTIONAL_FILE)
        self._scores = CheckBox(text="include saved scores", value=True)
        self._anonymize = CheckBox(text="anonymize (no slide name or path in the output)")
        self._anonymize.tooltip = (
            "Slide file names often hold accession numbers: the slide's name, its stem and "
            "the store's paths are written as slide-<digest>, and the output is named so."
        )
        self._overwrite = CheckBox(text="overwrite an existing output")
        self._run = PushButton(text="Export")
        self._status = StatusLabel()
        self.extend(
            [self._slide, self._store, self._format, self._dtype, self._out, self._scores,
             self._anonymize, self._overwrite, self._run, self._status]
        )  # fmt: skip
        self._suggested: Path | None = None
        self._store.on_error = self._on_error
        self._run.changed.connect(self._on_run)
        self._slide.changed.connect(self._store.set_slide)
        self._store.changed.connect(self._suggest_out)
        self._format.changed.connect(self._suggest_out)
        self._anonymize.changed.connect(self._suggest_out)
        self._format.changed.connect(self._sync_enabled)
        viewer.layers.events.inserted.connect(self._slide.reset_choices)
        viewer.layers.events.removed.connect(self._slide.reset_choices)
        self.last_output: Path | None = None
        self._store.set_slide(self._slide.value)
        self._suggest_out()

    def _sync_enabled(self, _: Any = None) -> None:
        self._dtype.enabled = self._format.value == "zarr"

    def _suggest_out(self, _: Any = None) -> None:
        """Propose ``<store folder>/exports/<slide>.<fmt>`` (``slide-<12 hex>.<fmt>`` when
        anonymised) unless the user chose a path."""
        current = Path(str(self._out.value)) if str(self._out.value) not in ("", ".") else None
        if current is not None and current != self._suggested:
            if current.suffix in SUFFIX.values():  # keep the user's path, follow the format
                self._out.value = current.with_suffix(SUFFIX[str(self._format.value)])
            return
        store = self._store.value
        if store is None:
            return
        stem = store.name.removesuffix(".zarr")  # in a subfolder: not taken for a store when
        if self._anonymize.value:
            sig = read_signature(store)
            stem = slide_alias(sig) if sig else "anonymized"
        exports = store.parent / "exports"  # the stores' folder is searched
        self._suggested = exports / f"{stem}{SUFFIX[str(self._format.value)]}"
        self._out.value = self._suggested

    # -- the work, usable synchronously in tests ---------------------------------------------
    def request(self) -> ExportRequest:
        if self._slide.value is None:
            raise no_slide_error(self._viewer)
        self._store.set_slide(self._slide.value)
        store = self._store.require()
        if self._out.value is None or str(self._out.value) in ("", "."):
            self._suggest_out()
        out = Path(str(self._out.value))
        return ExportRequest(
            store, out, str(self._dtype.value), str(self._format.value),
            bool(self._scores.value), bool(self._overwrite.value), bool(self._anonymize.value),
        )  # fmt: skip

    def compute(self, req: ExportRequest) -> Path:
        return export_store(  # creates the output's folder
            req.store_path, req.out, dtype=req.dtype, fmt=req.fmt,  # type: ignore[arg-type]
            scores=None if req.include_scores else [], overwrite=req.overwrite,
            anonymize=req.anonymize,
        )  # fmt: skip

    def apply(self, out: Path) -> None:
        self.last_output = Path(out)
        self._status.value = f"written: {out}"
        notify_info(f"embeddings exported to {out}")

    # -- Qt side ------------------------------------------------------------------------------
    def _on_run(self, _: Any = None) -> None:
        try:
            req = self.request()
        except Exception as exc:
            self._on_error(exc)
            return
        self._run.enabled = False
        self._status.value = f"exporting to {req.out} ..."
        start_worker(
            self.compute, req, returned=self.apply, errored=self._on_error,
            finished=lambda: setattr(self._run, "enabled", True), sync=self.synchronous,
        )  # fmt: skip

    def _on_error(self, exc: BaseException) -> None:
        report_error(self._status, exc, OVERWRITE)
