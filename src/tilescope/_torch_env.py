"""Importing torch safely in a process that already runs OpenGL (napari under Mesa).

Triton's library carries its own LLVM. In a process where Mesa's OpenGL already runs (napari's
canvas under llvmpipe, as with Xvfb and many VMs, or radeonsi on AMD GPUs) Mesa has loaded
libLLVM with global symbols, triton's resolve to Mesa's and the import segfaults (torch
imports triton via torchvision -> torch._dynamo). `preload_triton` imports triton first with
``RTLD_DEEPBIND`` so libtriton uses its own symbols. Every path that loads a model goes
through `tilescope.models.pick_device`, which calls it before torch is imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys

__all__ = ["preload_triton"]


def preload_triton() -> None:
    """Import triton (when installed) with ``RTLD_DEEPBIND`` before torch pulls it in.

    Linux only; elsewhere, or once triton is imported, nothing happens.
    """
    if "triton" in sys.modules or not hasattr(os, "RTLD_DEEPBIND"):
        return
    if importlib.util.find_spec("triton") is None:
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.modules["triton"] = None  # type: ignore[assignment]  # torch then runs without it
    finally:
        sys.setdlopenflags(flags)
