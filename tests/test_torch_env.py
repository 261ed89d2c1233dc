"""Loading a model in a process whose napari canvas already runs OpenGL (Mesa) must not crash.

Mesa's llvmpipe loads libLLVM with global symbols; triton (imported by torch) then binds to
them and segfaults unless `tilescope._torch_env.preload_triton` ran first. This runs in a
fresh interpreter: the test process itself preloads triton in conftest.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import napari
from qtpy.QtWidgets import QApplication
viewer = napari.Viewer(show=True)
viewer.add_image(__import__("numpy").zeros((64, 64), "uint8"))
for _ in range(5):
    QApplication.processEvents()
viewer.window._qt_viewer.canvas.native.repaint()  # Mesa's LLVM is loaded by now
from tilescope.models import load_encoder
enc = load_encoder("tiny-random", device="cpu")
print("encoded", enc.encode_images(__import__("numpy").zeros((1, 224, 224, 3), "uint8")).shape)
viewer.close()
"""


@pytest.mark.napari
@pytest.mark.skipif(not os.environ.get("DISPLAY"), reason="needs an X server (run under xvfb)")
def test_model_loads_after_the_napari_canvas_drew() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "QT_QPA_PLATFORM": "xcb"})  # fmt: skip
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "encoded (1, 64)" in proc.stdout
