"""View first: what the Embed widget embeds first, and what it shows while it runs.

- `view_box_l0`: the canvas's view of a slide layer, as a level-0 box (through the layer's own
  transform, so a moved or scaled slide works too).
- `ViewTracker`: while a run goes on, every camera move (debounced, `DEBOUNCE_S`) re-orders the
  tiles not yet handed to the readers for the new view (`TileSchedule.prioritize_view`).
- `Coverage`: a layer over the slide of the tiles embedded (green) and being embedded now
  (orange), redrawn at most once a second; it goes when the slide is whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..raster import TileGeometry, heatmap
from ._common import camera_of
from ._frame import SlideFrame, result_name
from ._layers import put_layer

if TYPE_CHECKING:
    from ..schedule import TileSchedule

#: The Embed widget's modes (its *embed* box).
WHOLE, VIEW_ONLY, REGIONS_ONLY = "whole slide, view first", "this view only", "drawn regions only"
MODES = [WHOLE, VIEW_ONLY, REGIONS_ONLY]
#: The tiles left are re-ordered this long after the camera stops moving (seconds).
DEBOUNCE_S = 0.5
ROLE = "embed-coverage"
#: Coverage colours (RGBA): embedded, being embedded now.
EMBEDDED_RGBA, IN_PROGRESS_RGBA = (0.15, 0.85, 0.35, 1.0), (1.0, 0.55, 0.0, 1.0)


def view_box_l0(viewer: Any, layer: Any) -> tuple[float, float, float, float]:
    """The part of `layer` the canvas shows, as a level-0 box ``(x0, y0, x1, y1)`` (the
    bounding box of the view's corners mapped through the layer's transform)."""
    camera = camera_of(viewer)
    cy, cx = (float(v) for v in camera.center[-2:])
    zoom = max(float(camera.zoom), 1e-12)
    h, w = (float(v) for v in viewer.canvas.size[-2:])
    hy, hx = h / 2 / zoom, w / 2 / zoom
    corners = [(cy - hy, cx - hx), (cy - hy, cx + hx), (cy + hy, cx + hx), (cy + hy, cx - hx)]
    xy = SlideFrame.of_layer(layer).world_to_l0(corners)
    (x0, y0), (x1, y1) = xy.min(axis=0), xy.max(axis=0)
    return float(x0), float(y0), float(x1), float(y1)


class ViewTracker:
    """Re-orders `schedule` for the view of `layer` whenever the camera has moved and then
    stayed still for `DEBOUNCE_S` (GUI thread; `close` stops it)."""

    def __init__(self, viewer: Any, layer: Any, schedule: TileSchedule,
                 delay: float = DEBOUNCE_S) -> None:  # fmt: skip
        from qtpy.QtCore import QTimer

        self.viewer, self.layer, self.schedule = viewer, layer, schedule
        self.moves = 0  # views applied after the first (tests, status)
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(int(delay * 1000))
        self._timer.timeout.connect(self.apply)
        self._events = [camera_of(viewer).events.center, camera_of(viewer).events.zoom]
        for ev in self._events:
            ev.connect(self._moved)

    def _moved(self, _: Any = None) -> None:
        self._timer.start()  # restarts: the view is applied once the camera rests

    def apply(self) -> None:
        """Order what is left for the view now."""
        self._timer.stop()
        try:
            box = view_box_l0(self.viewer, self.layer)
        except (RuntimeError, ValueError, np.linalg.LinAlgError):
            return  # the layer went away, or a degenerate transform: keep the order
        self.schedule.prioritize_view(box)
        self.moves += 1

    def close(self) -> None:
        self._timer.stop()
        for ev in self._events:
            try:
                ev.disconnect(self._moved)
            except (RuntimeError, ValueError, TypeError):
                pass


class Coverage:
    """The *embedding* layer of a run: tiles embedded, and being embedded now."""

    def __init__(self, viewer: Any, layer: Any, schedule: TileSchedule, tile_px: int,
                 overlap_px: int) -> None:  # fmt: skip
        self.viewer, self.layer, self.schedule = viewer, layer, schedule
        self.tile_px, self.overlap_px = tile_px, overlap_px
        self.state: np.ndarray | None = None  # per tile: 0 to do, 1 embedded
        self.geometry: TileGeometry | None = None
        self.shown: Any = None

    def add(self, indices: np.ndarray) -> None:
        """Rows just embedded."""
        if self._ready():
            assert self.state is not None
            self.state[np.asarray(indices, np.int64)] = 1

    def _ready(self) -> bool:
        if self.state is None and self.schedule.bound:
            lay = self.schedule.layout
            self.state = np.ones(len(lay), np.uint8)
            self.state[self.schedule.todo()] = 0  # what this run found still to do
            self.geometry = TileGeometry.from_layout(lay, tile_px=self.tile_px,
                                                     overlap_px=self.overlap_px)  # fmt: skip
        return self.state is not None

    def values(self, running: bool = True) -> np.ndarray | None:
        """Per tile: 1 embedded, 2 being embedded now (handed to a reader, not back yet),
        NaN otherwise."""
        if not self._ready():
            return None
        assert self.state is not None
        v = np.where(self.state == 1, 1.0, np.nan)
        if running:
            busy = self.schedule.handed_out()
            busy = busy[self.state[busy] == 0]
            v[busy] = 2.0
        return v

    def draw(self, running: bool = True) -> Any:
        """Put the layer (GUI thread); returns it (None before the run knows its tiles)."""
        values = self.values(running)
        if values is None or self.geometry is None:
            return None
        if self.shown is not None and self.shown not in self.viewer.layers:
            return None  # the user deleted it: leave it deleted
        from napari.utils.colormaps import Colormap

        hm = heatmap(values, self.geometry)
        frame = SlideFrame.of_layer(self.layer)
        cmap = Colormap([EMBEDDED_RGBA, IN_PROGRESS_RGBA], name="tilescope-coverage")
        kwargs = {
            "name": result_name("embedded", frame), "colormap": cmap,
            "contrast_limits": (1.0, 2.0), "opacity": 0.3, "blending": "translucent",
            "interpolation2d": "nearest",
            "metadata": {"tilescope": {**frame.meta(ROLE), "local": frame.local(hm),
                                       "auto_limits": [1.0, 2.0],
                                       "legend": "green: embedded; orange: being embedded"}},
            **frame.placement(hm),
        }  # fmt: skip
        self.shown = put_layer(self.viewer, (hm.raster, kwargs, "image"))
        return self.shown

    def remove(self) -> None:
        if self.shown is not None and self.shown in self.viewer.layers:
            self.viewer.layers.remove(self.shown)
        self.shown = None
