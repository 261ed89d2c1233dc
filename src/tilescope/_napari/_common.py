"""Shared pieces of the widgets: finding slide layers and their stores, a model cache, workers,
messages."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import napari

    from ..models import Encoder
    from ..store import EmbeddingStore

_ENCODERS: dict[tuple[str, str, str], Encoder] = {}
_ENCODER_LOCK = threading.Lock()

DEVICE_CHOICES = ["auto", "cpu", "cuda", "mps"]
BACKEND_CHOICES = ["auto", "torch", "openvino"]
DEFAULT_STORE_DIR = Path.home() / "tilescope" / "stores"
#: Appended to the names of layers computed with an untrained model (short, fits a layer list).
UNTRAINED_TAG = " [UNTRAINED]"


def _device_key(device: Any) -> str:
    """One name per physical device: "cuda" and "cuda:0" (when 0 is current) are the same."""
    import torch

    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def get_encoder(name: str, device: str | None = None, backend: str | None = None) -> Encoder:
    """Load a model once per (name, resolved device, resolved backend) and keep it; safe to
    call from worker threads.

    ``device`` "auto"/None and ``backend`` "auto" are resolved first (`resolve_backend`), so
    "auto" and the device it picks share one model. ``backend=None`` means any image backend:
    a model already loaded for this name and device is reused (the text tower, all that
    scoring needs, is torch in every backend), else "auto". A loaded model is also kept under
    its canonical ``model_id`` ("biomedclip" as "hf-hub:microsoft/..."), so a store's model id
    finds the model already loaded.
    """
    from ..models import load_encoder, resolve_backend

    dev, chosen = resolve_backend(backend, None if device == "auto" else device)
    dkey = _device_key(dev)
    with _ENCODER_LOCK:
        if backend is None:
            for (n, d, _), enc in _ENCODERS.items():
                if n == name and d == dkey:
                    return enc
        key = (name, dkey, chosen)
        if key not in _ENCODERS:
            _preload_triton()
            enc = load_encoder(name, device=str(dev), backend=chosen)
            _ENCODERS[key] = _ENCODERS.setdefault((enc.model_id, dkey, chosen), enc)
        return _ENCODERS[key]


def register_encoder(encoder: Encoder) -> Encoder:
    """Keep an already loaded model so the widgets use it for stores it made."""
    key = (encoder.model_id, _device_key(encoder.device), encoder.backend)
    with _ENCODER_LOCK:
        return _ENCODERS.setdefault(key, encoder)


def _preload_triton() -> None:
    """Import triton (when installed) with ``RTLD_DEEPBIND`` before torch pulls it in.

    Triton's library carries its own LLVM. In a process where Mesa's OpenGL already runs (napari's
    canvas under llvmpipe, as with Xvfb and many VMs, or radeonsi on AMD GPUs) Mesa has loaded
    libLLVM with global symbols, triton's resolve to Mesa's and the import segfaults (torch
    imports triton via torchvision -> torch._dynamo). Deep binding makes libtriton use its
    own symbols. Linux only; elsewhere, or once triton is imported, nothing happens.
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


def encoder_for_store(store: EmbeddingStore, device: str | None = None) -> Encoder:
    """The model that made `store` (same weights), for encoding prompts against it."""
    from ..errors import ModelError

    prov = store.signature["model"]
    enc = get_encoder(str(prov["model_id"]), device)
    if prov.get("weights_digest") and enc.weights_digest != prov["weights_digest"]:
        raise ModelError(
            f"{store.path}: made with {prov['model_id']} weights {prov['weights_digest'][:12]}, "
            f"but the model found now has weights {enc.weights_digest[:12]}; supply the original "
            "weights or embed the slide again"
        )
    return enc


_STORES: dict[Path, tuple[int | None, EmbeddingStore]] = {}
#: Stores kept open with their embeddings in memory (BiomedCLIP: 2 KB per tile).
MAX_OPEN_STORES = 4
_STORE_LOCK = threading.Lock()


