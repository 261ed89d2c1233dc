"""The widgets as napari builds them (Plugins menu path, viewer proxy, a shown 1600 x 1000
window) on the CMU slide (needs an X server: run under xvfb-run).

One store of the CMU slide (tiny untrained model, 224 px tiles overlapping by 112 px) is embedded
once per module, without napari, into a stores folder the widgets find by the slide's identity.
Geometry is checked through the slide layer's own data-to-world transform: level-0 corner
coordinate u is the layer's data index u - 0.5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from _paths import CMU, need
from napari_helpers import (
    WIDGETS,
    assert_fits,
    cell_value,
    dock,
    notifications,
    settle,
    shown_viewer,
    world_of_l0,
)

from tilescope._napari import _stores
from tilescope._napari._common import camera_of, get_encoder
from tilescope._napari._embed_widget import EmbedWidget
from tilescope._napari._heatmap_widget import DEFAULT_PROMPTS, PromptHeatmapWidget
from tilescope._napari._search_widget import RegionSearchWidget
from tilescope.embed import embed_slide
from tilescope.figures import ColorScale
from tilescope.grid import TileGrid
from tilescope.score import PromptSet, score_patches, text_matrix
from tilescope.search import tiles_in_shapes
from tilescope.store import EmbeddingStore

pytestmark = pytest.mark.napari

CLASSES = ["tumor", "stroma", "lymphocytes", "background"]
TAG = " · CMU-1-Small-Region [UNTRAINED]"


@pytest.fixture(autouse=True)
def empty_stores(monkeypatch, tmp_path):
    """Each test starts with an empty default stores folder and no folders remembered."""
    monkeypatch.setenv("TILESCOPE_STORES", str(tmp_path / "default-stores"))
    monkeypatch.setattr(_stores, "_SESSION_FOLDERS", [])


@pytest.fixture(scope="module")
def cmu_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CMU slide embedded once with the tiny model, 224 px tiles overlapping by 112 px."""
    out = tmp_path_factory.mktemp("stores") / "CMU-1-Small-Region.zarr"
    grid = TileGrid(target_mpp=0.5, tile_px=224, overlap_px=112)
    embed_slide(need(CMU), out, encoder=get_encoder("tiny-random"), grid=grid, batch_size=32)
    return out


@pytest.fixture
def viewer_cmu(make_napari_viewer, cmu_store, monkeypatch):
    """A shown 1600 x 1000 viewer with the CMU slide; its store is in the default folder (as
    `tilescope embed` leaves it), not recorded on the layer: the widgets find it."""
    monkeypatch.setenv("TILESCOPE_STORES", str(cmu_store.parent))
    viewer = shown_viewer(make_napari_viewer)
    slide = viewer.open(str(CMU), plugin="tilescope")[0]
    assert "store" not in slide.metadata["tilescope"]
    return viewer, slide, EmbeddingStore.open(cmu_store)


def covering_mean(values, coords, tile_l0, x, y) -> tuple[float, int]:
    """Mean of `values` over the tiles whose area [x0, x0 + T) x [y0, y0 + T) holds (x, y)."""
    inside = np.all((coords <= (x, y)) & ((x, y) < coords + tile_l0), axis=1)
    return float(np.mean(values[inside])), int(inside.sum())


def tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    """Pixels that look like H&E tissue (pink/purple, not white, not black)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (r - g > 25) & (b - g > 5) & (r < 250)


def expected_probs(store: EmbeddingStore, prompts: str, templates: list[str]) -> np.ndarray:
    """Patch probabilities computed directly with the core (no widget)."""
    enc = get_encoder("tiny-random")
    text = text_matrix(PromptSet.parse(prompts, templates=templates), enc.encode_text)
    return score_patches(store.embeddings, text, enc.logit_scale).probs


# -- heatmaps -----------------------------------------------------------------------------------
def test_heatmap_places_each_tile_on_its_cell_and_finds_the_cli_store(viewer_cmu, qtbot):
    viewer, slide, store = viewer_cmu
    widget = dock(viewer, "Prompt heatmap", synchronous=False)
    assert isinstance(widget, PromptHeatmapWidget)
    assert widget._store.value == store.path  # found by the slide's identity, not recorded
    widget._run.native.click()  # the worker path
    qtbot.waitUntil(lambda: widget.last_result is not None and widget._run.enabled, timeout=60_000)
    names = [layer.name for layer in viewer.layers]
    for c in CLASSES:
        assert f"p({c}){TAG}" in names
    assert f"winning class{TAG}" in names
    result = widget.last_result
    assert f"Slide label: {result.pooled.label}</b> (attention" in widget._slide_label.value
    assert "UNTRAINED" in widget._slide_label.value
    assert list(widget._table.row_headers) == CLASSES

    probs = expected_probs(store, DEFAULT_PROMPTS, ["an H&E image of {}"])
    layer = viewer.layers[f"p(stroma){TAG}"]
    checked_four = 0
    for i in range(0, store.n_tiles, 9):  # a quarter of tile i; covered by up to 4 tiles
        x, y = store.coords[i] + store.tile_l0 / 4
        want, n = covering_mean(probs[:, 1], store.coords, store.tile_l0, x, y)
        assert cell_value(layer, world_of_l0(slide, x, y)) == pytest.approx(want, abs=1e-5)
        checked_four += n == 4
    assert checked_four > 3


def test_rescore_updates_in_place_and_keeps_the_users_styling(viewer_cmu):
    """Re-scoring from the Plugins menu widget removes and adds no layer (each removal costs
    napari a garbage collection) and keeps what the user set: opacity, colormap, visibility,
    contrast limits, and the winning-class colours."""
    viewer, slide, store = viewer_cmu
    widget = dock(viewer, "Prompt heatmap")
    widget._run.native.click()
    stroma = viewer.layers[f"p(stroma){TAG}"]
    shown = viewer.layers[f"p({widget.last_result.pooled.label}){TAG}"]
    assert shown.visible and shown.colormap.name == "inferno"
    stroma.opacity, stroma.colormap, stroma.visible = 0.9, "viridis", True
    stroma.contrast_limits = (0.2, 0.3)
    labels = viewer.layers[f"winning class{TAG}"]
    labels.opacity = 0.8
    before = {ly.name: ly for ly in viewer.layers}
    events: list[str] = []
    viewer.layers.events.removed.connect(lambda e: events.append(f"removed {e.value.name}"))
    viewer.layers.events.inserted.connect(lambda e: events.append(f"inserted {e.value.name}"))

    widget._templates.value = "a photomicrograph of {}; {}"
    encoder = get_encoder("tiny-random")

    def no_image_tower(*_: object) -> None:
        raise AssertionError("re-scoring ran the image tower; it must use stored embeddings")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encoder, "encode_images", no_image_tower)
        mp.setattr(encoder, "submit_images", no_image_tower)
        widget._run.native.click()
    assert events == []
    assert {ly.name: ly for ly in viewer.layers} == before  # the same layer objects
    assert stroma.opacity == pytest.approx(0.9) and stroma.colormap.name == "viridis"
    assert stroma.visible and tuple(stroma.contrast_limits) == pytest.approx((0.2, 0.3))
    assert labels.opacity == pytest.approx(0.8)
    probs2 = expected_probs(store, DEFAULT_PROMPTS, ["a photomicrograph of {}", "{}"])
    i = int(np.argmax(store.tissue))
    x, y = store.coords[i] + store.tile_l0 / 4
    want, _ = covering_mean(probs2[:, 1], store.coords, store.tile_l0, x, y)
    assert cell_value(stroma, world_of_l0(slide, x, y)) == pytest.approx(want, abs=1e-5)

    # a renamed class: its layer goes, the new one comes; the rest stay in place
    widget._prompts.value = DEFAULT_PROMPTS.replace("background: ", "necrosis: ")
    widget._run.native.click()
    assert f"p(background){TAG}" not in viewer.layers and f"p(necrosis){TAG}" in viewer.layers
    assert viewer.layers[f"p(stroma){TAG}"] is stroma
    assert list(labels.features["class"]) == widget.last_result.classes
    att = widget.last_result.pooled.attention
    assert att is not None and att.sum(0) == pytest.approx(1.0, abs=1e-4)


def test_heatmap_is_visible_over_tissue(viewer_cmu):
    viewer, slide, _ = viewer_cmu
    widget = dock(viewer, "Prompt heatmap")
    widget._pooling.value = "mean"
    widget._save.value = True
    widget._save_name.value = "demo"
    widget._run.native.click()
    assert "demo" in EmbeddingStore.open(widget._store.value).score_names()
    for layer in viewer.layers:
        layer.visible = layer is slide or layer.name == slide.name
    viewer.reset_view()
    before = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    viewer.layers[f"p(tumor){TAG}"].visible = True
    after = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    assert after.std() > 10, "blank screenshot"
    changed = np.abs(after - before).sum(-1) > 30
    tissue = tissue_pixels(before)
    assert tissue.mean() > 0.05
    assert changed[tissue].mean() > 0.85, "heatmap does not cover the tissue"
    glass = (before.min(-1) > 225) & ~changed
    assert glass.mean() > 0.05, "heatmap covers glass far from any tile (NaN must be clear)"


def test_score_table_and_legend_say_what_colours_mean(viewer_cmu):
    """Each class's row carries the colour of its label in the winning-class layer (as the
    layer draws it, after the user recolours it too); the legend gives the heatmaps' scale,
    the same text as the PNGs (`ColorScale.probability`)."""
    from qtpy.QtGui import QColor

    viewer, _, _ = viewer_cmu
    widget = dock(viewer, "Prompt heatmap")
    widget._run.native.click()
    labels = viewer.layers[f"winning class{TAG}"]

    def swatch(r: int) -> tuple[int, int, int]:
        img = widget._table.native.verticalHeaderItem(r).icon().pixmap(12, 12).toImage()
        c = QColor(img.pixel(6, 6))
        return c.red(), c.green(), c.blue()

    for r in range(len(CLASSES)):
        rgba = np.asarray(labels.colormap.map(np.array([r + 1]))).reshape(-1)
        assert swatch(r) == tuple(int(round(255 * v)) for v in rgba[:3])
    assert len({swatch(r) for r in range(len(CLASSES))}) == len(CLASSES)
    legend = ColorScale.probability().legend()
    assert legend in widget._legend.value and "fixed scale: 0 (black) to 1 (yellow)" in legend
    heat = viewer.layers[f"p(tumor){TAG}"]
    assert heat.colormap.name == "inferno" and tuple(heat.contrast_limits) == (0.0, 1.0)
    assert heat.metadata["tilescope"]["legend"] == legend


def test_heatmap_rescores_as_you_type(viewer_cmu, qtbot):
    viewer, _, _ = viewer_cmu
    widget = dock(viewer, "Prompt heatmap", synchronous=False)
    widget._live.value = True
    widget._prompts.value = "necrosis: necrotic debris\nnormal: benign tissue"
    qtbot.waitUntil(lambda: widget.last_result is not None, timeout=20_000)
    assert widget.last_result.classes == ["necrosis", "normal"]
    assert f"p(necrosis){TAG}" in viewer.layers


@pytest.mark.parametrize("name", WIDGETS)
def test_widgets_open_from_the_plugin_menu_and_fit(make_napari_viewer, name):
    viewer = shown_viewer(make_napari_viewer)
    widget = dock(viewer, name)
    assert type(widget).__name__ in ("EmbedWidget", "PromptHeatmapWidget",
                                     "RegionSearchWidget", "ExportWidget",
                                     "TissueClassifierWidget")  # fmt: skip
    assert_fits(viewer)


def test_export_widget_writes_plain_zarr_and_geojson(viewer_cmu, tmp_path):
    viewer, _, store = viewer_cmu
    widget = dock(viewer, "Export embeddings")
    assert widget._out.value == store.path.parent / "exports" / "CMU-1-Small-Region.zarr"
    widget._out.value = tmp_path / "out.zarr"
    widget._dtype.value = "float32"
    widget._run.native.click()
    assert widget.last_output == tmp_path / "out.zarr"
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert group["embeddings"].dtype == np.float32
    np.testing.assert_allclose(group["embeddings"][:], store.embeddings, atol=1e-6)
    np.testing.assert_array_equal(group["coords"][:], store.coords)

    widget._format.value = "geojson"
    assert widget._out.value == tmp_path / "out.geojson"
    widget._run.native.click()
    features = json.loads((tmp_path / "out.geojson").read_text())["features"]
    assert len(features) == store.n_tiles

    widget._format.value = "zarr"
    widget._run.native.click()  # exists, no overwrite: worded for the widget's own box
    status = widget._status.value
    assert status.startswith("error:") and "out.zarr" in status
    assert "tick 'overwrite an existing output'" in status and "--" not in status


# -- region search ------------------------------------------------------------------------------
def draw_around_tile(widget, slide, store, i: int, half: float = 20.0):
    """A small rectangle (world µm) around tile i's centre: only its centre is inside."""
    cx, cy = store.coords[i] + store.tile_l0 / 2
    corners = [world_of_l0(slide, cx - half, cy - half), world_of_l0(slide, cx + half, cy + half)]
    widget.query_layer().add_rectangles(np.array(corners))


