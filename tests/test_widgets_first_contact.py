"""What a new user meets in the first ten minutes (issue 10), as napari builds the widgets, in a
shown 1600 x 1000 window: long errors, messages worded for the widgets, progress, Cancel while
the model loads or tissue is found, stores found after a restart, several slides side by side,
a match on another slide, and a slide opened by napari's built-in reader.

Small synthetic slides (tiny untrained model) keep it quick; the real TCGA slide (no pixel size
recorded) and the CMU slide are used where their properties matter.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _paths import CMU, TCGA, need
from napari_helpers import (
    WIDGETS,
    assert_fits,
    cell_value,
    dock,
    no_bar_left,
    notifications,
    settle,
    shown_viewer,
    watch_bars,
    world_of_l0,
)

from tilescope._napari import _embed_widget, _stores
from tilescope._napari._common import camera_of, get_encoder
from tilescope._napari._messages import MAX_STATUS_CHARS
from tilescope.embed import EmbedProgress, embed_slides
from tilescope.grid import TileGrid
from tilescope.store import EmbeddingStore
from tilescope.synthetic import SyntheticSlide

pytestmark = pytest.mark.napari

FLAG = re.compile(r"(?<![\w-])--[a-z]")
GRID = TileGrid(target_mpp=0.5, tile_px=224)


@pytest.fixture(autouse=True)
def empty_stores(monkeypatch, tmp_path):
    monkeypatch.setenv("TILESCOPE_STORES", str(tmp_path / "default-stores"))
    monkeypatch.setattr(_stores, "_SESSION_FOLDERS", [])


def synthetic(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return SyntheticSlide.with_random_blobs(1120, 896, mpp=0.5, n=3, seed=seed).write(path)


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory):
    """a.tif and b.tif in one folder, embedded into one stores folder (no layer knows it)."""
    root = tmp_path_factory.mktemp("two")
    a, b = synthetic(root / "slides" / "a.tif", 1), synthetic(root / "slides" / "b.tif", 2)
    stores = root / "stores"
    embed_slides([a, b], stores, encoder=get_encoder("tiny-random"), grid=GRID, batch_size=32)
    return a, b, stores


def no_flags(texts) -> None:
    for text in texts:
        assert not FLAG.search(text), f"a GUI message names a CLI flag: {text!r}"


# -- long errors, words ---------------------------------------------------------------------------
def test_long_errors_keep_the_window_and_name_the_widgets_fields(
    make_napari_viewer, monkeypatch, tmp_path
):
    """Embed with the default model offline (no BiomedCLIP weights), a slide without pixel
    size, a store made with other settings: long messages, in a window with every dock open.
    The window stays 1600 x 1000, the canvas keeps its room, the status lines stay short, the
    notifications hold the whole message, and no message names a CLI flag."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    slide = synthetic(tmp_path / "s.tif", 5)
    viewer = shown_viewer(make_napari_viewer)
    layer = viewer.open(str(slide), plugin="tilescope")[0]
    with pytest.warns(UserWarning, match="does not record its pixel size"):
        tcga = viewer.open(str(need(TCGA)), plugin="tilescope")[0]
    widgets = {name: dock(viewer, name) for name in WIDGETS}
    assert_fits(viewer)
    embed = widgets["Embed slide"]
    embed._slide.value = layer
    embed._out_dir.value = tmp_path / "stores"
    embed._run.native.click()  # biomedclip: not on this machine
    status = embed._status.value
    assert "In 'model', type the path of a folder" in status and "tiny-random" in status
    assert "Ways to supply" not in status  # the CLI's help (with its flags) is not shown
    assert len(embed._status.displayed) <= MAX_STATUS_CHARS + 30
    assert status.removeprefix("error: ") in notifications()[-1]
    assert_fits(viewer)

    embed._slide.value = tcga  # no pixel size: refused before any model loads
    embed._model.value = "tiny-random"
    embed._run.native.click()
    assert "type the slide's pixel size in 'slide µm/px'" in embed._status.value.lower()
    assert not (tmp_path / "stores" / "tcga-cr-7395-01a-01-ts1.zarr").exists()

    embed._slide.value = layer
    embed._run.native.click()
    assert embed.last_result is not None and embed.last_result.complete
    embed._tile.value = 256  # other settings: refused, with the widget's own box named
    embed._run.native.click()
    assert "tile_px" in embed._status.value
    assert "tick 'overwrite a store made with other settings'" in embed._status.value
    assert_fits(viewer)
    no_flags([w._status.value for w in widgets.values()])
    no_flags(notifications())


