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


# -- glibc's thresholds for a model's activations ------------------------------------------------
FAULTS = """
import ctypes, json, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
how = sys.argv[1]
if how == "function":
    from tilescope._torch_env import reuse_large_allocations
    tuned = reuse_large_allocations()
elif how == "encoder":
    from tilescope.models import load_encoder
    load_encoder("tiny-random", device="cpu")
    from tilescope import _torch_env
    tuned = _torch_env._tuned
else:
    tuned = None
size = 48 << 20  # an activation of a CPU batch: above glibc's own ceiling (32 MiB)
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)  # touch every page, as a forward pass writes its activations
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _faults(how: str, **env: str) -> dict:
    import json

    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", FAULTS, how], capture_output=True, text=True,
                          timeout=300, env={**base, **env})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
    reason="glibc's mallopt",
)


@linux_glibc
def test_large_blocks_are_reused_not_mapped_afresh_each_time() -> None:
    pages = (48 << 20) // os.sysconf("SC_PAGE_SIZE")
    plain = _faults("none")
    # glibc alone: every 48 MiB block is a new mapping, every page of it faulted in again
    assert min(plain["faults"][1:]) > pages // 2, plain
    tuned = _faults("function")
    assert tuned["tuned"] is True
    # tuned: the first block grows the heap; the next ones reuse it, without faults
    assert max(tuned["faults"][1:]) < pages // 20, tuned
    # what a Dask worker starts with (its nanny sets the trim threshold) changes nothing
    dask_env = _faults("function", MALLOC_TRIM_THRESHOLD_="65536")
    assert max(dask_env["faults"][1:]) < pages // 20, dask_env


@linux_glibc
def test_a_cpu_encoder_tunes_the_allocator_unless_the_user_did() -> None:
    pages = (48 << 20) // os.sysconf("SC_PAGE_SIZE")
    got = _faults("encoder")
    assert got["tuned"] is True and max(got["faults"][1:]) < pages // 20, got
    # the user's own threshold (here: glibc's default) is left as it is
    mine = _faults("encoder", MALLOC_MMAP_THRESHOLD_=str(128 << 10))
    assert mine["tuned"] is False and min(mine["faults"][1:]) > pages // 2, mine
