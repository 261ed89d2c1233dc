"""The *Region search* widget: draw "like this" (and "not like this") regions, see every place
on the slide, or on other embedded slides, that looks like them.

The query is built by `tilescope.search` from the stored embeddings of the tiles whose centre
lies inside the drawn shapes; the widget only turns shapes into level-0 polygons and results
into layers (a similarity heatmap and numbered rectangles of the top matches, named after their
slide and updated in place). *Next* / *Previous* (keys ``.`` and ``,``) step through the
matches. *Search other slides* searches a folder of stores through its cohort index, as
``tilescope search --against`` does (`_search_other`); a double-click on a match of another
slide opens that slide and goes there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.types import FileDialogMode
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
    Label,
    PushButton,
    SpinBox,
    Table,
)

from ..errors import SearchError
from ..search import NEG_WEIGHT, Match
from ._common import DockContainer, camera_of, row, start_worker
from ._layers import SlideFrame, put_layers, shapes_to_world_polygons
from ._live import HUB, LiveFollower
from ._messages import StatusLabel, compact_combo, report_error, wrapping
from ._search_layers import ROLE, SearchRequest, SearchResult, search_result, search_store
from ._search_other import FOLDER_ROLE, OtherSlides, fit_columns
from ._search_query import class_choices, has_classes, query_regions
from ._slides import (
    layer_of_file,
    no_slide_error,
    slide_choices,
    slide_layers,
    watch_viewer,
)
from ._stores import StorePicker

if TYPE_CHECKING:
    import napari

QUERY_LAYER = "Tilescope query"
NEGATIVE_LAYER = "Tilescope not like this"
#: What the widget says while the tiles under the query are not embedded yet.
WAITING = ("waiting for the tiles under the query to be embedded ('Embed slide': those in view "
           "come first)")  # fmt: skip
#: Keys that step through the matches (free in napari's default key bindings).
NEXT_KEY, PREVIOUS_KEY = ".", ","


class RegionSearchWidget(LiveFollower, OtherSlides, DockContainer):
    """Find tiles that look like drawn regions, on this slide and across a folder of stores.

    Parts: ``_slide``, ``_store`` (store picker), ``_positive`` / ``_negative`` (shapes
    layers), ``_positive_class`` / ``_negative_class`` (the QuPath class of a layer opened
    from GeoJSON; None: every class), ``_draw`` / ``_draw_negative``, ``_neg_weight``,
    ``_k``, ``_exclude``, ``_search``, ``_prev``, ``_next``, ``_zoom``, ``_match`` (current
    match), ``_legend``, ``_folder``, ``_per_slide`` (0: no cap), ``_search_folder``,
    ``_cancel_folder``, ``_results`` (matches on other slides), ``_status``.
    ``synchronous = True`` runs button presses inline (tests).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self._viewer = viewer
        watch_viewer(viewer)
        self.synchronous = False
        self._slide = ComboBox(label="slide", choices=slide_choices(viewer))
        self._store = StorePicker()
        self._positive = ComboBox(label="like this", choices=self._shape_choices)
        self._negative = ComboBox(label="not like this", choices=self._negative_choices)
        self._positive_class = ComboBox(label="class", choices=self._positive_classes)
        self._negative_class = ComboBox(label="class", choices=self._negative_classes)
        for combo in (self._positive_class, self._negative_class):
            combo.tooltip = ("QuPath annotations: only regions of this class (holes are left "
                             "out)")  # fmt: skip
        for combo in (self._slide, self._positive, self._negative, self._positive_class,
                      self._negative_class):  # fmt: skip
            compact_combo(combo, 10)
        self._draw = PushButton(text="Draw 'like this'")
        self._draw_negative = PushButton(text="Draw 'not like this'")
        self._neg_weight = FloatSpinBox(label="weight", value=NEG_WEIGHT, min=0.0, max=5.0,
                                        step=0.05)  # fmt: skip
        self._neg_weight.tooltip = (
            f"How strongly 'not like this' pushes the query away ({NEG_WEIGHT}: Rocchio's usual "
            "weight; 1 lets near-duplicate tissue cancel the query)"
        )
        self._k = SpinBox(label="matches", value=10, min=1, max=1000)
        self._exclude = CheckBox(text="leave query tiles out", value=True)
        self._exclude.tooltip = "Do not list the tiles of the query region among the matches"
        self._search = PushButton(text="Search this slide")
        self._prev = PushButton(text=f"< Previous ({PREVIOUS_KEY})")
        self._next = PushButton(text=f"Next ({NEXT_KEY}) >")
        self._prev.tooltip = f"The previous match (key {PREVIOUS_KEY!r} over the canvas)"
        self._next.tooltip = f"The next match (key {NEXT_KEY!r} over the canvas)"
        self._zoom = CheckBox(text="zoom to each match", value=True)
        self._match = wrapping(Label(value=""))
        self._legend = wrapping(Label(value=""))
        self._folder = FileEdit(label="other slides", mode=FileDialogMode.EXISTING_DIRECTORY)
        self._folder.tooltip = (
            "A folder of .zarr embedding stores made with the same model (sub-folders too), "
            "searched through its index (FOLDER/tilescope-index, built or updated when needed)"
        )
        self._per_slide = SpinBox(label="per slide", value=0, min=0, max=1000)
        self._per_slide.tooltip = (
            "At most this many matches from any one slide, so one slide cannot take every "
            "result (0: no cap)"
        )
        self._search_folder = PushButton(text="Search other slides")
        self._cancel_folder = PushButton(text="Cancel", enabled=False)
        self._cancel_folder.tooltip = (
            "Stop building the folder's index; the stores written so far stay in it and the "
            "next search goes on from there"
        )
        self._results = Table(columns=("slide", "x", "y", "similarity"))
        self._results.read_only = True
        self._results.tooltip = "Double-click a match to go there (its slide opens if needed)"
        self._results.native.verticalHeader().setDefaultSectionSize(20)
        self._results.native.setMinimumHeight(64)
        fit_columns(self._results)
        self._status = StatusLabel()
        positive = row(self._positive, self._positive_class, labels=True)
        positive.label, self._positive.label, self._positive_class.label = "like this", "", ""
        negative = row(self._negative, self._negative_class, self._neg_weight, labels=True)
        negative.label, self._negative.label, self._negative_class.label = "unlike this", "", ""
        k = row(self._k, self._zoom, labels=True)
        k.label, self._k.label, self._zoom.label = "matches", "", ""
        other = row(self._per_slide, self._search_folder, self._cancel_folder, labels=True)
        other.label, self._per_slide.label = "per slide", ""
        self._search_folder.label = self._cancel_folder.label = ""
        self.extend(
            [self._slide, self._store, row(self._draw, self._draw_negative), positive,
             negative, k, row(self._search, self._exclude), row(self._prev, self._next),
             self._match, self._legend, self._folder, other, self._results, self._status]
        )  # fmt: skip
        self._store.on_error = self._on_error
        self._draw.changed.connect(lambda: self._on_draw(QUERY_LAYER))
        self._draw_negative.changed.connect(lambda: self._on_draw(NEGATIVE_LAYER))
        self._search.changed.connect(self._on_search)
        self._search_folder.changed.connect(self._on_search_folder)
        self._cancel_folder.changed.connect(self._on_cancel_folder)
        self._prev.changed.connect(lambda: self.step(-1))
        self._next.changed.connect(lambda: self.step(+1))
        self._slide.changed.connect(self._store.set_slide)
        self._positive.changed.connect(lambda: self._show_classes(self._positive_class))
        self._negative.changed.connect(lambda: self._show_classes(self._negative_class))
        self._results.native.cellDoubleClicked.connect(self._on_result_clicked)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self.reset_choices)
        viewer.bind_key(NEXT_KEY, lambda _v: self._key_step(+1), overwrite=True)
        viewer.bind_key(PREVIOUS_KEY, lambda _v: self._key_step(-1), overwrite=True)
        self.last_result: SearchResult | None = None
        self.other_matches: list[Match] = []
        self.current = -1
        self._store.set_slide(self._slide.value)
        if slide_layers(viewer):
            self.query_layer()
        self._step_enabled()
        self._searching = False
        self._live_init()
        for combo in (self._positive_class, self._negative_class):
            self._show_classes(combo)

    def _shape_choices(self, _: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Shapes

        return [
            (ly.name, ly)
            for ly in self._viewer.layers
            if isinstance(ly, Shapes)
            and ly.metadata.get("tilescope", {}).get("role") not in (ROLE, FOLDER_ROLE)
        ]

    def _negative_choices(self, _: Any = None) -> list[tuple[str, Any]]:
        return [("(none)", None), *self._shape_choices()]

    def _positive_classes(self, _: Any = None) -> list[tuple[str, str | None]]:
        return class_choices(self._positive.value)

    def _negative_classes(self, _: Any = None) -> list[tuple[str, str | None]]:
        return class_choices(self._negative.value)

    def _show_classes(self, combo: Any) -> None:
        """The class combo follows its layer, shown only for a layer with QuPath classes."""
        combo.reset_choices()
        layer = (self._positive if combo is self._positive_class else self._negative).value
        combo.visible = layer is not None and has_classes(layer)

    # -- query layers -------------------------------------------------------------------------
    def query_layer(self, name: str = QUERY_LAYER) -> Any:
        """The shapes layer called `name`, created (in world µm, over the slide) if absent."""
        if name in self._viewer.layers:
            return self._viewer.layers[name]
        slide = self._slide.value
        units = SlideFrame.of_layer(slide).units if slide is not None else ("pixel", "pixel")
        width = 8.0 * (float(np.mean(slide.scale[-2:])) if slide is not None else 1.0) * 2
        negative = name == NEGATIVE_LAYER
        color = "tomato" if negative else "yellow"
        layer = self._viewer.add_shapes(
            name=name, ndim=2, edge_color=color, face_color=[0, 0, 0, 0], edge_width=width,
            units=units, metadata={"tilescope": {"role": "query"}},
        )  # fmt: skip
        self.reset_choices()
        (self._negative if negative else self._positive).value = layer
        return layer

    def _on_draw(self, name: str) -> None:
        if self._slide.value is None:  # nothing to draw on: no empty layer in pixels either
            report_error(self._status, no_slide_error(self._viewer))
            return
        self.draw_layer(name)

    def draw_layer(self, name: str) -> None:
        """Select the query layer `name` and switch to drawing rectangles."""
        layer = self.query_layer(name)
        self._viewer.layers.selection.active = layer
        layer.mode = "add_rectangle"

    # -- the work, usable synchronously in tests ---------------------------------------------
    def request(self) -> SearchRequest:
        layer = self._slide.value
        if layer is None:
            raise no_slide_error(self._viewer)
        self._store.set_slide(layer)
        frame = SlideFrame.of_layer(layer)
        store_path = self._store.value or HUB.active(slide=frame.path)  # None: not yet
        pos_layer = self._positive.value or self.query_layer()
        neg_layer = self._negative.value
        pos_cls, neg_cls = self._positive_class.value, self._negative_class.value
        same = neg_layer is pos_layer
        # one QuPath layer for both: "not like this" is its class, the query the others
        skip = (neg_cls,) if same and neg_cls is not None and pos_cls is None else ()
        positive = query_regions(pos_layer, layer, pos_cls, skip)
        if not positive:
            raise SearchError(
                f"draw a region (rectangle, polygon or ellipse) on the {pos_layer.name!r} "
                "layer first: press 'Draw like this' and drag over the tissue you want"
            )
        self._check_on_slide(layer, shapes_to_world_polygons(pos_layer))
        negative = []
        if neg_layer is not None and not (same and (neg_cls is None or neg_cls == pos_cls)):
            negative = query_regions(neg_layer, layer, neg_cls)
        return SearchRequest(
            store_path, frame, positive, negative, float(self._neg_weight.value),
            int(self._k.value), bool(self._exclude.value),
        )  # fmt: skip

    def _check_on_slide(self, layer: Any, worlds: list[np.ndarray]) -> None:
        """A query drawn over another slide than the chosen one: say which slide to choose."""
        if _touches(layer, worlds):
            return
        for other in slide_layers(self._viewer):
            if other.name != layer.name and _touches(other, worlds):
                raise SearchError(f"the query region lies on {other.name}, not on {layer.name}: "
                                  "choose that slide in 'slide'")  # fmt: skip

    def compute(self, req: SearchRequest,
                extra: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> SearchResult:  # fmt: skip
        """Tiles under the shapes -> query -> similarity of every tile -> top matches."""
        return search_store(req, extra)

    def apply(self, result: SearchResult, live: bool = False) -> list[Any]:
        """Add or update the similarity and matches layers; go to the best match (a `live`
        redraw while the slide is embedded keeps the camera and the current match)."""
        added = put_layers(self._viewer, result.layers, ROLE, result.request.frame.path)
        self.last_result = result
        n = len(result.match_idx)
        part = f"; {result.coverage}" if result.coverage else ""
        self._status.value = (f"{result.request.frame.label}: query of {len(result.query_idx)} "
                              f"tiles, {n} matches{part}")  # fmt: skip
        self._legend.value = f"<b>similarity</b>: {result.legend}"
        if live:
            self.current = min(self.current, n - 1)
            if self.current >= 0:
                self._highlight(self.current)
            self._step_enabled()
            return added
        self.current = -1
        self._step_enabled()
        if n:
            self.show_match(0)
        else:
            self._match.value = "no other embedded tiles to match"
        return added

    def show_match(self, i: int) -> None:
        """Centre the camera on match `i` (0 = best), highlight it and describe it."""
        res = self.last_result
        if res is None or not len(res.match_idx):
            return
        self.current = i = int(np.clip(i, 0, len(res.match_idx) - 1))
        camera_of(self._viewer).center = tuple(float(v) for v in res.centres[i])
        if self._zoom.value:
            self._zoom_to_tile()
        self._highlight(i)
        self._step_enabled()

    def _highlight(self, i: int) -> None:
        """Match `i` in magenta on the matches layer, described under the buttons."""
        res = self.last_result
        if res is None or not 0 <= i < len(res.match_idx):
            return
        name = res.layers[1][1]["name"]
        if name in self._viewer.layers:
            layer = self._viewer.layers[name]
            colors = np.tile([0.0, 1.0, 1.0, 1.0], (len(layer.data), 1))
            colors[i] = [1.0, 0.0, 1.0, 1.0]  # magenta: the query layer is yellow
            layer.edge_color = colors
        f = res.layers[1][1]["features"]
        self._match.value = f"match {i + 1}/{len(res.match_idx)}: {f['similarity'][i]:.3f}"
        self._match.tooltip = (
            f"similarity {f['similarity'][i]:.4f}, tile at level-0 x={f['x'][i]}, y={f['y'][i]} px"
        )

    def step(self, delta: int) -> None:
        self.show_match(self.current + delta)

    def _key_step(self, delta: int) -> None:
        try:
            self.step(delta)
        except RuntimeError:  # the widget was closed: its keys do nothing
            pass

    def _zoom_to_tile(self, tile_world: float | None = None) -> None:
        """Zoom so a tile spans about a sixth of the canvas (never zooming out of a closer view)."""
        res = self.last_result
        tile = tile_world or (res.tile_world if res is not None else None)
        canvas = getattr(getattr(self._viewer, "canvas", None), "size", None)
        if not tile or not canvas or min(canvas) <= 0:
            return
        zoom = min(canvas) / (6 * tile)
        camera_of(self._viewer).zoom = max(camera_of(self._viewer).zoom, zoom)

    def _step_enabled(self) -> None:
        n = 0 if self.last_result is None else len(self.last_result.match_idx)
        self._prev.enabled = self.current > 0
        self._next.enabled = self.current < n - 1

    # -- Qt side ------------------------------------------------------------------------------
    def _on_search(self, _: Any = None) -> None:
        try:
            req = self.request()
        except Exception as exc:
            self._on_error(exc)
            return
        self._live_req = req  # the query stays in force while the slide is embedded
        self._live_ready(None, None)
        if req.store_path is None:  # searched once the tiles under it are embedded
            self._status.value = f"{req.frame.label}: {WAITING}"
            return
        self._start(req)

    def _start(self, req: SearchRequest) -> None:
        extra = self._live_computing(req.store_path)
        self._searching = True
        self._status.value = "searching ..."
        self._search.enabled = False
        start_worker(
            self.compute, req, extra, returned=self._on_result, errored=self._on_failed,
            finished=self._on_finished, sync=self.synchronous,
        )  # fmt: skip

    def _on_result(self, result: SearchResult) -> None:
        self.apply(result)
        self._live_ready(result.live, result.request.store_path)

    def _on_failed(self, exc: BaseException) -> None:
        req = self._live_req
        if req is not None and isinstance(exc, SearchError) and HUB.active(store=req.store_path):
            # the tiles under the query are not embedded yet: try again with the next ones
            self._backlog = None
            self._status.value = f"{req.frame.label}: {WAITING}"
            return
        self._live_failed()
        self._on_error(exc)

    def _on_finished(self) -> None:
        self._searching = False
        self._search.enabled = True

    def _live_start(self, store: Any) -> None:
        """Rows of a running embedding and no similarity map yet: search now."""
        if not self._searching and self._live_req is not None:
            self._live_req = replace(self._live_req, store_path=store)
            self._start(self._live_req)

    def _refresh_live(self) -> None:
        """Redraw the similarity map and the matches from the similarities so far."""
        live, req, last = self._live_obj, self._live_req, self.last_result
        if live is None or req is None or last is None or last.facts is None or self._searching:
            return
        layer = layer_of_file(self._viewer, Path(req.frame.path))
        if layer is None:
            return
        req = replace(req, frame=SlideFrame.of_layer(layer), store_path=self._live_store)
        self.apply(search_result(req, live, last.facts, last.query_idx, self._live_complete),
                   live=True)  # fmt: skip

    def _on_error(self, exc: BaseException) -> None:
        report_error(self._status, exc)


def _touches(layer: Any, worlds: list[np.ndarray]) -> bool:
    """True if a vertex of one of the world polygons lies on the slide `layer`."""
    info = layer.metadata["tilescope"]["info"]
    frame = SlideFrame.of_layer(layer)
    for world in worlds:
        x, y = frame.world_to_l0(world).T
        if np.any((x >= 0) & (x <= info["width"]) & (y >= 0) & (y <= info["height"])):
            return True
    return False
