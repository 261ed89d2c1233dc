"""Which embedding store holds a slide layer's embeddings, and the *store* picker of the widgets.

A store belongs to a slide by the slide's file identity in its signature (byte size and the
digest of its first MiB; `tilescope.catalog`), never by file name: two slides called
``slide.svs`` never swap heatmaps, and a store the CLI or the demo wrote is found after a
restart. Stores are looked for in the default stores folder (``$TILESCOPE_STORES`` or
``~/tilescope/stores``, where ``tilescope embed`` writes too), in every folder the user chose
this session (the Embed widget's *stores* folder, stores picked with *…*), and at the store
the Embed widget recorded on the slide layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from magicgui.widgets import ComboBox, Container, PushButton

from ..catalog import default_store_dir, file_identity, read_signature, same_slide, stores_for_slide
from ..errors import StoreError
from ._messages import compact_combo

_SESSION_FOLDERS: list[Path] = []
_IDENTITIES: dict[tuple[str, int, int], dict[str, Any]] = {}
_LISTENERS: list[weakref.ref[Any]] = []
NONE_FOUND = "(none found: embed this slide, or pick its store with …)"


def remember_folder(folder: str | Path) -> None:
    """Look for stores in `folder` too from now on (this session); refresh every picker."""
    folder = Path(folder).expanduser()
    if folder not in _SESSION_FOLDERS:
        _SESSION_FOLDERS.append(folder)
    stores_changed()


def stores_changed() -> None:
    """Tell every store picker that stores were made or moved (e.g. an embedding finished)."""
    alive = []
    for ref in _LISTENERS:
        picker = ref()
        if picker is None:
            continue
        try:
            picker.refresh()
        except RuntimeError:  # its Qt widget was deleted (a closed viewer): forget it
            continue
        alive.append(ref)
    _LISTENERS[:] = alive


def folders() -> list[Path]:
    """The folders searched for stores: the default folder first, then this session's."""
    out = [default_store_dir()]
    for f in _SESSION_FOLDERS:
        if f not in out:
            out.append(f)
    return out