# -- progress -------------------------------------------------------------------------------------
def test_progress_bar_reaches_its_total_and_no_bar_is_left(make_napari_viewer, qtbot, tmp_path):

    slide = synthetic(tmp_path / "p.tif", 6)
    viewer = shown_viewer(make_napari_viewer)
    viewer.open(str(slide), plugin="tilescope")
    embed = dock(viewer, "Embed slide", synchronous=False)
    embed._model.value = "tiny-random"
    embed._tile.value = 64  # small tiles: several batches of 16
    embed._out_dir.value = tmp_path / "stores"
    values, disconnect = watch_bars("Embedding")
    try:
        embed._run.native.click()
        qtbot.waitUntil(lambda: embed._run.enabled, timeout=120_000)
        final = embed._status.value
        n = EmbeddingStore.open(embed.last_result.store_path).n_tiles
        # the activity panel saw it (a value set while the bar's own callback processes Qt
        # events can be recorded after the later one it let in: compare the highest)
        assert len(values) > 1 and max(values) == (n, n), values
        assert final.startswith(f"{n} tiles in p.zarr (complete)")

        embed._run.native.click()  # the same store again: reused, nothing to embed
        qtbot.waitUntil(lambda: embed._run.enabled, timeout=60_000)
        settle()
    finally:
        disconnect()
    assert no_bar_left("Embedding")
    final = embed._status.value
    late = EmbedProgress("p.tif", "embedding", 3, n, 1.0, 0.0)
    embed._on_progress(embed._active, late)  # a report arriving after the run ended
    assert embed._status.value == final


def test_resumed_runs_report_this_runs_rate(capsys):
    """A store resumed at 5000 of 5100 tiles: the bars count this run's tiles (16 in 0.2 s),
    not 5000 tiles in a few milliseconds."""
    from tilescope._napari._common import RunProgress
    from tilescope.cli._common import ProgressBar

    cli = ProgressBar("s.svs")
    cli.update(EmbedProgress("s.svs", "embedding", 5000, 5100, 0.0, 0.0))
    time.sleep(0.2)
    cli.update(EmbedProgress("s.svs", "embedding", 5016, 5100, 0.2, 80.0))
    rate = (
        cli.bar.format_dict["rate"]
        or (cli.bar.n - cli.bar.initial) / cli.bar.format_dict["elapsed"]
    )
    cli.close()
    assert 10 < rate < 1000, rate
    gui = RunProgress("Embedding s.svs")
    gui.update(5000, 5100)
    time.sleep(0.2)
    gui.update(5016, 5100)
    fd = gui.bar.format_dict
    rate = fd["rate"] or (fd["n"] - fd["initial"]) / fd["elapsed"]
    gui.close()
    assert gui.bar is None and 10 < rate < 1000, rate
    capsys.readouterr()


def test_reports_arriving_while_the_bar_is_made_make_no_second_bar(monkeypatch):
    """Making napari's bar processes Qt events, which may deliver the next report: it must
    update the bar being made, not make another one (left behind at 0%)."""
    import napari.utils

    from tilescope._napari._common import RunProgress

    real = napari.utils.progress
    made = []
    gui = RunProgress("Embedding s.svs")

    def reentrant(*args, **kwargs):
        gui.update(40, 100)  # a report delivered while the first bar is being made
        bar = real(*args, **kwargs)
        made.append(bar)
        return bar

    monkeypatch.setattr(napari.utils, "progress", reentrant)
    gui.update(10, 100)
    assert len(made) == 1 and gui.bar is made[0]
    assert gui.bar.n == 40  # the latest report wins
    gui.close()
    assert made[0].n == 40 and gui.bar is None


# -- cancel while the model loads or tissue is found ----------------------------------------------
@pytest.mark.parametrize("stage", ["model", "tissue"])
def test_cancel_during_model_load_and_tissue_detection(
    make_napari_viewer, qtbot, tmp_path, monkeypatch, stage
):
    slide = synthetic(tmp_path / "c.tif", 7)
    release, entered = threading.Event(), threading.Event()
    real_get = _embed_widget.get_encoder

    def slow_encoder(*args):
        entered.set()
        release.wait(30)
        return real_get(*args)

    import tilescope.embed as embed_mod

    real_layout = embed_mod._tissue_layout

    def slow_tissue(*args):
        entered.set()
        release.wait(30)
        return real_layout(*args)

    if stage == "model":
        monkeypatch.setattr(_embed_widget, "get_encoder", slow_encoder)
    else:
        monkeypatch.setattr(embed_mod, "_tissue_layout", slow_tissue)
    viewer = shown_viewer(make_napari_viewer)
    viewer.open(str(slide), plugin="tilescope")
    embed = dock(viewer, "Embed slide", synchronous=False)
    embed._model.value = "tiny-random"
    embed._out_dir.value = tmp_path / "stores"
    embed._run.native.click()
    qtbot.waitUntil(entered.is_set, timeout=60_000)
    settle(200)
    assert embed._cancel.enabled
    embed._cancel.native.click()
    want = "the model has loaded" if stage == "model" else "tissue detection ends"
    assert embed._status.value.startswith("cancelling") and want in embed._status.value
    release.set()
    qtbot.waitUntil(lambda: embed._run.enabled, timeout=60_000)
    assert embed._status.value.startswith("cancelled")
    store = tmp_path / "stores" / "c.zarr"
    assert not store.exists() or EmbeddingStore.open(store).n_done == 0


