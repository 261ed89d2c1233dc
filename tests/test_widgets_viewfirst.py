"""View first and live results, as napari builds the widgets (Plugins menu path, viewer proxy,
a shown 1600 x 1000 window): the tiles on screen are embedded first, the order follows the
camera, the heatmap and the similarity map fill in while the slide is embedded (keeping the
user's styling), and a partial store is a normal state.

The tiny untrained model on a small synthetic slide; the encoder is held at a gate (a
semaphore the test releases batch by batch), so what runs when is decided by the test, not by
the machine's speed.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from napari_helpers import cell_value, dock, settle, shown_viewer, world_of_l0

from tilescope._napari import _embed_widget, _live, _stores
from tilescope._napari._common import camera_of, get_encoder
from tilescope._napari._live import HUB, RunEvent
from tilescope._napari._viewfirst import REGIONS_ONLY, VIEW_ONLY
from tilescope.regions import tiles_overlapping
from tilescope.store import EmbeddingStore

pytestmark = pytest.mark.napari

MPP = 0.5  # the slide's µm per px: world (µm) = level-0 px * MPP
TILE = 112  # tile px at 0.5 µm/px: 56 µm, about 300 tiles of tissue on `synth_05`
BLOB_A = (380.0, 420.0)  # world (row, col) µm of the centres of synth_05's two blobs
BLOB_B = (600.0, 1130.0)
ZOOM = 3.0  # screen px per µm: a view of about 7 x 5 tiles


@pytest.fixture(autouse=True)
def quick(monkeypatch, tmp_path):
    monkeypatch.setenv("TILESCOPE_STORES", str(tmp_path / "default-stores"))
    monkeypatch.setattr(_stores, "_SESSION_FOLDERS", [])
    monkeypatch.setattr(_live, "LIVE_INTERVAL_S", 0.1)  # redraw often: quick tests


class Gate:
    """The encoder, each batch waiting for a permit the test gives (`release`)."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self.permits = threading.Semaphore(0)
        self.submitted = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def submit_images(self, images: np.ndarray) -> Any:
        assert self.permits.acquire(timeout=60), "the test never let this batch through"
        self.submitted += 1
        return self._encoder.submit_images(images)

    def release(self, n: int = 1) -> None:
        self.permits.release(n)


class Recorder:
    """Every event of the live results hub (a bound method: the hub holds it weakly)."""

    def __init__(self) -> None:
        self.events: list[RunEvent] = []
        HUB.subscribe(self.on_event)

    def on_event(self, event: RunEvent) -> None:
        self.events.append(event)

    @property
    def rows(self) -> list[np.ndarray]:
        return [e.indices for e in self.events if e.kind == "rows" and e.indices is not None]


def view_box(viewer: Any) -> tuple[float, float, float, float]:
    """The canvas's view in level-0 px, from the camera and the canvas size (µm / MPP)."""
    cam = camera_of(viewer)
    (cy, cx), zoom = cam.center[-2:], cam.zoom
    h, w = viewer.canvas.size
    return ((cx - w / 2 / zoom) / MPP, (cy - h / 2 / zoom) / MPP,
            (cx + w / 2 / zoom) / MPP, (cy + h / 2 / zoom) / MPP)  # fmt: skip


def look_at(viewer: Any, centre: tuple[float, float]) -> tuple[float, float, float, float]:
    cam = camera_of(viewer)
    cam.zoom, cam.center = ZOOM, centre
    settle()
    return view_box(viewer)


def in_box(coords: np.ndarray, box: tuple[float, float, float, float]) -> set[int]:
    x0, y0, x1, y1 = box
    return set(tiles_overlapping(coords, TILE, [(x0, y0, x1 - x0, y1 - y0)]).tolist())