def slide_identity(path: str | Path) -> dict[str, Any]:
    """`catalog.file_identity` of a slide file, cached by path, size and modification time."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _IDENTITIES:
        _IDENTITIES[key] = file_identity(p)
    return _IDENTITIES[key]


def holds_slide(store: str | Path, slide_path: str | Path) -> bool:
    """True if `store` is an embedding store made from the file `slide_path`."""
    sig = read_signature(store)
    return sig is not None and same_slide(sig.get("slide", {}), slide_identity(slide_path))


def stores_for_layer(layer: Any) -> list[Path]:
    """Stores of a slide layer's file: the one recorded on the layer (if it holds this slide),
    then those in `folders` (complete ones first, newest first)."""
    meta = layer.metadata.get("tilescope", {})
    path = meta.get("path")
    if not path or not Path(path).is_file():
        return []
    found: list[Path] = []
    recorded = meta.get("store")
    if recorded and holds_slide(recorded, path):
        found.append(Path(recorded))
    search = folders()
    if recorded:
        search.append(Path(recorded).parent)
    for store in stores_for_slide(path, search, identity=slide_identity(path)):
        if all(store.resolve() != f.resolve() for f in found):
            found.append(store)
    return found


def describe(store: Path) -> str:
    """``NAME.zarr (complete; 224 px at 0.5 µm/px; tiny-random UNTRAINED)``."""
    sig = read_signature(store) or {}
    grid, model = sig.get("grid", {}), sig.get("model", {})
    state = "complete" if sig.get("complete") else "partial"
    name = str(model.get("model_id", "?")).removeprefix("hf-hub:").split("/")[-1]
    untrained = "" if model.get("trained", True) else " UNTRAINED"
    return (f"{store.name} ({state}; {grid.get('tile_px', '?')} px at "
            f"{grid.get('target_mpp', '?')} µm/px; {name}{untrained})")  # fmt: skip


class StorePicker(Container):
    """*store*: the stores of the chosen slide (by file identity), and *…* to pick one anywhere.

    ``value`` is the chosen store's path or None; `require` raises a `StoreError` worded for
    the widget when there is none. Call `set_slide` when the widget's slide changes.
    """

    def __init__(self, label: str = "store") -> None:
        super().__init__(layout="horizontal", labels=False, label=label)
        self.margins = (0, 0, 0, 0)
        self._layer: Any = None
        self._picked: list[Path] = []
        self._combo = ComboBox(choices=self._choices, nullable=False)
        self._combo.tooltip = (
            "The embedding store of this slide (found by the slide file's identity in the "
            "default stores folder and in folders used this session)"
        )
        compact_combo(self._combo)
        self._browse = PushButton(text="…")
        self._browse.tooltip = "Pick a store (a .zarr folder) anywhere"
        self._browse.native.setMaximumWidth(32)
        self.extend([self._combo, self._browse])
        self._browse.changed.connect(self._on_browse)
        _LISTENERS.append(weakref.ref(self))
        self.on_error: Callable[[BaseException], object] | None = None

    def _choices(self, _: Any = None) -> list[tuple[str, Any]]:
        if self._layer is None:
            return [("(open a slide first)", None)]
        try:
            found = stores_for_layer(self._layer)
        except OSError:
            found = []
        path = self._layer.metadata.get("tilescope", {}).get("path", "")
        for p in self._picked:
            if p.exists() and holds_slide(p, path) and all(p != f for f in found):
                found.append(p)
        if not found:
            return [(NONE_FOUND, None)]
        return [(describe(p), p) for p in found]

    @property
    def value(self) -> Path | None:
        return self._combo.value

    def set_slide(self, layer: Any) -> None:
        self._layer = layer
        self.refresh()

    def refresh(self) -> None:
        current = self._combo.value
        self._combo.reset_choices()
        if current is not None and current in [v for v in self._combo.choices]:
            self._combo.value = current

    def choose(self, path: str | Path) -> Path:
        """Use the store at `path` for this slide (it must hold this slide's embeddings)."""
        store = Path(path)
        sig = read_signature(store)
        if sig is None:
            raise StoreError(f"{store}: not a Tilescope embedding store (a .zarr folder made by "
                             "'Embed slide' or tilescope embed)")  # fmt: skip
        if self._layer is None:
            raise StoreError("open the slide of this store first (File > Open)")
        slide_path = self._layer.metadata["tilescope"]["path"]
        if not holds_slide(store, slide_path):
            other = sig.get("slide", {}).get("name", "?")
            raise StoreError(f"{store.name} holds the embeddings of another slide ({other}), "
                             f"not of {Path(slide_path).name}")  # fmt: skip
        if store not in self._picked:
            self._picked.append(store)
        remember_folder(store.parent)
        self._combo.value = store
        return store

    def require(self) -> Path:
        """The chosen store; a `StoreError` saying what to do when this slide has none."""
        from ..errors import TilescopeError

        if self._layer is None:
            raise TilescopeError("open a slide first (File > Open, or File > Open Sample)")
        self.refresh()
        store = self.value
        if store is None:
            where = ", ".join(str(f) for f in folders())
            raise StoreError(
                f"{self._layer.name}: no embeddings of this slide in {where}; embed it with "
                "Plugins > Tilescope > Embed slide, or pick its store with … next to 'store'"
            )
        return store

    def _on_browse(self, _: Any = None) -> None:
        from qtpy.QtWidgets import QFileDialog

        start = str(self.value.parent if self.value else default_store_dir())
        chosen = QFileDialog.getExistingDirectory(self.native, "Embedding store (.zarr)", start)
        if not chosen:
            return
        try:
            self.choose(chosen)
        except Exception as exc:
            if self.on_error is not None:
                self.on_error(exc)
            else:
                raise