def test_region_search_finds_the_drawn_tile_and_steps_through_matches(viewer_cmu, qtbot):
    viewer, slide, store = viewer_cmu
    widget = dock(viewer, "Region search")
    assert isinstance(widget, RegionSearchWidget)
    assert "Tilescope query" in viewer.layers
    assert widget._exclude.value is True  # the query tiles are left out by default, as on the CLI
    widget._exclude.value = False  # here: the drawn tile must come back as match 1
    i = int(np.argmax(store.tissue))
    draw_around_tile(widget, slide, store, i)
    widget._search.native.click()
    res = widget.last_result
    assert res is not None and list(res.query_idx) == [i]
    assert res.match_idx[0] == i and res.match_sim[0] == pytest.approx(1.0, abs=1e-5)

    matches = viewer.layers[f"matches{TAG}"]
    assert len(matches.data) == 10
    x, y = store.coords[i]
    t = store.tile_l0
    corners = [world_of_l0(slide, *p) for p in [(x, y), (x + t, y), (x + t, y + t), (x, y + t)]]
    drawn = np.array([matches.data_to_world(v) for v in matches.data[0]])
    np.testing.assert_allclose(np.sort(drawn, 0), np.sort(np.array(corners), 0), atol=1e-6)
    first = matches.features.iloc[0]
    assert (first["rank"], first["x"], first["y"]) == (1, x, y)
    assert first["slide"] == "CMU-1-Small-Region.svs"

    sims = store.embeddings @ store.embeddings[i]
    layer = viewer.layers[f"similarity{TAG}"]
    for j in range(0, store.n_tiles, 23):
        px, py = store.coords[j] + t / 4
        want, _ = covering_mean(sims, store.coords, t, px, py)
        assert cell_value(layer, world_of_l0(slide, px, py)) == pytest.approx(want, abs=1e-4)
    scale = ColorScale.stretched(layer.data)  # turbo, stretched: as the PNG draws it
    assert layer.colormap.name == "turbo"
    assert tuple(layer.contrast_limits) == pytest.approx(scale.limits)
    assert widget._legend.value.endswith(scale.legend())

    def centre(k: int) -> np.ndarray:
        return world_of_l0(slide, *(store.coords[res.match_idx[k]] + t / 2))

    assert camera_of(viewer).center[-2:] == pytest.approx(centre(0))
    widget._next.native.click()
    assert camera_of(viewer).center[-2:] == pytest.approx(centre(1))
    assert widget._match.value.startswith("match 2/10")
    widget._prev.native.click()
    assert camera_of(viewer).center[-2:] == pytest.approx(centre(0))

    canvas = viewer.window._qt_viewer.canvas.native  # the keys, pressed over the canvas
    canvas.setFocus()
    qtbot.keyClick(canvas, ".")
    assert widget._match.value.startswith("match 2/10")
    qtbot.keyClick(canvas, ".")
    assert widget._match.value.startswith("match 3/10")
    qtbot.keyClick(canvas, ",")
    assert camera_of(viewer).center[-2:] == pytest.approx(centre(1))

    j = int(res.match_idx[1])  # 'not like this' around the second match pushes it down
    cx, cy = store.coords[j] + t / 2
    negative = widget.query_layer("Tilescope not like this")
    negative.add_rectangles(
        np.array([world_of_l0(slide, cx - 9, cy - 9), world_of_l0(slide, cx + 9, cy + 9)])
    )
    assert widget._negative.value.name == negative.name
    widget._neg_weight.value = 1.0  # the untrained model's tiles are near-identical: push hard
    widget._search.native.click()
    assert widget.last_result.request.negative
    sim_j = float(store.embeddings[j] @ widget.last_result.query)
    assert sim_j < res.match_sim[1] - 0.01
    widget._negative.value = None

    widget._exclude.value = True  # leave the query out: the best match is another tile
    widget._search.native.click()
    assert i not in widget.last_result.match_idx
    best = widget.last_result.match_idx[0]
    assert matches.features["rank"].tolist() == list(range(1, 11))  # updated in place
    assert (matches.features["x"][0], matches.features["y"][0]) == tuple(store.coords[best])
    assert len([ly for ly in viewer.layers if ly.name.startswith("matches")]) == 1


