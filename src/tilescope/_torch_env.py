"""The process around torch: importing it safely where OpenGL runs (napari under Mesa), and
glibc's allocator fitted to a model's large activations on the CPU.

Triton's library carries its own LLVM. In a process where Mesa's OpenGL already runs (napari's
canvas under llvmpipe, as with Xvfb and many VMs, or radeonsi on AMD GPUs) Mesa has loaded
libLLVM with global symbols, triton's resolve to Mesa's and the import segfaults (torch
imports triton via torchvision -> torch._dynamo). `preload_triton` imports triton first with
``RTLD_DEEPBIND`` so libtriton uses its own symbols. Every path that loads a model goes
through `tilescope.models.pick_device`, which calls it before torch is imported.

`reuse_large_allocations` (called when an encoder is built for the CPU) keeps glibc from
handing every activation back to the kernel between batches; see there. `available_cpus` and
`cpu_threads` say how many cores the model may use.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys
import threading

__all__ = ["available_cpus", "cpu_threads", "preload_triton", "reuse_large_allocations"]

#: glibc's ``mallopt`` parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Allocations below this come from the heap and are reused, not mapped afresh: above the
#: largest activation of a ViT-B/16 batch of 64 tiles (the MLP's 64 x 197 x 3072 float32,
#: 155 MB).
MMAP_THRESHOLD = 256 << 20
#: Free memory at the top of the heap kept for the next batch rather than given back.
TRIM_THRESHOLD = 512 << 20
_tuned: bool | None = None
_tune_lock = threading.Lock()


def available_cpus() -> int:
    """CPUs this process may run on (a Slurm or container allocation, not the whole host)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def cpu_threads() -> int | None:
    """Threads an image tower on the CPU should use when torch was told to use fewer than
    every available CPU (``torch.set_num_threads``, ``OMP_NUM_THREADS``, a cohort worker's
    share of its host), else None: the runtime's own choice, every core.

    OpenVINO ignores torch's setting and ``OMP_NUM_THREADS`` (it runs on TBB): without this,
    two cohort workers on one host would each run on every core. (With SMT, torch's default is
    one thread per physical core, which is OpenVINO's default too: the cap changes nothing.)"""
    import torch

    threads = torch.get_num_threads()
    return threads if threads < available_cpus() else None


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


def reuse_large_allocations() -> bool:
    """Let glibc reuse freed large blocks (up to `MMAP_THRESHOLD`) instead of mapping them.

    glibc serves a block over its mmap threshold (128 KiB, adapting up to 32 MiB) with a
    fresh ``mmap`` and unmaps it on ``free``. A forward pass of the ViT-B/16 tower on 16
    tiles allocates activations of 10-40 MB each, so every batch faulted in some 250,000
    zeroed pages and gave them back (measured here: 4-6 s of system time per 8 s batch on a
    busy machine, and none with this setting; per batch 10-20 % of wall time). Worse on a
    Dask worker, whose nanny sets ``MALLOC_TRIM_THRESHOLD_``, which turns the adaptation
    off. Raising the thresholds keeps those blocks in the heap from one batch to the next,
    as jemalloc or tcmalloc would (what Intel's CPU tuning guides preload); peak memory
    stays about the same, and up to `TRIM_THRESHOLD` of free heap is kept.

    Process-wide, once; glibc on Linux only. Left alone when the user set
    ``MALLOC_MMAP_THRESHOLD_`` (their choice) or preloads another allocator. Returns whether
    the setting is in force.
    """
    global _tuned
    with _tune_lock:
        if _tuned is None:
            _tuned = _set_thresholds()
        return _tuned


def _set_thresholds() -> bool:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False  # the user's own setting, or jemalloc / tcmalloc / mimalloc
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - no C library symbols to reach
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # setting either turns glibc's adaptive thresholds off, so both are set
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and ok)
