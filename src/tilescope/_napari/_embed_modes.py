"""The Embed widget's view-first half: its modes (whole slide view first, this view only,
drawn regions only), the run's tile order that follows the camera, its coverage layer, and the
batches it publishes to the live results hub (`_live.HUB`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..embed import EmbedProgress
from ..errors import TilescopeError
from ._layers import shapes_to_world_polygons
from ._live import HUB, RunEvent, Throttle
from ._slides import slide_layers
from ._stores import stores_changed
from ._viewfirst import REGIONS_ONLY, VIEW_ONLY, Coverage, SlideFrame, ViewTracker, view_box_l0

if TYPE_CHECKING:
    from ._embed_widget import EmbedRun

#: The shapes layer of the regions to embed ("drawn regions only").
REGIONS_LAYER = "Tilescope embed regions"


class EmbedModes:
    """Mixin of `EmbedWidget` (parts: ``_mode``, ``_regions``, ``_regions_row``, ``_slide``)."""

    _viewer: Any
    _mode: Any
    _regions: Any
    _regions_row: Any
    _slide: Any

    def _shape_choices(self, _: Any = None) -> list[tuple[str, Any]]:
        from napari.layers import Shapes

        return [(ly.name, ly) for ly in self._viewer.layers if isinstance(ly, Shapes)
                and "slide" not in ly.metadata.get("tilescope", {})]  # fmt: skip

    def _sync_mode(self, _: Any = None) -> None:
        self._regions_row.enabled = self._mode.value == REGIONS_ONLY

    def draw_regions(self, _: Any = None) -> Any:
        """Select (or make) the regions layer, in rectangle mode, and switch to regions only."""
        if REGIONS_LAYER in self._viewer.layers:
            layer = self._viewer.layers[REGIONS_LAYER]
        else:
            slide = self._slide.value
            units = SlideFrame.of_layer(slide).units if slide is not None else ("pixel",) * 2
            width = 16.0 * (float(np.mean(slide.scale[-2:])) if slide is not None else 1.0)
            layer = self._viewer.add_shapes(
                name=REGIONS_LAYER, ndim=2, edge_color="lime", face_color=[0, 0, 0, 0],
                edge_width=width, units=units, metadata={"tilescope": {"role": "embed-regions"}},
            )  # fmt: skip
            self._regions.reset_choices()
        self._regions.value = layer
        self._mode.value = REGIONS_ONLY
        self._viewer.layers.selection.active = layer
        layer.mode = "add_rectangle"
        return layer

    def _where(self, layer: Any) -> dict[str, Any]:
        """The view (level 0) to embed first, and the regions of the mode (GUI thread)."""
        import shapely

        mode = str(self._mode.value)
        try:
            view: tuple[float, float, float, float] | None = view_box_l0(self._viewer, layer)
        except (AttributeError, ValueError, np.linalg.LinAlgError):
            view = None
        regions: tuple[Any, ...] | None = None
        if mode == VIEW_ONLY:
            if view is None:
                raise TilescopeError("the view could not be read: choose 'whole slide'")
            regions = (shapely.box(*view),)
        elif mode == REGIONS_ONLY:
            shapes = self._regions.value
            frame = SlideFrame.of_layer(layer)
            polys = [frame.world_to_l0(p) for p in shapes_to_world_polygons(shapes)] if (
                shapes is not None) else []  # fmt: skip
            polys = [p for p in polys if len(p) >= 3]
            if not polys:
                raise TilescopeError(
                    "draw the regions to embed first: press 'Draw regions' and drag rectangles "
                    "over the tissue (or choose a shapes layer in 'regions')"
                )
            regions = tuple(shapely.Polygon(p).buffer(0) for p in polys)
        return {"mode": mode, "view": view, "regions": regions}

    def _view_first(self, run: EmbedRun) -> None:
        """Order the run's tiles for the view now and follow the camera; draw its coverage."""
        req, layer = run.request, self._slide.value
        if req.view is not None:
            run.schedule.prioritize_view(req.view)
        if req.regions is not None:
            run.schedule.restrict_to_regions(list(req.regions))
        if layer is None or req.view is None:
            return
        run.tracker = ViewTracker(self._viewer, layer, run.schedule)
        run.coverage = Coverage(self._viewer, layer, run.schedule, req.grid.tile_px,
                                req.grid.overlap_px)  # fmt: skip
        run.redraw = Throttle(run.coverage.draw)

    def _goal(self, run: EmbedRun, p: EmbedProgress) -> int:
        """Tiles done when this run ends: the slide's, or those of the view / regions."""
        if run.request.regions is None or not run.schedule.bound:
            return p.total
        return min(p.total, run.start_done + run.schedule.n_allowed)

    def _publish(self, run: EmbedRun, p: EmbedProgress) -> None:
        """Tell the live results of this slide: the store exists, then each batch."""
        req = run.request
        if not run.started:
            run.started, run.start_done = True, p.done
            for layer in slide_layers(self._viewer):
                if Path(layer.metadata["tilescope"]["path"]) == req.slide_path:
                    layer.metadata["tilescope"]["store"] = str(req.store_path)
            stores_changed()  # the pickers list the new (partial) store
            HUB.publish(RunEvent("started", str(req.slide_path), req.store_path, done=p.done,
                                 total=p.total))  # fmt: skip
        if p.indices is None or not len(p.indices):
            return
        HUB.publish(RunEvent("rows", str(req.slide_path), req.store_path, p.indices,
                             p.embeddings, p.done, p.total))  # fmt: skip
        if run.coverage is not None and run.redraw is not None:
            run.coverage.add(p.indices)
            run.redraw.poke()


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 20 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