def test_region_over_glass_is_a_message_not_an_exception(viewer_cmu, qtbot):
    viewer, slide, store = viewer_cmu
    widget = dock(viewer, "Region search")
    widget._search.native.click()  # nothing drawn yet
    assert "draw a region" in widget._status.value
    corner = np.array([world_of_l0(slide, 2, 2), world_of_l0(slide, 60, 60)])
    corner_l0 = [np.array([[2, 2], [60, 60]])]
    assert tiles_in_shapes(store.coords, store.tile_l0, corner_l0).size == 0  # only glass
    widget.query_layer().add_rectangles(corner)
    widget.synchronous = False  # through the worker
    widget._search.native.click()
    qtbot.waitUntil(lambda: widget._search.enabled, timeout=10_000)
    assert "covers no embedded tissue tiles" in widget._status.value
    assert "covers no embedded tissue tiles" in notifications()[-1]
    assert widget.last_result is None

    draw_around_tile(widget, slide, store, int(np.argmax(store.tissue)))  # still usable
    widget._search.native.click()
    qtbot.waitUntil(lambda: widget.last_result is not None, timeout=10_000)


def test_search_other_slides_and_refuse_other_models(viewer_cmu, tmp_path):
    viewer, slide, store = viewer_cmu
    widget = dock(viewer, "Region search")
    widget._exclude.value = False  # the drawn tile is match 1 on its own slide
    i = int(np.argmax(store.tissue))
    draw_around_tile(widget, slide, store, i)
    widget._search.native.click()
    widget._folder.value = store.path.parent
    widget._search_folder.native.click()
    assert widget.other_matches[0].index == i
    assert widget._results.data[0, 0] == "CMU-1-Small-Region.svs"
    camera_of(viewer).center = (0, 0)
    widget._on_result_clicked(0, 0)  # a double-click on a match of this slide goes there
    want = world_of_l0(slide, *(store.coords[i] + store.tile_l0 / 2))
    assert camera_of(viewer).center[-2:] == pytest.approx(want)

    other = tmp_path / "other"
    other.mkdir()
    (other / "CMU.zarr").symlink_to(store.path, target_is_directory=True)
    sig = store.signature
    sig["model"]["weights_digest"] = "0" * 64
    n = 5
    fake = EmbeddingStore.create_or_resume(
        other / "fake.zarr", signature=sig, coords=store.coords[:n], grid_rc=store.grid_rc[:n],
        tissue=store.tissue[:n], embed_dim=store.embed_dim,
    )  # fmt: skip
    fake.write(0, store.embeddings[:n])
    fake.finalize()
    widget._folder.value = other
    widget._search_folder.native.click()
    assert widget._status.value.startswith("error:")
    assert "different model" in widget._status.value and "fake.zarr" in widget._status.value
    assert_fits(viewer)  # a long, multi-line error: the window and the canvas keep their size