@pytest.fixture
def setup(make_napari_viewer, synth_05, tmp_path, monkeypatch):
    gate = Gate(get_encoder("tiny-random"))
    monkeypatch.setattr(_embed_widget, "get_encoder", lambda *a: gate)
    viewer = shown_viewer(make_napari_viewer)
    slide = viewer.open(str(synth_05.path), plugin="tilescope")[0]
    embed = dock(viewer, "Embed slide", synchronous=False)
    embed._model.value = "tiny-random"
    embed._tile.value = TILE
    embed._out_dir.value = tmp_path / "stores"
    yield viewer, slide, embed, gate
    gate.release(10_000)  # never leave a run waiting


def wait_rows(qtbot: Any, rec: Recorder, n: int, embed: Any = None) -> None:
    try:
        qtbot.waitUntil(lambda: len(rec.rows) >= n, timeout=60_000)
    except Exception:
        raise AssertionError(
            f"{len(rec.rows)} rows; {embed and embed._status.value!r}; "
            f"{[e.kind for e in rec.events]}"
        ) from None


def test_the_view_first_then_the_order_follows_the_camera(setup, qtbot):
    viewer, _, embed, gate = setup
    rec = Recorder()
    view_a = look_at(viewer, BLOB_A)
    embed._run.native.click()
    gate.release(3)  # the third waits in the model's queue: two batches are reported
    wait_rows(qtbot, rec, 2, embed)
    run = embed._active
    coords = run.schedule.layout.coords
    a = in_box(coords, view_a)
    assert len(a) >= 20
    first = np.concatenate(rec.rows[:2])
    assert set(first.tolist()) <= a, "the first rows embedded are not the tiles in the view"
    centre = np.array(view_a[:2]) / 2 + np.array(view_a[2:]) / 2
    d = np.hypot(*(coords[first] + TILE / 2 - centre).T)
    assert d[: len(rec.rows[0])].max() <= d[len(rec.rows[0]) :].min() + TILE  # centre first

    view_b = look_at(viewer, BLOB_B)  # pan to the other piece of tissue while it runs
    qtbot.waitUntil(lambda: run.tracker.moves >= 1, timeout=5_000)  # debounced
    handed = set(run.schedule.handed_out().tolist())  # read ahead under the old order
    seen = len(rec.rows)
    b = in_box(coords, view_b) - handed
    assert len(b) >= 20 and not b & a
    gate.release(10_000)
    qtbot.waitUntil(lambda: embed._run.enabled, timeout=120_000)
    rest = [t for r in rec.rows[seen:] for t in r.tolist() if t not in handed]
    assert set(rest[: len(b)]) == b, "after the move, the new view's tiles did not come next"
    assert EmbeddingStore.open(embed.last_result.store_path).complete
    assert not any("embedded ·" in ly.name for ly in viewer.layers)  # whole: coverage gone


