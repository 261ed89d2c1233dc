"""Live results while a slide is embedded: the Embed widget publishes each batch it embeds, the
Prompt heatmap and Region search widgets subscribe and fold the new rows into what they show.

Everything here runs on the GUI thread: the Embed widget publishes from its worker's
``yielded`` callback, and subscribers are called right away, so they must only do cheap work
(score the batch's rows, mark themselves dirty) and leave redrawing to a `Throttle`. Nothing
polls the store: a subscriber that starts in the middle of a run gets the rows the store may
not have written yet from `EmbedHub.rows` (`tilescope.live.RowsOverlay`).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Rows a hub keeps of a running embedding for subscribers that start late (beyond it, the
#: oldest go: they are on disk long since; BiomedCLIP rows are 2 KiB).
MAX_KEPT_BYTES = 256 * 2**20
#: Live layers are redrawn at most this often (seconds).
LIVE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class RunEvent:
    """What an embedding run reports: ``started`` (its store exists), ``rows`` (a batch was
    embedded), ``ended`` (the store is closed: everything reported is on disk)."""

    kind: str
    slide: str  # the slide file, as in the slide layer's metadata
    store: Path
    indices: np.ndarray | None = field(default=None, repr=False)
    embeddings: np.ndarray | None = field(default=None, repr=False)
    done: int = 0
    total: int = 0
    complete: bool = False


@dataclass
class _Run:
    slide: str
    store: Path
    batches: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    nbytes: int = 0
    dropped: bool = False


def _key(path: str | Path) -> Path:
    return Path(path).resolve()


class EmbedHub:
    """Runs being embedded in this process, by store; subscribers hear every `RunEvent`."""

    def __init__(self) -> None:
        self._subscribers: list[weakref.WeakMethod[Callable[[RunEvent], object]]] = []
        self._runs: dict[Path, _Run] = {}

    def subscribe(self, callback: Callable[[RunEvent], object]) -> None:
        """Call the bound method `callback` with every event (held weakly: a closed widget
        drops out; one whose Qt side is gone is dropped when it raises RuntimeError)."""
        self._subscribers.append(weakref.WeakMethod(callback))

    def publish(self, event: RunEvent) -> None:
        key = _key(event.store)
        if event.kind == "started":
            self._runs[key] = _Run(event.slide, event.store)
        elif event.kind == "rows" and key in self._runs and event.indices is not None:
            self._keep(self._runs[key], event)
        elif event.kind == "ended":
            self._runs.pop(key, None)
        alive = []
        for ref in self._subscribers:
            callback = ref()
            if callback is None:
                continue
            try:
                callback(event)
            except RuntimeError:  # the widget's Qt side was deleted (a closed viewer)
                continue
            alive.append(ref)
        self._subscribers[:] = alive

    def _keep(self, run: _Run, event: RunEvent) -> None:
        emb = np.asarray(event.embeddings)
        run.batches.append((np.asarray(event.indices), emb))
        run.nbytes += emb.nbytes
        while run.nbytes > MAX_KEPT_BYTES and len(run.batches) > 1:
            _, old = run.batches.pop(0)
            run.nbytes -= old.nbytes
            run.dropped = True

    def active(self, *, slide: str | None = None, store: str | Path | None = None) -> Path | None:
        """The store of the run embedding `slide` (or `store`) now, or None."""
        for key, run in self._runs.items():
            if store is not None and key == _key(store):
                return run.store
            if slide is not None and run.slide == slide:
                return run.store
        return None

    def rows(self, store: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
        """The rows the run writing `store` has reported (those kept; see `MAX_KEPT_BYTES`),
        as ``(indices, embeddings)`` batches; [] when no run writes it."""
        run = self._runs.get(_key(store))
        return list(run.batches) if run is not None else []


#: The hub of this process (napari runs one per process).
HUB = EmbedHub()


class Throttle:
    """Call `callback` on the GUI thread soon after `poke`, at most once per `interval`
    seconds (a single-shot QTimer); `flush` calls it now if it is due."""

    def __init__(self, callback: Callable[[], object], interval: float | None = None) -> None:
        self.callback = callback
        self.interval = LIVE_INTERVAL_S if interval is None else float(interval)
        self.pending = False
        self._last = -np.inf
        self._timer: Any = None

    def poke(self) -> None:
        if self.pending:
            return
        self.pending = True
        wait = max(0.0, self.interval - (time.monotonic() - self._last))
        if self._timer is None:
            from qtpy.QtCore import QTimer

            self._timer = QTimer()
            self._timer.setSingleShot(True)
            self._timer.timeout.connect(self.flush)
        self._timer.start(int(wait * 1000))

    def flush(self) -> None:
        if not self.pending:
            return
        self.pending = False
        if self._timer is not None:
            self._timer.stop()
        self._last = time.monotonic()
        self.callback()

    def cancel(self) -> None:
        self.pending = False
        if self._timer is not None:
            self._timer.stop()


class LiveFollower:
    """Mixin of a result widget whose last result stays in force while its slide is embedded.

    A widget that has never been run follows nothing. Once run (``_live_req`` set by its
    button), the batches embedded for the same slide (and the same store, once it has one)
    are folded into ``_live_obj`` (a `tilescope.live.LiveScores` or ``LiveSimilarity``) and
    the widget redraws at most once a second (`Throttle`). Rows that arrive while the widget
    computes a full result are kept (``_backlog``) and folded in when it is ready. The widget
    implements ``_live_start(store)`` (compute from a store, e.g. the first rows of a run) and
    ``_refresh_live()`` (redraw from ``_live_obj``).
    """

    _live_req: Any
    _live_obj: Any
    _live_store: Path | None
    _backlog: list[tuple[np.ndarray, np.ndarray]] | None
    _live_complete: bool | None

    def _live_init(self) -> None:
        self._live_req = None
        self._live_obj = None
        self._live_store = None
        self._backlog = None
        self._live_complete: bool | None = None  # the store's flag once a run ended
        self._refresh = Throttle(self._refresh_live)
        HUB.subscribe(self._on_run_event)

    def _live_start(self, store: Path) -> None:  # pragma: no cover - implemented by widgets
        raise NotImplementedError

    def _refresh_live(self) -> None:  # pragma: no cover - implemented by widgets
        raise NotImplementedError

    def _follows(self, event: RunEvent) -> bool:
        req = self._live_req
        if req is None or _key(event.slide) != _key(req.frame.path):
            return False
        return self._live_store is None or _key(event.store) == _key(self._live_store)

    def _on_run_event(self, event: RunEvent) -> None:
        if not self._follows(event):
            return
        if event.kind == "rows" and event.indices is not None:
            if self._backlog is not None:  # a full result is being computed: keep them
                self._backlog.append((event.indices, np.asarray(event.embeddings)))
            elif self._live_obj is None:
                self._live_start(event.store)
            else:
                self._live_obj.add(event.indices, event.embeddings)
                self._refresh.poke()
        elif event.kind == "started":
            self._live_complete = None
        elif event.kind == "ended":
            self._live_complete = event.complete
            if self._live_obj is not None:
                self._refresh.poke()
            self._refresh.flush()

    def _live_computing(self, store: Path | None) -> list[tuple[np.ndarray, np.ndarray]]:
        """A full result of `store` starts: keep the rows that arrive meanwhile; returns the
        rows of a run writing it that the store may not hold yet."""
        self._backlog = []
        self._live_store = store
        return HUB.rows(store) if store is not None else []

    def _live_ready(self, obj: Any, store: Path | None) -> None:
        """The full result is in: follow from it (fold in the rows that came meanwhile)."""
        backlog, self._backlog = self._backlog or [], None
        self._live_obj, self._live_store = obj, store
        if obj is None:
            return
        for idx, emb in backlog:
            obj.add(idx, emb)
        if backlog:
            self._refresh.poke()

    def _live_failed(self) -> None:
        """The full result failed: follow nothing until the widget is run again."""
        self._backlog = None
        self._live_obj = None
        self._live_req = None
        self._refresh.cancel()