def test_region_search_leaves_the_query_out_by_default(viewer_cmu):
    viewer, slide, store = viewer_cmu
    widget = dock(viewer, "Region search")
    i = int(np.argmax(store.tissue))
    draw_around_tile(widget, slide, store, i)
    widget._search.native.click()
    res = widget.last_result
    assert res is not None and list(res.query_idx) == [i] and res.request.exclude_query
    assert i not in res.match_idx and len(res.match_idx) == 10
    widget._folder.value = store.path.parent
    widget._search_folder.native.click()
    assert all(m.index != i for m in widget.other_matches)


# -- embedding ----------------------------------------------------------------------------------
def test_embed_widget_takes_any_model_name_or_folder(make_napari_viewer, tmp_path):
    viewer = shown_viewer(make_napari_viewer)
    viewer.open(str(need(CMU)), plugin="tilescope")
    widget = dock(viewer, "Embed slide")
    assert isinstance(widget, EmbedWidget)
    assert widget._model.value == "biomedclip"
    assert "hf-hub:" in widget._model.tooltip and "folder" in widget._model.tooltip
    for name in ("hf-hub:org/some-clip", str(tmp_path / "my-biomedclip"), "tiny-random"):
        widget._model.value = name  # a combo box of two names refused these
        assert widget.request().model == name
    widget._model.value = "  "
    widget._run.native.click()  # a message, not an exception
    assert widget._status.value.startswith("error: type a model")


