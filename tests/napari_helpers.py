"""Widgets as napari builds them: from the Plugins menu path (`add_plugin_dock_widget`, which
hands them a proxy of the viewer), in a shown 1600 x 1000 window."""

from __future__ import annotations

from typing import Any

import numpy as np

PLUGIN = "tilescope"
WIDGETS = ("Embed slide", "Prompt heatmap", "Region search", "Export embeddings",
           "Tissue classifier")  # fmt: skip
#: The canvas must keep at least this much room (px) whatever the widgets show.
MIN_CANVAS = (500, 500)


def shown_viewer(make_napari_viewer: Any) -> Any:
    """A shown viewer whose window is 1600 x 1000, as a user on a laptop screen sees it."""
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1600, 1000)
    settle()
    return viewer


def dock(viewer: Any, name: str, *, synchronous: bool = True) -> Any:
    """The widget `name` as the Plugins menu makes it (napari gives it the viewer proxy)."""
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    widget.synchronous = synchronous
    settle()
    return widget


def settle(ms: int = 50) -> None:
    """Let Qt lay out and paint (queued resizes, deferred tabs)."""
    from qtpy.QtCore import QCoreApplication, QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()
    QCoreApplication.processEvents()


def window_and_canvas(viewer: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """((width, height) of the window, (width, height) of the canvas) after layout."""
    settle()
    _, _, w, h = viewer.window.geometry()
    ch, cw = viewer.canvas.size
    return (int(w), int(h)), (int(cw), int(ch))


def assert_fits(viewer: Any) -> None:
    """The window never grows past 1600 x 1000 and the canvas keeps its room."""
    (w, h), (cw, ch) = window_and_canvas(viewer)
    assert (w, h) == (1600, 1000), f"the window grew to {w} x {h}"
    assert cw >= MIN_CANVAS[0] and ch >= MIN_CANVAS[1], f"the canvas shrank to {cw} x {ch}"


def world_of_l0(layer: Any, x: float, y: float) -> np.ndarray:
    """World (row, col) of level-0 corner coordinates (x, y) on a slide layer, through the
    layer's own data-to-world transform (level-0 corner u is data index u - 0.5)."""
    return np.asarray(layer.data_to_world([y - 0.5, x - 0.5]), dtype=float)[-2:]


def cell_value(layer: Any, world: np.ndarray) -> float:
    """The value of a raster layer at a world point (nearest cell)."""
    r, c = np.round(np.asarray(layer.world_to_data(world), dtype=float)[-2:]).astype(int)
    return float(layer.data[r, c])


def notifications() -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records]


def watch_bars(prefix: str) -> tuple[list[tuple[int, int]], object]:
    """(values, disconnect): every (value, total) an activity-panel bar named `prefix...` shows."""
    from napari.utils import progress

    values: list[tuple[int, int]] = []

    def watch(bar):
        def on_value(event):
            values.append((event.value, bar.total))

        return on_value

    def on_change(event):
        for bar in event.added:
            if str(bar.desc).startswith(prefix):
                bar.events.value.connect(watch(bar))

    progress._all_instances.events.changed.connect(on_change)
    return values, lambda: progress._all_instances.events.changed.disconnect(on_change)


def no_bar_left(prefix: str) -> bool:
    from napari.utils import progress

    return not [b for b in progress._all_instances if str(b.desc).startswith(prefix)]