def open_store(path: str | Path) -> EmbeddingStore:
    """Open a store read-only, reusing the last opened copy (and its embeddings in memory)
    while it is complete and unchanged; safe to call from worker threads."""
    from ..store import EmbeddingStore

    key = Path(path).resolve()
    meta = key / "zarr.json"
    stamp = meta.stat().st_mtime_ns if meta.exists() else None
    with _STORE_LOCK:
        old_stamp, old = _STORES.get(key, (None, None))
        if old is not None and old.complete and stamp is not None and old_stamp == stamp:
            return old
    fresh = EmbeddingStore.open(key)
    with _STORE_LOCK:
        _STORES.pop(key, None)
        _STORES[key] = (stamp, fresh)
        while len(_STORES) > MAX_OPEN_STORES:  # drop the least recently opened
            del _STORES[next(iter(_STORES))]
    return fresh


def slide_layers(viewer: napari.Viewer) -> list[Any]:
    """Image layers opened by Tilescope's reader (they carry the slide path in metadata)."""
    return [ly for ly in viewer.layers if "path" in ly.metadata.get("tilescope", {})]


def slide_choices(viewer: napari.Viewer) -> Callable[..., list[tuple[str, Any]]]:
    """A magicgui ``choices`` callback listing `viewer`'s slide layers as (name, layer)."""

    def choices(_: Any = None) -> list[tuple[str, Any]]:
        return [(ly.name, ly) for ly in slide_layers(viewer)]

    return choices


def store_of(layer: Any) -> Path | None:
    """The embedding store recorded on a slide layer by the Embed widget, if any."""
    path = layer.metadata.get("tilescope", {}).get("store")
    return Path(path) if path else None


def require_store(layer: Any) -> Path:
    """The store of a slide layer: the one the Embed widget recorded, else an existing store at
    the default location; raises a `TilescopeError` saying what to do when there is none."""
    from ..embed import store_path_for
    from ..errors import StoreError, TilescopeError

    if layer is None:
        raise TilescopeError("open a slide first (File > Open, or File > Open Sample)")
    path = store_of(layer)
    if path is None:
        guess = store_path_for(layer.metadata["tilescope"]["path"], DEFAULT_STORE_DIR)
        if not guess.exists():
            raise StoreError(
                f"{layer.name}: no embeddings yet; run 'Embed slide' on it first "
                "(Plugins > Tilescope > Embed slide)"
            )
        path = guess
    return path


def camera_of(viewer: napari.Viewer) -> Any:
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def row(*widgets: Any, labels: bool = False) -> Any:
    """Widgets side by side in one line of a form (a borderless horizontal Container)."""
    from magicgui.widgets import Container

    line = Container(widgets=list(widgets), layout="horizontal", labels=labels)
    line.margins = (0, 0, 0, 0)
    return line


def untrained_suffix(trained: bool) -> str:
    return "" if trained else " [UNTRAINED model: not a result]"


def start_worker(
    func: Callable[..., Any],
    *args: Any,
    returned: Callable[[Any], object],
    errored: Callable[[BaseException], object],
    yielded: Callable[[Any], object] | None = None,
    finished: Callable[[], object] | None = None,
    sync: bool = False,
) -> Any:
    """Run `func(*args)` in a thread (superqt's worker, which napari's ``thread_worker`` wraps)
    and hand its result to `returned` on the main thread; or run it inline when `sync`.

    Errors go to `errored` only (no re-raise, no traceback dialog). Generators are driven to
    the end, each yielded value going to `yielded`. Returns the started worker, or None.
    """
    if sync:
        try:
            result = func(*args)
            if hasattr(result, "__next__"):
                try:
                    while True:
                        value = next(result)
                        if yielded is not None:
                            yielded(value)
                except StopIteration as stop:
                    result = stop.value
        except Exception as exc:
            errored(exc)
        else:
            returned(result)
        finally:
            if finished is not None:
                finished()
        return None
    from napari.qt.threading import create_worker  # superqt's, with napari's worker classes

    connect: dict[str, Any] = {"returned": returned, "errored": errored}
    if yielded is not None:
        connect["yielded"] = yielded
    if finished is not None:
        connect["finished"] = finished
    return create_worker(func, *args, _connect=connect, _start_thread=True)


def notify_error(exc: BaseException) -> None:
    """Show an error as a napari notification with its reason (no traceback dialog)."""
    from napari.utils.notifications import show_error

    from ..errors import TilescopeError

    reason = str(exc) if isinstance(exc, TilescopeError) else f"{type(exc).__name__}: {exc}"
    show_error(f"Tilescope: {reason}")


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(f"Tilescope: {message}")


def notify_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(f"Tilescope: {message}")
