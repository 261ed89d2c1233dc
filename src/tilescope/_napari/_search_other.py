"""Region search beyond the slide shown: the last query over a folder of stores (through the
folder's cohort index, as ``tilescope search --against``), the list of matches, and going to
one (opening its slide when needed, its matches outlined there).

`OtherSlides.compute_folder` is the one place the widget searches other stores; it calls
`tilescope.index.search_cohort`, the function the command line uses. Building or updating the
index runs in the worker with a bar in napari's activity panel; *Cancel* stops it between two
blocks of rows, and the stores written whole so far stay in the index.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..catalog import read_signature
from ..errors import SearchCancelled, SearchError
from ..index import CohortResult, search_cohort
from ..search import Match
from ._common import UNTRAINED_TAG, RunProgress, camera_of, start_worker
from ._frame import SlideFrame, result_name
from ._layers import matches_layer, put_layers
from ._messages import notify_info, report_status
from ._slides import find_slide_file, layer_of_file, no_slide_error
from ._stores import folders

#: Matches found on other slides ("Search other slides"), outlined on their slide.
FOLDER_ROLE = "region-search-other-slides"
CANCELLING = "cancelling: the index keeps the stores written whole so far ..."


@dataclass
class FolderRun:
    """One press of *Search other slides*: the query as it was then, what to search, the
    cancel flag and the progress bar. Reports of a finished run are ignored."""

    folder: Path
    k: int
    per_slide: int | None
    query: np.ndarray
    model: dict[str, Any]
    exclude: dict[str, np.ndarray] | None
    cancel: threading.Event = field(default_factory=threading.Event)
    bar: RunProgress = field(default_factory=lambda: RunProgress("Indexing"))
    finished: bool = False
    rows: tuple[int, int] = (0, 0)  # the latest (rows written, rows to write)
    showing: bool = False  # the bar is being updated (a nested report only records its rows)

    @property
    def trained(self) -> bool:
        return bool(self.model.get("trained", True))


class _MainThread:
    """Calls made from the worker thread, run on the main (Qt) thread; inline when made there."""

    def __init__(self) -> None:
        from qtpy.QtCore import QObject, Signal, Slot

        class Relay(QObject):
            call = Signal(object)

            @Slot(object)
            def run(self, fn: Callable[[], object]) -> None:
                fn()

        self._relay = Relay()  # made on the main thread: a queued connection from a worker
        self._relay.call.connect(self._relay.run)

    def __call__(self, fn: Callable[[], object]) -> None:
        self._relay.call.emit(fn)


class OtherSlides:
    """The *other slides* part of `RegionSearchWidget` (a mixin: it uses the widget's parts)."""

    _viewer: Any
    _slide: Any
    _folder: Any
    _k: Any
    _per_slide: Any
    _zoom: Any
    _results: Any
    _search_folder: Any
    _cancel_folder: Any
    _status: Any
    last_result: Any
    other_matches: list[Match]
    synchronous: bool
    _folder_run: FolderRun | None = None
    _main_thread: _MainThread | None = None

    def _on_error(self, exc: BaseException) -> None: ...

    def _zoom_to_tile(self, tile_world: float | None = None) -> None: ...

    # -- the work, usable synchronously in tests ---------------------------------------------
    def folder_run(self, folder: Path, k: int, per_slide: int | None = None) -> FolderRun:
        """The last query (as it is now) over the stores in `folder`: `k` matches, at most
        `per_slide` from any one slide (None or 0: no cap)."""
        res = self.last_result
        if res is None:
            if self._slide.value is None:
                raise no_slide_error(self._viewer)
            raise SearchError("search this slide first: the query comes from the drawn region")
        req = res.request
        exclude = {str(req.store_path): res.query_idx} if req.exclude_query else None
        run = FolderRun(Path(folder), int(k), int(per_slide) if per_slide else None,
                        res.query, dict(res.model), exclude)  # fmt: skip
        run.bar = RunProgress(f"Indexing {run.folder.name}")
        return run

    def compute_folder(self, run: FolderRun) -> CohortResult:
        """The run's query over its folder, as ``tilescope search --against FOLDER`` does it
        (`search_cohort`): through the folder's index, built or brought up to date first (its
        progress goes to the bar and the status line; Cancel stops it: `SearchCancelled`);
        stores the index does not cover (partial ones) read directly. Refused if a store was
        made by another model."""
        return search_cohort(
            run.query, run.folder, model=run.model, k=run.k, per_slide=run.per_slide,
            exclude=run.exclude, progress=lambda m: self._later(run, self._folder_said, m),
            on_rows=lambda d, t: self._later(run, self._folder_rows, d, t),
            should_stop=run.cancel.is_set,
        )  # fmt: skip

    def apply_folder(self, run: FolderRun, found: CohortResult) -> None:
        self._folder_run = run
        matches = found.matches
        self.other_matches = matches
        self._results.value = {
            "data": [[m.slide_name, m.x, m.y, f"{m.similarity:.3f}"] for m in matches],
            "index": [str(i) for i in range(1, len(matches) + 1)],
            "columns": ["slide", "x", "y", "similarity"],
        }
        fit_columns(self._results)
        for i, m in enumerate(matches):
            item = self._results.native.item(i, 0)
            if item is not None:
                item.setToolTip(f"{m.store}, tile {m.index}")
        report_status(self._status, folder_summary(run, found))

    def go_to_match(self, m: Match) -> Any:
        """Show match `m`: on its slide's layer, opening the slide (Tilescope's reader) when it
        is not open yet; the slide file is found by the identity recorded in the store."""
        sig = read_signature(m.store) or {}
        extra = [Path(m.store).parent, *folders()]
        slide_file = find_slide_file(sig.get("slide", {}), self._viewer, extra)
        if slide_file is None:
            raise SearchError(
                f"match on {m.slide_name}: its slide file was not found next to the open "
                "slides or the stores; open it with File > Open, then double-click again"
            )
        layer = layer_of_file(self._viewer, slide_file)
        if layer is None:
            layer = self._viewer.open(str(slide_file), plugin="tilescope")[0]
            notify_info(f"opened {slide_file.name} to show match on it")
        layer.metadata["tilescope"].setdefault("store", str(m.store))
        frame = SlideFrame.of_layer(layer)
        self._mark_folder_matches(frame, m)
        centre = frame.tile_centres(np.array([[m.x, m.y]]), m.tile_l0)[0]
        camera_of(self._viewer).center = tuple(float(v) for v in centre)
        if self._zoom.value:
            self._zoom_to_tile(m.tile_l0 * float(np.mean(frame.scale)))
        rank = self.other_matches.index(m) + 1 if m in self.other_matches else 0
        self._status.value = (f"match {rank} of the other slides: {m.slide_name}, x={m.x}, "
                              f"y={m.y}, similarity {m.similarity:.3f}")  # fmt: skip
        return layer

    def _mark_folder_matches(self, frame: SlideFrame, current: Match) -> None:
        """Outline the other-slides matches that lie on this slide (numbered by their rank in
        the list), the current one in magenta."""
        here = Path(current.store).resolve()
        mine = [(k, m) for k, m in enumerate(self.other_matches) if Path(m.store).resolve() == here]
        if not mine:
            return
        xy = np.array([[m.x, m.y] for _, m in mine], dtype=np.int64)
        features = {
            "rank": np.array([k + 1 for k, _ in mine]),
            "similarity": np.array([m.similarity for _, m in mine]),
            "slide": [m.slide_name for _, m in mine],
            "x": xy[:, 0],
            "y": xy[:, 1],
        }
        trained = self._folder_run is None or self._folder_run.trained
        name = result_name("other-slides matches", frame, "" if trained else UNTRAINED_TAG)
        data = matches_layer(
            xy,
            current.tile_l0,
            frame,
            features,
            name,
            metadata=frame.meta(FOLDER_ROLE, store=str(current.store)),
        )
        (layer,) = put_layers(self._viewer, [data], FOLDER_ROLE, frame.path)
        colors = np.tile([0.0, 1.0, 1.0, 1.0], (len(mine), 1))
        colors[[m for _, m in mine].index(current)] = [1.0, 0.0, 1.0, 1.0]
        layer.edge_color = colors

    # -- Qt side ------------------------------------------------------------------------------
    def _on_search_folder(self, _: Any = None) -> None:
        folder = Path(str(self._folder.value))
        try:
            if not str(self._folder.value) or not folder.exists():
                raise SearchError(f"{folder}: choose a folder of .zarr embedding stores")
            run = self.folder_run(folder, int(self._k.value), int(self._per_slide.value))
        except Exception as exc:
            self._on_error(exc)
            return
        if self._main_thread is None:
            self._main_thread = _MainThread()  # made here, on the main thread
        if self._folder_run is not None and not self._folder_run.finished:
            self._folder_run.cancel.set()  # (never: the button is disabled while one runs)
        self._folder_run = run
        self._folder_running(True)
        self._status.value = f"searching {folder} ..."
        start_worker(
            self.compute_folder, run, returned=lambda found: self._folder_done(run, found),
            errored=lambda exc: self._folder_failed(run, exc),
            finished=lambda: self._folder_finish(run), sync=self.synchronous,
        )  # fmt: skip

    def _on_cancel_folder(self, _: Any = None) -> None:
        run = self._folder_run
        if run is None or run.finished:
            return
        run.cancel.set()
        self._cancel_folder.enabled = False
        self._status.value = CANCELLING

    def _later(self, run: FolderRun, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(run, *args)`` on the main thread (the core calls from the worker)."""
        relay = self._main_thread
        if relay is None or self.synchronous:
            fn(run, *args)
        else:
            relay(lambda: fn(run, *args))

    def _folder_said(self, run: FolderRun, message: str) -> None:
        if run.finished or run is not self._folder_run or run.cancel.is_set():
            return
        self._status.value = message.strip()

    def _folder_rows(self, run: FolderRun, done: int, total: int) -> None:
        """Show the rows written. Updating the bar processes Qt events, where the next reports
        (or the run's end) may arrive: they record their rows, shown when the update returns."""
        run.rows = (done, total)
        if run.showing:
            return
        run.showing = True
        try:
            shown = None
            while not run.finished and run is self._folder_run and run.rows != shown:
                shown = done, total = run.rows
                if not run.cancel.is_set():
                    self._status.value = indexing_text(run.folder, done, total)
                run.bar.update(done, total)
        finally:
            run.showing = False

    def _folder_finish(self, run: FolderRun) -> bool:
        """Mark `run` finished; False if it already was."""
        if run.finished:
            return False
        run.finished = True
        run.bar.close()
        if run is self._folder_run:
            self._folder_running(False)
        return run is self._folder_run

    def _folder_done(self, run: FolderRun, found: CohortResult) -> None:
        if self._folder_finish(run):
            self.apply_folder(run, found)

    def _folder_failed(self, run: FolderRun, exc: BaseException) -> None:
        if not self._folder_finish(run):
            return
        if isinstance(exc, SearchCancelled):
            report_status(self._status, str(exc))
        else:
            self._on_error(exc)

    def _folder_running(self, running: bool) -> None:
        self._search_folder.enabled = not running
        self._cancel_folder.enabled = running

    def _on_result_clicked(self, row: int, _column: int = 0) -> None:
        """Go to a match of the other-slides list (opening its slide if needed)."""
        if not 0 <= row < len(self.other_matches):
            return
        try:
            self.go_to_match(self.other_matches[row])
        except Exception as exc:
            self._on_error(exc)


def fit_columns(table: Any) -> None:
    """The results table's columns: x, y and similarity as wide as their contents, the slide
    name takes the rest (no horizontal scroll bar in a narrow dock)."""
    from qtpy.QtWidgets import QHeaderView

    header = table.native.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
    header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)  # the slide name


def indexing_text(folder: Path, done: int, total: int) -> str:
    return (f"indexing {folder.name}: {done:,} of {total:,} patches (Cancel keeps the stores "
            "written so far)")  # fmt: skip


def folder_summary(run: FolderRun, found: CohortResult) -> str:
    """The status after a search of other slides: how many matches, how they were found (the
    index, its approximate search, stores read directly), then the core's notes in full."""
    n = len(found.matches)
    slides = len({m.store for m in found.matches})
    cap = f", at most {run.per_slide} per slide" if run.per_slide else ""
    how = []
    if found.n_indexed:
        kind = "approximate index (a near match can be missed)" if found.approximate else "index"
        how.append(f"{found.n_indexed} stores through the {kind}")
    if found.n_direct:
        how.append(f"{found.n_direct} read directly")
    line = (f"{n} matches on {slides} slide(s){cap}; {', '.join(how)}; double-click a match "
            "to go there")  # fmt: skip
    return "\n".join([line, *found.notes])