def test_embed_cancel_keeps_rows_and_resumes(make_napari_viewer, qtbot, tmp_path, synth_05):
    viewer = shown_viewer(make_napari_viewer)
    viewer.open(str(synth_05.path), plugin="tilescope")
    widget = dock(viewer, "Embed slide", synchronous=False)
    widget._model.value = "tiny-random"
    widget._tile.value = 96  # many small tiles: ~300, about 20 batches
    widget._out_dir.value = tmp_path
    widget._run.native.click()
    qtbot.waitUntil(lambda: widget._active.bar.bar is not None and widget._active.bar.bar.n > 0,
                    timeout=60_000)  # fmt: skip
    widget._cancel.native.click()
    assert widget._status.value.startswith("cancelling after the current batch")
    qtbot.waitUntil(lambda: widget._run.enabled, timeout=20_000)  # stops after one batch
    assert widget._status.value.startswith("cancelled")
    path = tmp_path / f"{synth_05.path.stem}.zarr"
    store = EmbeddingStore.open(path)
    done = store.n_done
    assert 0 < done < store.n_tiles and not store.complete

    widget.synchronous = True
    widget._run.native.click()  # resumes: only the missing tiles
    result = widget.last_result
    assert result is not None and result.complete
    assert result.embedded_now == store.n_tiles - done
    settle()


def test_heatmap_temperature_is_in_cosine_units(make_napari_viewer):
    widget = dock(shown_viewer(make_napari_viewer), "Prompt heatmap")
    t = widget._temperature
    assert (t.value, t.min, t.step) == (pytest.approx(0.05), pytest.approx(0.005), 0.005)


def test_every_widget_lists_the_slide_layers(make_napari_viewer):
    viewer = shown_viewer(make_napari_viewer)
    widgets = [dock(viewer, name) for name in WIDGETS]
    layer = viewer.open(str(need(CMU)), plugin="tilescope")[0]
    viewer.add_points([[0, 0]], name="not a slide")
    for widget in widgets:
        assert [c.name for c in widget._slide.choices] == [layer.name]
    assert_fits(viewer)


def test_a_dock_filter_cleared_by_the_garbage_collector_ignores_qt_events(make_napari_viewer):
    """A widget made but never docked is a reference cycle (widget -> its dock filter ->
    widget); Python's collector clears the filter's attributes while Qt, which owns it, can
    still deliver the scroll area's last events to it: those must be ignored, not raise (an
    exception in Qt's event loop; test_embed_widget_backend_choice failed at teardown)."""
    from qtpy.QtCore import QEvent

    viewer = make_napari_viewer()
    widget = EmbedWidget(viewer)
    scroll, watch = widget.native, widget._dock_filter
    inner = scroll.widget()
    watch.__dict__.clear()  # what the collector's tp_clear does to the cycle
    # as Qt calls it (called directly: an exception inside Qt's dispatch aborts the process)
    assert watch.eventFilter(inner, QEvent(QEvent.Type.LayoutRequest)) is False
    assert watch.eventFilter(scroll, QEvent(QEvent.Type.ParentChange)) is False