# -- stores after a restart ---------------------------------------------------------------------
def test_stores_are_found_by_slide_identity_never_by_name(
    make_napari_viewer, tmp_path, monkeypatch
):
    """Two slides called slide.tif, embedded from the command line into the default folder:
    after a restart, the widgets of the second find its store (not the first's), by the file's
    identity; picking the other slide's store is refused."""
    a = synthetic(tmp_path / "one" / "slide.tif", 11)
    b = synthetic(tmp_path / "two" / "slide.tif", 12)
    stores = tmp_path / "stores"
    monkeypatch.setenv("TILESCOPE_STORES", str(stores))
    res_a, res_b = embed_slides([a, b], stores, encoder=get_encoder("tiny-random"), grid=GRID)
    assert res_a.store_path.name == "slide.zarr" and res_b.store_path != res_a.store_path
    viewer = shown_viewer(make_napari_viewer)
    layer = viewer.open(str(b), plugin="tilescope")[0]
    for name in ("Prompt heatmap", "Region search", "Export embeddings", "Tissue classifier"):
        widget = dock(viewer, name)
        assert widget._store.value == res_b.store_path, name
    heat = dock(viewer, "Prompt heatmap")
    heat._run.native.click()
    assert heat.last_result.request.store_path == res_b.store_path
    with pytest.raises(Exception, match="another slide"):
        heat._store.choose(res_a.store_path)
    assert "store" not in layer.metadata["tilescope"]


# -- several slides ----------------------------------------------------------------------------
def test_two_slides_side_by_side_keep_their_own_results_where_they_are(make_napari_viewer,
                                                                       two_slides):  # fmt: skip
    a_path, b_path, stores = two_slides
    viewer = shown_viewer(make_napari_viewer)
    _stores.remember_folder(stores)
    a = viewer.open(str(a_path), plugin="tilescope")[0]
    b = viewer.open(str(b_path), plugin="tilescope")[0]
    (a0, a1), (b0, b1) = (np.asarray(x.extent.world)[:, -2:] for x in (a, b))
    assert b0[1] > a1[1], "the second slide opened on top of the first"
    heat = dock(viewer, "Prompt heatmap")
    heat._slide.value = a
    heat._run.native.click()
    heat._slide.value = b
    heat._run.native.click()
    for slide in ("a", "b"):
        assert f"p(tumor) · {slide} [UNTRAINED]" in viewer.layers  # b did not replace a's

    store = EmbeddingStore.open(stores / "a.zarr")
    layer = viewer.layers["p(tumor) · a [UNTRAINED]"]
    centres = store.coords + store.tile_l0 / 2  # no overlap: one tile per cell

    def values() -> np.ndarray:
        return np.array([cell_value(layer, world_of_l0(a, x, y)) for x, y in centres])

    before = values()
    assert np.all(np.isfinite(before)) and before.std() > 0
    # move slide a (translate, scale, rotate through its affine): its results move with it
    a.translate = (300.0, -200.0)
    a.scale = (0.6, 0.6)
    theta = np.deg2rad(20)
    a.affine = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                         [0, 0, 1]])  # fmt: skip
    np.testing.assert_allclose(values(), before, atol=1e-6)
    heat._slide.value = a
    heat._run.native.click()  # scored again on the moved slide: the same layer, in place
    assert viewer.layers["p(tumor) · a [UNTRAINED]"] is layer
    np.testing.assert_allclose(values(), before, atol=1e-6)
    b_layer = viewer.layers["p(tumor) · b [UNTRAINED]"]
    assert b_layer.metadata["tilescope"]["slide"] == str(b_path)
    assert tuple(b_layer.translate) != tuple(layer.translate)


