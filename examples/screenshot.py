"""Regenerate the README's screenshot: the demo in napari, captured instead of shown.

xvfb-run -a -s "-screen 0 1600x1000x24" python examples/screenshot.py examples/images/napari.png
"""

from __future__ import annotations

import sys

import napari


def capture(*_: object, **__: object) -> None:
    from qtpy.QtWidgets import QApplication

    viewer = napari.current_viewer()
    viewer.window._qt_window.resize(1500, 950)
    for _ in range(20):
        QApplication.processEvents()
    viewer.reset_view()
    QApplication.processEvents()
    viewer.screenshot(sys.argv[1], canvas_only=False, flash=False)
    viewer.close()


napari.run = capture  # the demo calls napari.run() once everything is shown

from tilescope.cli import main  # noqa: E402

sys.exit(main(["demo", "--out", "tilescope-demo", *sys.argv[2:]]))