def test_live_heatmap_and_similarity_fill_in_and_keep_the_users_styling(setup, qtbot):
    viewer, slide, embed, gate = setup
    heat = dock(viewer, "Prompt heatmap", synchronous=False)
    search = dock(viewer, "Region search", synchronous=False)
    rec = Recorder()
    look_at(viewer, BLOB_A)
    heat._prompts.value = "tissue: tissue\nglass: blank glass"
    heat._run.native.click()  # before any store: the prompts wait for the first tiles
    assert "nothing embedded yet" in heat._status.value
    query = search.query_layer()
    r, c = BLOB_A
    query.add_rectangles(np.array([[r - 20, c - 20], [r + 20, c + 20]]))
    search._search.native.click()  # the same for a query
    assert "waiting for the tiles under the query" in search._status.value

    embed._run.native.click()
    gate.release(2)
    name = "p(tissue) · synth_05 [UNTRAINED]"
    qtbot.waitUntil(lambda: name in viewer.layers, timeout=60_000)
    layer = viewer.layers[name]
    layer.opacity, layer.colormap = 0.33, "viridis"  # the user's styling
    before = int(np.isfinite(layer.data).sum())
    assert 0 < before < layer.data.size
    sim_name = "similarity · synth_05 [UNTRAINED]"
    qtbot.waitUntil(lambda: sim_name in viewer.layers, timeout=60_000)
    sim_before = int(np.isfinite(viewer.layers[sim_name].data).sum())
    label = heat._slide_label.value
    assert "partial: " in label and " of " in label

    gate.release(3)  # three more batches, then the run waits again: still running
    qtbot.waitUntil(lambda: int(np.isfinite(layer.data).sum()) > before, timeout=60_000)
    qtbot.waitUntil(lambda: int(np.isfinite(viewer.layers[sim_name].data).sum()) > sim_before,
                    timeout=60_000)  # fmt: skip
    assert not embed._run.enabled, "the run ended: this was not a live update"
    assert viewer.layers[name] is layer  # updated in place
    assert layer.opacity == pytest.approx(0.33) and layer.colormap.name == "viridis"
    run = embed._active
    n_done = run.start_done + sum(len(x) for x in rec.rows)
    qtbot.waitUntil(lambda: f"partial: {n_done:,} of " in heat._slide_label.value,
                    timeout=10_000)  # fmt: skip
    assert "embedded · synth_05" in viewer.layers  # what is embedded, what is in progress

    gate.release(10_000)
    qtbot.waitUntil(lambda: embed._run.enabled, timeout=120_000)
    qtbot.waitUntil(lambda: "partial" not in heat._slide_label.value, timeout=10_000)
    assert "so far" not in heat._status.value and "slide done" in heat._status.value
    store = EmbeddingStore.open(embed.last_result.store_path)
    assert int(np.isfinite(layer.data).sum()) == store.n_tiles  # no overlap: a cell a tile
    assert layer.opacity == pytest.approx(0.33) and layer.colormap.name == "viridis"


def test_this_view_only_and_drawn_regions_only(setup, qtbot):
    viewer, slide, embed, gate = setup
    gate.release(10_000)
    embed.synchronous = True
    view = look_at(viewer, BLOB_A)
    embed._mode.value = VIEW_ONLY
    embed._run.native.click()
    store = EmbeddingStore.open(embed.last_result.store_path)
    np.testing.assert_array_equal(np.flatnonzero(store.done), sorted(in_box(store.coords, view)))
    assert not store.complete and "(partial)" in embed._status.value

    shapes = embed.draw_regions()
    assert embed._mode.value == REGIONS_ONLY and shapes.mode == "add_rectangle"
    embed._run.native.click()  # no shape drawn yet: a message
    assert "draw the regions to embed first" in embed._status.value
    r, c = BLOB_B
    shapes.add_rectangles(np.array([[r - 50, c - 80], [r + 50, c + 80]]))
    embed._run.native.click()
    again = EmbeddingStore.open(embed.last_result.store_path)
    box = ((c - 80) / MPP, (r - 50) / MPP, (c + 80) / MPP, (r + 50) / MPP)
    want = in_box(again.coords, view) | in_box(again.coords, box)
    np.testing.assert_array_equal(np.flatnonzero(again.done), sorted(want))


def test_a_partial_stores_heatmap_is_clear_where_not_embedded(setup, qtbot):
    viewer, slide, embed, gate = setup
    gate.release(10_000)
    embed.synchronous = True
    view = look_at(viewer, BLOB_A)
    embed._mode.value = VIEW_ONLY
    embed._run.native.click()
    store = EmbeddingStore.open(embed.last_result.store_path)
    assert 0 < store.n_done < store.n_tiles
    heat = dock(viewer, "Prompt heatmap")
    heat._run.native.click()
    assert f"partial: {store.n_done:,} of {store.n_tiles:,} tiles" in heat._slide_label.value
    layer = next(ly for ly in viewer.layers if ly.name.startswith("p(tumor)"))
    inside, outside = np.flatnonzero(store.done)[0], np.flatnonzero(~store.done)[0]
    assert not in_box(store.coords[[outside]], view)
    for i, finite in ((inside, True), (outside, False)):
        x, y = store.coords[i] + TILE / 2
        assert np.isfinite(cell_value(layer, world_of_l0(slide, x, y))) == finite
    assert int(np.isfinite(layer.data).sum()) == store.n_done  # clear, not zero