def test_double_click_on_a_match_of_another_slide_opens_it(make_napari_viewer, two_slides):
    a_path, b_path, stores = two_slides
    viewer = shown_viewer(make_napari_viewer)
    _stores.remember_folder(stores)
    a = viewer.open(str(a_path), plugin="tilescope")[0]
    search = dock(viewer, "Region search")
    st_a = EmbeddingStore.open(stores / "a.zarr")
    i = int(np.argmax(st_a.tissue))
    cx, cy = st_a.coords[i] + st_a.tile_l0 / 2
    search.query_layer().add_rectangles([world_of_l0(a, cx - 20, cy - 20),
                                         world_of_l0(a, cx + 20, cy + 20)])  # fmt: skip
    search._search.native.click()
    search._folder.value = stores
    search._k.value = 40
    search._search_folder.native.click()
    row = next(k for k, m in enumerate(search.other_matches) if m.slide_name == "b.tif")
    m = search.other_matches[row]
    search._results.native.cellDoubleClicked.emit(row, 0)
    settle()
    opened = [ly for ly in viewer.layers if ly.metadata.get("tilescope", {}).get("path")
              == str(b_path)]  # fmt: skip
    assert len(opened) == 1, search._status.value
    b = opened[0]
    assert np.asarray(b.extent.world)[0, -1] > np.asarray(a.extent.world)[1, -1]  # beside
    want = world_of_l0(b, m.x + m.tile_l0 / 2, m.y + m.tile_l0 / 2)
    assert camera_of(viewer).center[-2:] == pytest.approx(want)
    marks = viewer.layers["other-slides matches · b [UNTRAINED]"]  # outlined on slide b
    k = list(marks.features["rank"]).index(row + 1)
    box = np.array([marks.data_to_world(v) for v in marks.data[k]])
    assert box.mean(0) == pytest.approx(want)
    assert list(marks.edge_color[k]) == [1.0, 0.0, 1.0, 1.0]  # the current one, in magenta
    search._results.native.cellDoubleClicked.emit(row, 0)  # again: not opened twice
    assert len([ly for ly in viewer.layers if ly.name == b.name]) == 1


def test_a_slide_opened_by_the_builtin_reader_is_recognised(make_napari_viewer, tmp_path):
    """`viewer.open(path)` uses napari's own reader (its default is plugin='napari'): the
    widgets say so instead of "open a slide first", and offer to open it with Tilescope."""
    from napari.utils.notifications import notification_manager

    slide = synthetic(tmp_path / "d.tif", 9)
    viewer = shown_viewer(make_napari_viewer)
    heat = dock(viewer, "Prompt heatmap")
    (layer,) = viewer.open(str(slide))
    assert layer.source.reader_plugin != "tilescope"
    heat._run.native.click()
    assert "opened by napari's built-in reader" in heat._status.value
    offer = next(n for n in reversed(notification_manager.records) if n.actions)
    ((text, callback),) = offer.actions
    assert text == "Re-open with Tilescope"
    callback(None)
    settle()
    names = [ly.name for ly in viewer.layers]
    assert names == ["d.tif"] and viewer.layers[0].metadata["tilescope"]["path"] == str(slide)
    assert heat._slide.value is not None


def test_a_slide_without_pixel_size_is_placed_in_um_once_given(make_napari_viewer, tmp_path):
    viewer = shown_viewer(make_napari_viewer)
    cmu = viewer.open(str(need(CMU)), plugin="tilescope")[0]
    with pytest.warns(UserWarning, match="slide µm/px"):
        tcga = viewer.open(str(need(TCGA)), plugin="tilescope")[0]
    assert tuple(tcga.scale) == (1.0, 1.0)
    embed = dock(viewer, "Embed slide")
    embed._slide.value = tcga
    embed._slide_mpp.value = 0.25
    assert tuple(tcga.scale) == (0.25, 0.25) and str(tcga.units[0]) == "micrometer"
    (c0, c1), (t0, t1) = (np.asarray(x.extent.world)[:, -2:] for x in (cmu, tcga))
    assert t0[1] > c1[1]  # beside the CMU slide, in µm
    assert embed.request().slide_mpp == 0.25


def test_draw_buttons_without_a_slide_say_so_and_add_no_layer(make_napari_viewer):
    """Pressing Draw (search, its 'not like this', embed regions) or Add class before any slide
    is open: nothing to draw on, so no empty shapes layer (in pixels, beside slides in µm
    later), and the widget says to open a slide."""
    from tilescope._napari._viewfirst import REGIONS_ONLY

    viewer = shown_viewer(make_napari_viewer)
    widgets = {name: dock(viewer, name) for name in WIDGETS}
    search, embed = widgets["Region search"], widgets["Embed slide"]
    classify = widgets["Tissue classifier"]
    embed._mode.value = REGIONS_ONLY  # enables its Draw regions button
    presses = [(search, search._draw), (search, search._draw_negative),
               (embed, embed._draw_regions), (classify, classify._add_class)]  # fmt: skip
    for widget, button in presses:
        assert button.enabled
        button.native.click()
        settle()
        assert widget._status.value.startswith("error: open a slide first"), button.text
    search._search_folder.native.click()
    assert search._status.value.startswith("error: open a slide first")
    assert list(viewer.layers) == []
    assert_fits(viewer)
