"""Shared pieces of the widgets: a model cache, open stores, workers, a progress bar, layout.

Slide layers are in `_slides`, stores in `_stores`, messages in `_messages`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import Container

if TYPE_CHECKING:
    import napari

    from ..models import Encoder
    from ..store import EmbeddingStore

_ENCODERS: dict[tuple[str, str, str], Encoder] = {}
_ENCODER_LOCK = threading.Lock()

DEVICE_CHOICES = ["auto", "cpu", "cuda", "mps"]
BACKEND_CHOICES = ["auto", "torch", "openvino"]
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
            enc = load_encoder(name, device=str(dev), backend=chosen)
            _ENCODERS[key] = _ENCODERS.setdefault((enc.model_id, dkey, chosen), enc)
        return _ENCODERS[key]


def register_encoder(encoder: Encoder) -> Encoder:
    """Keep an already loaded model so the widgets use it for stores it made."""
    key = (encoder.model_id, _device_key(encoder.device), encoder.backend)
    with _ENCODER_LOCK:
        return _ENCODERS.setdefault(key, encoder)


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


def swatch(rgba: Any, size: int = 12) -> Any:
    """A small square icon of colour `rgba` (0..1), for a class's row in a table."""
    from qtpy.QtGui import QColor, QIcon, QPixmap

    pix = QPixmap(size, size)
    red, green, blue = (int(round(255 * float(v))) for v in list(rgba)[:3])
    pix.fill(QColor(red, green, blue))
    return QIcon(pix)


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


class RunProgress:
    """One run's bar in napari's activity panel (``napari.utils.progress``), safe against
    re-entry: updating a bar processes Qt events, so the run may end (and `close` be called)
    while an update is under way; a closed bar ignores every later report.

    The bar counts tiles from where the run starts (``initial``: a resumed store starts at its
    tiles already done), so its rate and ETA are this run's, never the resumed count divided by
    a few milliseconds.
    """

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Any = None
        self.closed = False
        self._pending: tuple[int, int, str | None] | None = None  # reports while creating

    def update(self, done: int, total: int, desc: str | None = None) -> None:
        """Set the bar to `done` of `total` through napari's own API (``update`` emits the
        value event the activity panel listens to; setting ``n`` does not)."""
        if self.closed:
            return
        if self.bar is None:
            if self._pending is not None:  # re-entered while the bar is being made: keep
                self._pending = (done, total, desc)  # the latest report, applied below
                return
            self._pending = (done, total, desc)
            from napari.utils import progress

            try:
                bar = progress(total=max(int(total), 1), desc=self.desc, initial=int(done),
                               unit="tile")  # fmt: skip
            finally:
                latest, self._pending = self._pending, None
            if self.closed:  # the run ended while the bar was being made
                bar.close()
                return
            self.bar = bar
            done, total, desc = latest
        bar = self.bar
        if bar.total != max(int(total), 1):
            bar.total = max(int(total), 1)
        if desc is not None and desc != self.desc:
            self.desc = desc
            bar.set_description(desc)
        if not self.closed and int(done) != bar.n:
            bar.update(int(done) - bar.n)

    def close(self) -> None:
        self.closed = True
        bar, self.bar = self.bar, None
        if bar is not None:
            bar.close()


class DockContainer(Container):
    """A magicgui Container that scrolls inside its napari dock, and joins the other Tilescope
    docks as a tab.

    napari docks a magicgui widget's ``native`` (the widget holding the layout), which drops
    magicgui's scroll area: every dock then insists on its full height, and five docks grow the
    window past the screen. Here ``native`` is the scroll area itself, so a dock can be shorter
    than its content and scrolls; the scroll area is as wide as the content (never clipped).
    Docked beside another Tilescope dock (the Plugins menu adds each below the last), it becomes
    a tab of that dock: all widgets open together fit any window and each has the full height.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(scrollable=True, **kwargs)
        from qtpy.QtCore import QObject
        from qtpy.QtWidgets import QFrame

        scroll = self.root_native_widget
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        inner = scroll.widget()
        inner.layout().addStretch(1)  # rows keep their height; the room left goes below them

        class _Watch(QObject):
            """Keeps what it watches as attributes, not closure cells (pytest clears the
            frames of failed tests, which empties closure cells still in use)."""

            def __init__(self, scroll: Any, inner: Any, owner: Any) -> None:
                super().__init__(scroll)
                self.scroll, self.inner, self.owner = scroll, inner, owner

            def eventFilter(self, obj: Any, event: Any) -> bool:
                from qtpy.QtCore import QEvent, QTimer

                if "owner" not in self.__dict__:  # a wrapper being torn down (or not yet set)
                    return False
                if obj is self.inner and event.type() == QEvent.Type.LayoutRequest:
                    # the scroll area is as wide as its content needs (never clipped)
                    bar = self.scroll.verticalScrollBar().sizeHint().width()
                    self.scroll.setMinimumWidth(self.inner.minimumSizeHint().width() + bar + 2)
                elif obj is self.scroll and event.type() == QEvent.Type.ParentChange:
                    QTimer.singleShot(0, self.owner._join_tilescope_tabs)  # once napari placed it
                return False

        self._dock_filter = _Watch(scroll, inner, self)
        inner.installEventFilter(self._dock_filter)
        scroll.installEventFilter(self._dock_filter)

    @property
    def native(self) -> Any:
        return self.root_native_widget

    def _join_tilescope_tabs(self) -> None:
        try:
            self._tabify()
        except RuntimeError:  # the dock (or the window) was deleted meanwhile: nothing to join
            return

    def _tabify(self) -> None:
        from qtpy.QtWidgets import QDockWidget, QMainWindow

        dock = self.root_native_widget.parent()
        main = dock.parent() if isinstance(dock, QDockWidget) else None
        if not isinstance(main, QMainWindow) or dock.isFloating():
            return
        area = main.dockWidgetArea(dock)
        others = [
            d for d in main.findChildren(QDockWidget)
            if d is not dock and d.isVisible() and not d.isFloating()
            and main.dockWidgetArea(d) == area
            and isinstance(getattr(d.widget(), "_magic_widget", None), DockContainer)
        ]  # fmt: skip
        if others and not main.tabifiedDockWidgets(dock):
            main.tabifyDockWidget(others[-1], dock)
            dock.show()
            dock.raise_()
