"""Region search beyond the slide shown: the last query over a folder of stores, the list of
matches, and going to one (opening its slide when needed, its matches outlined there).

`OtherSlides.compute_folder` is the one place the widget searches other stores: a cohort index
can take its place without touching the rest of the widget.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ..catalog import read_signature
from ..errors import SearchError
from ..search import Match, search_stores
from ._common import UNTRAINED_TAG, camera_of, start_worker
from ._frame import SlideFrame, result_name
from ._layers import matches_layer, put_layers
from ._messages import notify_info
from ._slides import find_slide_file, layer_of_file
from ._stores import folders

#: Matches found on other slides ("Search other slides"), outlined on their slide.
FOLDER_ROLE = "region-search-other-slides"


class OtherSlides:
    """The *other slides* part of `RegionSearchWidget` (a mixin: it uses the widget's parts)."""

    _viewer: Any
    _folder: Any
    _k: Any
    _zoom: Any
    _results: Any
    _search_folder: Any
    _status: Any
    last_result: Any
    other_matches: list[Match]
    synchronous: bool

    def _on_error(self, exc: BaseException) -> None: ...

    def _zoom_to_tile(self, tile_world: float | None = None) -> None: ...

    def compute_folder(self, folder: Path, k: int) -> list[Match]:
        """The last query over every store in `folder` (refused if made by another model).

        The one place the widget searches beyond its slide (a cohort index can take over)."""
        res = self.last_result
        if res is None:
            raise SearchError("search this slide first: the query comes from the drawn region")
        exclude: dict[str | PathLike[str], np.ndarray] | None = None
        if res.request.exclude_query:
            exclude = {res.request.store_path: res.query_idx}
        return search_stores(res.query, folder, model=res.model, k=k, exclude=exclude)

    def apply_folder(self, matches: list[Match]) -> None:
        from qtpy.QtWidgets import QHeaderView

        self.other_matches = matches
        self._results.value = {
            "data": [[m.slide_name, m.x, m.y, f"{m.similarity:.3f}"] for m in matches],
            "index": [str(i) for i in range(1, len(matches) + 1)],
            "columns": ["slide", "x", "y", "similarity"],
        }
        header = self._results.native.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)  # the slide name
        slides = len({m.store for m in matches})
        self._status.value = f"{len(matches)} matches on {slides} slide(s); double-click to go"

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
        trained = self.last_result is None or self.last_result.model.get("trained", True)
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
        if not str(self._folder.value) or not folder.is_dir():
            self._on_error(SearchError(f"{folder}: choose a folder of .zarr embedding stores"))
            return
        self._status.value = f"searching {folder} ..."
        self._search_folder.enabled = False
        start_worker(
            self.compute_folder, folder, int(self._k.value), returned=self.apply_folder,
            errored=self._on_error, sync=self.synchronous,
            finished=lambda: setattr(self._search_folder, "enabled", True),
        )  # fmt: skip

    def _on_result_clicked(self, row: int, _column: int = 0) -> None:
        """Go to a match of the other-slides list (opening its slide if needed)."""
        if not 0 <= row < len(self.other_matches):
            return
        try:
            self.go_to_match(self.other_matches[row])
        except Exception as exc:
            self._on_error(exc)
