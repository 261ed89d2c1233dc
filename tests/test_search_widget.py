"""Region search over other slides through the folder's cohort index, as napari builds the
widget (Plugins menu path, viewer proxy, a shown 1600 x 1000 window; needs an X server).

Two small synthetic slides (a.tif, b.tif) are embedded once with the tiny untrained model;
each test searches a fresh folder holding their stores (links) and three more stores of the
same model whose tiles resemble slide a's (`grid_store`), so several slides compete for the
matches. The widget's results must be those of the core `search_folder` for the same query.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from napari_helpers import (
    assert_fits,
    dock,
    no_bar_left,
    settle,
    shown_viewer,
    watch_bars,
    world_of_l0,
)
from synthetic_stores import full_grid, grid_store, unit_rows

from tilescope._napari import _stores
from tilescope._napari._common import camera_of, get_encoder
from tilescope.catalog import find_stores, stores_for_slide
from tilescope.embed import embed_slides
from tilescope.grid import TileGrid
from tilescope.index import CohortIndex, read_manifest, search_folder, search_index
from tilescope.search import search_stores
from tilescope.store import EmbeddingStore
from tilescope.synthetic import SyntheticSlide

pytestmark = pytest.mark.napari

GRID = TileGrid(target_mpp=0.5, tile_px=224)
EXTRA = ("c", "d", "e")  # grid stores beside a and b


@pytest.fixture(autouse=True)
def empty_stores(monkeypatch, tmp_path):
    monkeypatch.setenv("TILESCOPE_STORES", str(tmp_path / "default-stores"))
    monkeypatch.setattr(_stores, "_SESSION_FOLDERS", [])


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory):
    """a.tif and b.tif, embedded with the tiny model into one stores folder."""
    root = tmp_path_factory.mktemp("slides")
    (root / "slides").mkdir()
    paths = []
    for name, seed in (("a", 11), ("b", 12)):
        spec = SyntheticSlide.with_random_blobs(1120, 896, mpp=0.5, n=3, seed=seed)
        paths.append(spec.write(root / "slides" / f"{name}.tif"))
    embed_slides(paths, root / "stores", encoder=get_encoder("tiny-random"), grid=GRID,
                 batch_size=32)  # fmt: skip
    return paths[0], paths[1], root / "stores"


def like(store: EmbeddingStore, seed: int, noise: float = 0.08) -> np.ndarray:
    """48 unit rows near tiles of `store` (the tiny model's tiles are much alike)."""
    rng = np.random.default_rng(seed)
    base = store.embeddings[rng.integers(0, store.n_tiles, 48)]
    return unit_rows(base + noise * rng.standard_normal(base.shape))


def add_grid_store(folder: Path, name: str, seed: int, model: dict) -> EmbeddingStore:
    a = EmbeddingStore.open(folder / "a.zarr")
    return grid_store(folder / f"{name}.zarr", like(a, seed), full_grid(6, 8),
                      slide=f"{name}.svs", **model)  # fmt: skip


@pytest.fixture
def cohort(two_slides, tmp_path):
    """A fresh folder (no index yet): a.zarr and b.zarr (links), and c, d, e.zarr."""
    _, _, stores = two_slides
    folder = tmp_path / "cohort"
    folder.mkdir()
    for name in ("a.zarr", "b.zarr"):
        (folder / name).symlink_to(stores / name, target_is_directory=True)
    model = EmbeddingStore.open(folder / "a.zarr").signature["model"]
    for i, name in enumerate(EXTRA):
        add_grid_store(folder, name, 100 + i, model)
    return folder


def search_a(viewer, a_path: Path, cohort: Path, *, synchronous: bool = True):
    """Slide a open, a region drawn over its most tissue-filled tile and searched on the
    slide; the widget's other-slides folder set to `cohort`."""
    _stores.remember_folder(cohort)
    a = viewer.open(str(a_path), plugin="tilescope")[0]
    widget = dock(viewer, "Region search", synchronous=synchronous)
    st = EmbeddingStore.open(cohort / "a.zarr")
    i = int(np.argmax(st.tissue))
    cx, cy = st.coords[i] + st.tile_l0 / 2
    widget.query_layer().add_rectangles([world_of_l0(a, cx - 20, cy - 20),
                                         world_of_l0(a, cx + 20, cy + 20)])  # fmt: skip
    widget.synchronous = True
    widget._search.native.click()
    widget.synchronous = synchronous
    assert widget.last_result is not None, widget._status.value
    widget._folder.value = cohort
    return a, widget


def core_search(widget, cohort: Path, k: int, per_slide: int | None = None):
    """The core's answer for the widget's last query (the query tiles left out, as there)."""
    res = widget.last_result
    return search_folder(res.query, cohort, model=res.model, k=k, per_slide=per_slide,
                         exclude={res.request.store_path: res.query_idx})  # fmt: skip


def table(widget) -> list[list]:
    return [list(r) for r in widget._results.data]


# -- results ------------------------------------------------------------------------------------
def test_other_slides_are_searched_through_the_index(make_napari_viewer, two_slides, cohort):
    """The first search builds the folder's index (a bar in the activity panel); the matches
    are the core's for the same query; a double-click on a match of b opens b there."""
    a_path, b_path, _ = two_slides
    viewer = shown_viewer(make_napari_viewer)
    a, widget = search_a(viewer, a_path, cohort)
    assert widget._per_slide.value == 0 and not widget._cancel_folder.enabled
    widget._k.value = 25
    values, disconnect = watch_bars("Indexing")
    try:
        widget._search_folder.native.click()
    finally:
        disconnect()
    settle()
    total = sum(EmbeddingStore.open(p).n_done for p in sorted(cohort.glob("*.zarr")))
    assert values and values[-1] == (total, total), values  # the index was built, rows counted
    assert no_bar_left("Indexing")
    index = cohort / "tilescope-index"
    (path,) = index.glob("index-*.zarr")
    assert sorted(e.path for e in read_manifest(path).stores) == [
        "a.zarr", "b.zarr", "c.zarr", "d.zarr", "e.zarr"]  # fmt: skip
    want = core_search(widget, cohort, 25)
    assert widget.other_matches == want.matches and len(want.matches) == 25
    assert table(widget) == [[m.slide_name, m.x, m.y, f"{m.similarity:.3f}"]
                             for m in want.matches]  # fmt: skip
    status = widget._status.value
    assert status.startswith("25 matches on ") and "5 stores through the index" in status
    assert "read directly" not in status and "approximate" not in status
    assert widget._search_folder.enabled and not widget._cancel_folder.enabled

    # the index never shows up as a store: pickers and catalog scans list the stores only
    assert [p.name for p in find_stores(cohort, recursive=True)] == [
        "a.zarr", "b.zarr", "c.zarr", "d.zarr", "e.zarr"]  # fmt: skip
    assert stores_for_slide(a_path, [cohort, index, path]) == [cohort / "a.zarr"]
    assert [v for v in widget._store._combo.choices] == [cohort / "a.zarr"]

    row = next(k for k, m in enumerate(widget.other_matches) if m.slide_name == "b.tif")
    m = widget.other_matches[row]
    widget._results.native.cellDoubleClicked.emit(row, 0)
    settle()
    opened = [ly for ly in viewer.layers
              if ly.metadata.get("tilescope", {}).get("path") == str(b_path)]  # fmt: skip
    assert len(opened) == 1, widget._status.value
    want_centre = world_of_l0(opened[0], m.x + m.tile_l0 / 2, m.y + m.tile_l0 / 2)
    assert camera_of(viewer).center[-2:] == pytest.approx(want_centre)
    assert widget._status.value.startswith(f"match {row + 1} of the other slides: b.tif")
    assert_fits(viewer)


def test_per_slide_cap(make_napari_viewer, two_slides, cohort):
    viewer = shown_viewer(make_napari_viewer)
    _, widget = search_a(viewer, two_slides[0], cohort)
    widget._k.value = 12
    widget._search_folder.native.click()
    uncapped = [m.store for m in widget.other_matches]
    assert max(uncapped.count(s) for s in uncapped) > 2  # without a cap one slide takes more
    widget._per_slide.value = 2
    widget._search_folder.native.click()
    got = widget.other_matches
    assert got == core_search(widget, cohort, 12, per_slide=2).matches
    stores = [m.store for m in got]
    assert len(got) == 10 and max(stores.count(s) for s in stores) == 2  # 5 slides x 2
    assert "at most 2 per slide" in widget._status.value


def test_a_store_added_after_a_search_is_found_by_the_next(make_napari_viewer, two_slides, cohort):
    viewer = shown_viewer(make_napari_viewer)
    _, widget = search_a(viewer, two_slides[0], cohort)
    widget._search_folder.native.click()
    (path,) = (cohort / "tilescope-index").glob("index-*.zarr")
    gen = read_manifest(path).generation
    model = widget.last_result.model
    emb = like(EmbeddingStore.open(cohort / "a.zarr"), 7)
    emb[30] = widget.last_result.query  # the best match there can be
    grid_store(cohort / "f.zarr", emb, full_grid(6, 8), slide="f.svs", **model)
    widget._search_folder.native.click()
    best = widget.other_matches[0]
    assert (Path(best.store).name, best.index) == ("f.zarr", 30)
    assert best.similarity == pytest.approx(1.0, abs=1e-3)
    man = read_manifest(path)
    assert "f.zarr" in {e.path for e in man.stores} and man.generation == gen  # appended
    assert "6 stores through the index" in widget._status.value
    assert widget.other_matches == core_search(widget, cohort, 10).matches

    # a partial store is read directly, and the widget says so
    part = grid_store(cohort / "g.zarr", emb, full_grid(6, 8), slide="g.svs",
                      done=np.arange(48) < 40, complete=False, **model)  # fmt: skip
    widget._search_folder.native.click()
    assert "1 read directly" in widget._status.value and "g.zarr" in widget._status.value
    assert "partial" in widget._status.value
    assert ("g.zarr", 30) in {(Path(m.store).name, m.index) for m in widget.other_matches}
    assert "g.zarr" not in {e.path for e in read_manifest(path).stores}
    assert part.n_todo == 8


# -- cancel -------------------------------------------------------------------------------------
def test_cancel_during_the_index_build_leaves_a_usable_index(
    make_napari_viewer, qtbot, monkeypatch, two_slides, cohort
):
    """Cancel while the third store is read: the index keeps a and b, is searchable, and the
    next search goes on from there."""
    from tilescope.index import _append

    real = _append.store_blocks
    reading: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def gated(found, model):
        st, blocks = real(found, model)

        def rows():
            reading.append(found.rel)
            if len(reading) == 3:
                entered.set()
                release.wait(30)
            yield from blocks

        return st, rows()

    monkeypatch.setattr(_append, "store_blocks", gated)
    viewer = shown_viewer(make_napari_viewer)
    _, widget = search_a(viewer, two_slides[0], cohort, synchronous=False)
    values, disconnect = watch_bars("Indexing")
    try:
        widget._search_folder.native.click()
        qtbot.waitUntil(entered.is_set, timeout=60_000)
        settle(200)
        assert widget._cancel_folder.enabled and not widget._search_folder.enabled
        assert widget._status.value.startswith("indexing cohort: ")  # rows of a and b written
        widget._cancel_folder.native.click()
        assert widget._status.value.startswith("cancelling")
        release.set()
        qtbot.waitUntil(lambda: widget._search_folder.enabled, timeout=60_000)
        settle()
    finally:
        release.set()
        disconnect()
    status = widget._status.value
    assert status.startswith("search cancelled"), status
    assert "holds 2 of the 5 complete stores (2 added now)" in status
    assert values and no_bar_left("Indexing")
    assert not widget._cancel_folder.enabled

    (path,) = (cohort / "tilescope-index").glob("index-*.zarr")
    ix = CohortIndex(path)  # usable: a and b, every row of theirs
    assert sorted(e.path for e in ix.manifest.stores) == ["a.zarr", "b.zarr"]
    n_ab = sum(EmbeddingStore.open(cohort / n).n_done for n in ("a.zarr", "b.zarr"))
    assert ix.manifest.n_rows == ix.manifest.n_live == n_ab
    q = widget.last_result.query
    got = search_index(path, q, k=8)
    model = widget.last_result.model
    direct = search_stores(q, [cohort / "a.zarr", cohort / "b.zarr"], model=model, k=8)
    assert [m.similarity for m in got] == pytest.approx([m.similarity for m in direct], abs=2e-3)

    monkeypatch.setattr(_append, "store_blocks", real)
    widget._search_folder.native.click()  # goes on from there
    qtbot.waitUntil(lambda: widget._search_folder.enabled and bool(widget.other_matches),
                    timeout=60_000)  # fmt: skip
    assert sorted(e.path for e in read_manifest(path).stores) == [
        "a.zarr", "b.zarr", "c.zarr", "d.zarr", "e.zarr"]  # fmt: skip
    assert widget.other_matches == core_search(widget, cohort, 10).matches
