"""The *Tissue classifier* widget: draw a few regions per class (or open QuPath annotations),
train, and see the classes over the whole slide.

Training and prediction are `tilescope.classify` on the stored embeddings (logistic regression,
cross-validated by region); this widget only turns shapes into level-0 regions and results into
layers: one probability heatmap per class, the winning class (labels, in the class colours), an
uncertainty map, and the training tiles outlined. It retrains when regions change (after a short
pause) and shows the region-wise cross-validated accuracy and each class's area in mm².

Regions come from every shapes layer made with *Add class* (one layer per class) and from
QuPath GeoJSON layers (the Tilescope reader: one layer, the class as a feature).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.types import FileDialogMode
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    Label,
    LineEdit,
    PushButton,
    Table,
)
from qtpy.QtWidgets import QStyledItemDelegate

from ..classify import Classifier, ClassifierError, predict, save_prediction, train, training_set
from ..qupath import class_color
from ._classify_layers import PREFIX, result_layers
from ._common import DockContainer, open_store, row, start_worker, swatch, untrained_suffix
from ._geojson_reader import ROLE as QUPATH_ROLE
from ._geojson_reader import align_to_slide, layer_regions
from ._layers import SlideFrame, label_colors, put_layers
from ._messages import StatusLabel, compact_combo, notify_info, report_error, wrapping
from ._slides import no_slide_error, slide_choices, watch_viewer
from ._stores import StorePicker

if TYPE_CHECKING:
    import napari

ROLE = "tissue-classifier"
CLASS_ROLE = "classifier-class"
#: Pause after the last edit of a region before retraining (ms).
RETRAIN_DELAY_MS = 600
COLUMNS = ("class", "regions", "tiles", "mm²", "recall")


@dataclass(frozen=True)
class TrainRequest:
    store_path: Path
    frame: SlideFrame
    regions: dict[str, list[Any]]
    colors: dict[str, tuple[int, int, int]]
    classifier: Classifier | None = None  # apply this one instead of training


@dataclass
class TrainResult:
    request: TrainRequest
    classifier: Classifier
    prediction: Any
    training: Any  # TrainingSet, or None for an applied classifier
    layers: list[Any]


class TissueClassifierWidget(DockContainer):
    """Few-shot tissue classes from drawn or imported regions.

    Parts: ``_slide``, ``_store`` (store picker), ``_class_name`` + ``_add_class``, ``_train``,
    ``_auto`` (retrain on
    edits), ``_table`` (class, regions, tiles, area in mm², recall), ``_accuracy``, ``_save_name`` +
    ``_save`` (scores in the store), ``_clf_file`` + ``_write`` / ``_apply`` (classifier JSON),
    ``_status``. ``synchronous = True`` runs everything inline (tests).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = viewer
        watch_viewer(viewer)
        self.synchronous = False
        self._slide = ComboBox(label="slide", choices=slide_choices(viewer))
        compact_combo(self._slide)
        self._store = StorePicker()
        self._class_name = LineEdit(label="class", value="tumor")
        self._class_name.tooltip = "Name of a tissue class; then draw its regions on its layer"
        self._add_class = PushButton(text="Add class")
        self._train = PushButton(text="Train")
        self._auto = CheckBox(text="retrain as regions change", value=True)
        self._table = Table(columns=COLUMNS)
        self._table.read_only = True
        self._table.tooltip = ("Per class: training regions and tiles, area of the tiles it wins "
                               "(mm²), recall of held-out regions")  # fmt: skip
        self._table.native.verticalHeader().setVisible(False)
        self._table.native.setItemDelegate(QStyledItemDelegate(self._table.native))  # as written
        self._table.native.setMinimumHeight(90)
        self._accuracy = wrapping(Label(value=""))
        self._save_name = LineEdit(label="save as", value="tissue")
        self._save_name.tooltip = "Score set name in the store (heatmaps and export read it)"
        self._save = PushButton(text="Save to store")
        self._clf_file = FileEdit(label="classifier", mode=FileDialogMode.OPTIONAL_FILE,
                                  filter="*.json")  # fmt: skip
        self._write = PushButton(text="Write")
        self._apply = PushButton(text="Apply")
        self._status = StatusLabel()
        name = row(self._class_name, self._add_class, labels=True)
        name.label, self._class_name.label = "class", ""
        save = row(self._save_name, self._save, labels=True)
        save.label, self._save_name.label = "save as", ""
        clf = row(self._clf_file, self._write, self._apply, labels=True)
        clf.label, self._clf_file.label = "classifier", ""
        self.extend([self._slide, self._store, name, row(self._train, self._auto),
                     self._accuracy, self._table, save, clf, self._status])  # fmt: skip
        self._store.on_error = self._on_error
        self._slide.changed.connect(self._store.set_slide)
        self._add_class.changed.connect(self._on_add_class)
        self._train.changed.connect(self._on_train)
        self._save.changed.connect(self._on_save)
        self._write.changed.connect(self._on_write)
        self._apply.changed.connect(self._on_apply)
        viewer.layers.events.inserted.connect(self._on_inserted)
        viewer.layers.events.removed.connect(self.reset_choices)
        self.last_result: TrainResult | None = None
        self._busy = False
        self._pending = False
        self._timer: Any = None
        for layer in list(viewer.layers):
            self._watch(layer)
        self._store.set_slide(self._slide.value)

    # -- class layers -------------------------------------------------------------------------
    def class_layers(self) -> list[Any]:
        """Shapes layers that give regions: one per class, and QuPath annotation layers."""
        from napari.layers import Shapes

        roles = (CLASS_ROLE, QUPATH_ROLE)
        return [ly for ly in self._viewer.layers if isinstance(ly, Shapes)
                and ly.metadata.get("tilescope", {}).get("role") in roles]  # fmt: skip

    def _on_add_class(self, _: Any = None) -> None:
        try:
            if self._slide.value is None:  # nothing to draw on: no empty layer in pixels
                raise no_slide_error(self._viewer)
            self.add_class(self._class_name.value)
        except Exception as exc:
            self._on_error(exc)

    def add_class(self, name: str) -> Any:
        """The shapes layer of class `name` (created, in the class colour, if absent), ready
        to draw polygons on."""
        name = " ".join(str(name).split())
        if not name:
            raise ClassifierError("type a class name first (e.g. tumor, stroma, necrosis)")
        for layer in self.class_layers():
            if layer.metadata["tilescope"].get("class") == name:
                break
        else:
            slide = self._slide.value
            units = SlideFrame.of_layer(slide).units if slide is not None else ("pixel", "pixel")
            known = [ly.metadata["tilescope"].get("class") for ly in self.class_layers()]
            rgb = class_color(len([k for k in known if k]))
            width = 6.0 * (float(np.mean(slide.scale[-2:])) if slide is not None else 1.0)
            layer = self._viewer.add_shapes(
                name=f"class: {name}", ndim=2, edge_color=[c / 255 for c in rgb] + [1.0],
                face_color=[c / 255 for c in rgb] + [0.15], edge_width=width, units=units,
                metadata={"tilescope": {"role": CLASS_ROLE, "class": name, "color": list(rgb)}},
            )  # fmt: skip
        self._viewer.layers.selection.active = layer
        layer.mode = "add_polygon"
        return layer

    def _on_inserted(self, event: Any = None) -> None:
        self.reset_choices()
        layer = getattr(event, "value", None)
        if layer is not None:
            self._watch(layer)

    def _watch(self, layer: Any) -> None:
        """Retrain when a region layer changes; place QuPath layers over the slide."""
        role = layer.metadata.get("tilescope", {}).get("role")
        if role == QUPATH_ROLE and self._slide.value is not None:
            align_to_slide(layer, self._slide.value)
        if role in (CLASS_ROLE, QUPATH_ROLE):
            layer.events.data.connect(self._on_regions_changed)

    def _on_regions_changed(self, event: Any = None) -> None:
        if not self._auto.value or self.last_result is None and not self._enough_classes():
            return
        if self.synchronous:
            self._on_train(quiet=True)
            return
        from qtpy.QtCore import QTimer

        if self._timer is None:
            self._timer = QTimer()
            self._timer.setSingleShot(True)
            self._timer.timeout.connect(lambda: self._on_train(quiet=True))
        self._timer.start(RETRAIN_DELAY_MS)

    def _enough_classes(self) -> bool:
        try:
            return len(self.regions()[0]) >= 2
        except Exception:
            return False

    # -- the work, usable synchronously in tests ---------------------------------------------
    def regions(self) -> tuple[dict[str, list[Any]], dict[str, tuple[int, int, int]]]:
        """Level-0 regions and colours by class from every class and QuPath layer."""
        slide = self._slide.value
        if slide is None:
            raise no_slide_error(self._viewer)
        frame = SlideFrame.of_layer(slide)
        regions: dict[str, list[Any]] = {}
        colors: dict[str, tuple[int, int, int]] = {}
        for layer in self.class_layers():
            meta = layer.metadata["tilescope"]
            align_to_slide(layer, slide)
            for cls, geoms in layer_regions(layer, frame, meta.get("class")).items():
                regions.setdefault(cls, []).extend(geoms)
                rgb = meta.get("color") or (meta.get("colors") or {}).get(cls)
                if rgb:
                    colors.setdefault(cls, (int(rgb[0]), int(rgb[1]), int(rgb[2])))
        return regions, colors

    def request(self, classifier: Classifier | None = None) -> TrainRequest:
        slide = self._slide.value
        if slide is None:
            raise no_slide_error(self._viewer)
        self._store.set_slide(slide)
        store_path = self._store.require()
        regions, colors = self.regions() if classifier is None else ({}, {})
        if classifier is None and len(regions) < 2:
            raise ClassifierError(
                "draw regions of at least two classes: type a class name, press 'Add class' "
                "and draw on its layer (or open QuPath annotations with classes)"
            )
        return TrainRequest(store_path, SlideFrame.of_layer(slide), regions, colors, classifier)

    def compute(self, req: TrainRequest) -> TrainResult:
        """Training tiles -> fit + region-wise CV -> predict every tile -> layers."""
        store = open_store(req.store_path)
        data = None
        if req.classifier is None:
            data = training_set(store, req.regions, colors=req.colors)
            clf = train(store, data)
        else:
            clf = req.classifier
        pred = predict(store, clf)
        layers = result_layers(store, pred, data, req.frame, ROLE)
        return TrainResult(req, clf, pred, data, layers)

    def apply(self, result: TrainResult) -> list[Any]:
        """Put the result layers in the viewer and fill the table and the accuracy line."""
        added = put_layers(self._viewer, result.layers, ROLE, result.request.frame.path)
        self.last_result = result
        clf, pred, data = result.classifier, result.prediction, result.training
        regions = data.regions_per_class() if data is not None else {}
        tiles = data.tiles_per_class() if data is not None else {}
        recall = clf.cv.recall if clf.cv is not None else {}
        cells = [[c, str(regions.get(c, "-")), str(tiles.get(c, "-")), f"{pred.area_mm2[c]:.3f}",
                  f"{recall[c]:.2f}" if c in recall else "-"] for c in clf.classes]  # fmt: skip
        index = [str(i + 1) for i in range(len(cells))]  # hidden; the class is a column
        self._table.value = {"data": cells, "index": index, "columns": list(COLUMNS)}
        self._fit_columns()
        classes = next((ly for ly in added if ly.name.startswith(f"{PREFIX}: class")), None)
        if classes is not None:  # each class in the colour the classes layer draws it
            for row_index, rgba in enumerate(label_colors(classes, len(clf.classes))):
                item = self._table.native.item(row_index, 0)
                if item is not None:
                    item.setIcon(swatch(rgba))
        cv = clf.cv
        acc = (f"<b>accuracy {cv.accuracy:.2f}</b> (balanced {cv.balanced_accuracy:.2f}), "
               f"cross-validated by region, {cv.n_folds} folds" if cv is not None
               else f"accuracy {clf.cv_note}")  # fmt: skip
        if data is None:
            source = Path(str(self._clf_file.value)).name or "a saved classifier"
            slide = clf.training.get("slide", "?")
            acc = f"applied {source} (trained on {slide}; {acc})"
        self._accuracy.value = acc + untrained_suffix(pred.trained_model)
        n = 0 if data is None else len(data.indices)
        left = "" if data is None or not data.n_ambiguous else (
            f"; {data.n_ambiguous} tiles inside two classes left out")  # fmt: skip
        part = f" ({pred.coverage}: areas are of the embedded part)" if pred.coverage else ""
        self._status.value = f"{pred.n_predicted} tiles classified{part}" + (
            f" from {n} training tiles{left}" if data is not None else "")  # fmt: skip
        return added

    def _fit_columns(self) -> None:
        """The class name takes the room left; the numbers their own width."""
        from qtpy.QtWidgets import QHeaderView

        header = self._table.native.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)

    # -- Qt side ------------------------------------------------------------------------------
    def _run(self, req: TrainRequest) -> None:
        self._busy = True
        self._train.enabled = False

        def finished() -> None:
            self._busy = False
            self._train.enabled = True
            if self._pending:
                self._pending = False
                self._on_train(quiet=True)

        start_worker(self.compute, req, returned=self.apply, errored=self._on_error,
                     finished=finished, sync=self.synchronous)  # fmt: skip

    def _on_train(self, _: Any = None, quiet: bool = False) -> None:
        if self._busy:
            self._pending = True
            return
        try:
            req = self.request()
        except Exception as exc:
            if quiet:  # an edit on the way to two classes is no error
                self._status.value = str(exc)
            else:
                self._on_error(exc)
            return
        self._status.value = "training ..."
        self._run(req)

    def _on_save(self, _: Any = None) -> None:
        res = self.last_result
        try:
            if res is None:
                raise ClassifierError("train first: there is nothing to save yet")
            name = str(self._save_name.value).strip()
            store = open_store(res.request.store_path)
            save_prediction(store, name, res.classifier, res.prediction)
        except Exception as exc:
            self._on_error(exc)
            return
        self._status.value = f"saved as scores/{name} in {Path(store.path).name}"
        notify_info(f"saved the classes as scores/{name} in {store.path}")

    def _classifier_file(self, missing: str) -> Path:
        """The file in the classifier box; `ClassifierError(missing)` if none is chosen (an
        empty box reads as the folder ".")."""
        path = Path(str(self._clf_file.value))
        if not str(self._clf_file.value) or path.is_dir():
            raise ClassifierError(missing)
        return path

    def _on_write(self, _: Any = None) -> None:
        res = self.last_result
        try:
            if res is None:
                raise ClassifierError("train first: there is no classifier to write yet")
            path = self._classifier_file("choose a file for the classifier (e.g. tissue.json)")
            res.classifier.save(path.with_suffix(".json"))
        except Exception as exc:
            self._on_error(exc)
            return
        self._status.value = f"wrote {path.with_suffix('.json')}"

    def _on_apply(self, _: Any = None) -> None:
        try:
            path = self._classifier_file(
                "choose a classifier file first (Select file: a .json that Write saved, "
                "here or on another slide), or Train one here"
            )
            clf = Classifier.load(path)
            req = self.request(classifier=clf)
        except Exception as exc:
            self._on_error(exc)
            return
        self._status.value = "applying ..."
        self._run(req)

    def _on_error(self, exc: BaseException) -> None:
        report_error(self._status, exc)
