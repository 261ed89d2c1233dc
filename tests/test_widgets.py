"""The widgets in a real viewer on the CMU slide (needs an X server: run under xvfb-run).

One store of the CMU slide (tiny untrained model, 224 px tiles overlapping by 112 px) is embedded
once per module, without napari, and shared. Geometry is checked against the slide layer's own
convention, re-derived here: level-0 pixel i is drawn centred at ``translate + i * scale``, so
the level-0 corner coordinate u (pixel i covers [i, i + 1)) is at ``translate + (u - 0.5) * scale``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from _paths import CMU, need

from tilescope._napari._common import camera_of, get_encoder
from tilescope._napari._embed_widget import EmbedWidget
from tilescope._napari._export_widget import ExportWidget
from tilescope._napari._heatmap_widget import DEFAULT_PROMPTS, PromptHeatmapWidget
from tilescope._napari._search_widget import RegionSearchWidget
from tilescope.embed import embed_slide
from tilescope.grid import TileGrid
from tilescope.score import PromptSet, score_patches, text_matrix
from tilescope.search import tiles_in_shapes
from tilescope.store import EmbeddingStore

pytestmark = pytest.mark.napari

CLASSES = ["tumor", "stroma", "lymphocytes", "background"]


@pytest.fixture(scope="module")
def cmu_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CMU slide embedded once with the tiny model, 224 px tiles overlapping by 112 px."""
    out = tmp_path_factory.mktemp("stores") / "CMU-1-Small-Region.zarr"
    grid = TileGrid(target_mpp=0.5, tile_px=224, overlap_px=112)
    embed_slide(need(CMU), out, encoder=get_encoder("tiny-random"), grid=grid, batch_size=32)
    return out


@pytest.fixture
def viewer_cmu(make_napari_viewer, cmu_store):
    """A shown viewer with the CMU slide whose layer knows its store."""
    viewer = make_napari_viewer(show=True)
    slide = viewer.open(str(CMU), plugin="tilescope")[0]
    slide.metadata["tilescope"]["store"] = str(cmu_store)
    return viewer, slide, EmbeddingStore.open(cmu_store)


def world_of_l0(layer, x: float, y: float) -> tuple[float, float]:
    """World (row, col) of level-0 corner coordinates (x, y) on a slide layer."""
    (sy, sx), (ty, tx) = layer.scale[-2:], layer.translate[-2:]
    return ty + (y - 0.5) * sy, tx + (x - 0.5) * sx


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


def test_embed_then_heatmap_places_each_tile_on_its_cell(make_napari_viewer, qtbot, tmp_path):
    """Embed widget in its worker (tiles of 224 px at 1 µm/px, no overlap), then heatmaps."""
    viewer = make_napari_viewer()
    slide = viewer.open(str(need(CMU)), plugin="tilescope")[0]
    embed = EmbedWidget(viewer)
    embed._model.value = "tiny-random"
    embed._mpp.value = 1.0
    embed._out_dir.value = tmp_path
    embed._run.native.click()
    qtbot.waitUntil(lambda: embed.last_result is not None and embed._run.enabled, timeout=60_000)
    store_path = Path(slide.metadata["tilescope"]["store"])
    assert store_path.parent == tmp_path and embed.last_result.complete
    assert "UNTRAINED" in embed._status.value

    widget = PromptHeatmapWidget(viewer)
    widget.synchronous = True
    widget._run.native.click()
    names = [layer.name for layer in viewer.layers]
    for c in CLASSES:
        assert f"p({c}) [UNTRAINED]" in names
    assert "winning class [UNTRAINED]" in names
    result = widget.last_result
    assert result is not None and not result.trained
    assert f"Slide label: {result.pooled.label}</b> (attention" in widget._slide_label.value
    assert "UNTRAINED" in widget._slide_label.value
    assert list(widget._table.row_headers) == CLASSES

    store = EmbeddingStore.open(store_path)
    probs = expected_probs(store, DEFAULT_PROMPTS, ["an H&E image of {}"])
    layer = viewer.layers["p(tumor) [UNTRAINED]"]
    for i in np.linspace(0, store.n_tiles - 1, 7).astype(int):  # tile centres -> their cells
        x, y = store.coords[i] + store.tile_l0 / 2
        r, c = np.round(layer.world_to_data(world_of_l0(slide, x, y))).astype(int)
        assert layer.data[r, c] == pytest.approx(probs[i, 0], abs=1e-5)


def test_heatmap_averages_overlapping_tiles_and_updates_in_place(viewer_cmu, qtbot):
    viewer, slide, store = viewer_cmu
    widget = PromptHeatmapWidget(viewer)
    widget._run.native.click()  # the worker path
    qtbot.waitUntil(lambda: widget.last_result is not None and widget._run.enabled, timeout=30_000)
    probs = expected_probs(store, DEFAULT_PROMPTS, ["an H&E image of {}"])
    layer = viewer.layers["p(stroma) [UNTRAINED]"]
    checked_four = 0
    for i in range(0, store.n_tiles, 9):  # a quarter of tile i; covered by up to 4 tiles
        x, y = store.coords[i] + store.tile_l0 / 4
        want, n = covering_mean(probs[:, 1], store.coords, store.tile_l0, x, y)
        r, c = np.round(layer.world_to_data(world_of_l0(slide, x, y))).astype(int)
        assert layer.data[r, c] == pytest.approx(want, abs=1e-5)
        checked_four += n == 4
    assert checked_four > 3

    # new prompts and templates: same-named layers updated in place, others removed / added
    n_layers = len(viewer.layers)
    widget.synchronous = True
    widget._prompts.value = DEFAULT_PROMPTS.replace("background: ", "necrosis: ")
    widget._templates.value = "a photomicrograph of {}; {}"
    encoder = get_encoder("tiny-random")

    def no_image_tower(*_: object) -> None:
        raise AssertionError("re-scoring ran the image tower; it must use stored embeddings")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encoder, "encode_images", no_image_tower)
        widget._run.native.click()
    assert viewer.layers["p(stroma) [UNTRAINED]"] is layer
    assert "p(background) [UNTRAINED]" not in viewer.layers
    assert "p(necrosis) [UNTRAINED]" in viewer.layers
    assert len(viewer.layers) == n_layers
    probs2 = expected_probs(store, widget._prompts.value, ["a photomicrograph of {}", "{}"])
    i = int(np.argmax(store.tissue))
    x, y = store.coords[i] + store.tile_l0 / 4
    r, c = np.round(layer.world_to_data(world_of_l0(slide, x, y))).astype(int)
    want, _ = covering_mean(probs2[:, 1], store.coords, store.tile_l0, x, y)
    assert layer.data[r, c] == pytest.approx(want, abs=1e-5)

    # winning-class labels carry class names; attention weights sum to one over tiles
    labels = viewer.layers["winning class [UNTRAINED]"]
    assert list(labels.features["class"]) == widget.last_result.classes
    assert set(np.unique(labels.data)) <= set(range(len(widget.last_result.classes) + 1))
    att = widget.last_result.pooled.attention
    assert att is not None and att.sum(0) == pytest.approx(1.0, abs=1e-4)


def test_heatmap_is_visible_over_tissue(viewer_cmu):
    viewer, slide, _ = viewer_cmu
    widget = PromptHeatmapWidget(viewer)
    widget.synchronous = True
    widget._pooling.value = "mean"
    widget._save.value = True
    widget._save_name.value = "demo"
    widget._run.native.click()
    assert "demo" in EmbeddingStore.open(slide.metadata["tilescope"]["store"]).score_names()
    for layer in viewer.layers:
        layer.visible = layer is slide
    viewer.reset_view()
    before = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    viewer.layers["p(tumor) [UNTRAINED]"].visible = True
    after = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    assert after.std() > 10, "blank screenshot"
    changed = np.abs(after - before).sum(-1) > 30
    tissue = tissue_pixels(before)
    assert tissue.mean() > 0.05
    assert changed[tissue].mean() > 0.85, "heatmap does not cover the tissue"
    glass = (before.min(-1) > 225) & ~changed
    assert glass.mean() > 0.05, "heatmap covers glass far from any tile (NaN must be clear)"


def test_heatmap_rescores_as_you_type(viewer_cmu, qtbot):
    viewer, _, _ = viewer_cmu
    widget = PromptHeatmapWidget(viewer)
    widget._live.value = True
    widget._prompts.value = "necrosis: necrotic debris\nnormal: benign tissue"
    qtbot.waitUntil(lambda: widget.last_result is not None, timeout=10_000)
    assert widget.last_result.classes == ["necrosis", "normal"]
    assert "p(necrosis) [UNTRAINED]" in viewer.layers


@pytest.mark.parametrize(
    ("name", "cls"),
    [("Embed slide", EmbedWidget), ("Prompt heatmap", PromptHeatmapWidget),
     ("Region search", RegionSearchWidget), ("Export embeddings", ExportWidget)],
)  # fmt: skip
def test_widgets_open_from_the_plugin_menu(make_napari_viewer, name, cls):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("tilescope", name)
    assert isinstance(widget, cls)


def test_heatmap_errors_are_notifications(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = PromptHeatmapWidget(viewer)
    widget.synchronous = True
    widget._run.native.click()  # no slide at all
    assert widget._status.value.startswith("error: open a slide first")
    viewer.open(str(need(CMU)), plugin="tilescope")
    viewer.layers[0].metadata["tilescope"]["store"] = "/nonexistent/x.zarr"
    widget._slide.reset_choices()
    widget._run.native.click()
    assert "no such embedding store" in widget._status.value


def test_export_widget_writes_plain_zarr_and_geojson(viewer_cmu, tmp_path):
    viewer, _, store = viewer_cmu
    widget = ExportWidget(viewer)
    widget.synchronous = True
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
    widget._run.native.click()  # exists, no overwrite: a message, not an exception
    assert widget._status.value.startswith("error:") and "out.zarr" in widget._status.value


def test_embed_cancel_keeps_rows_and_resumes(make_napari_viewer, qtbot, tmp_path, synth_05):
    viewer = make_napari_viewer()
    viewer.open(str(synth_05.path), plugin="tilescope")
    widget = EmbedWidget(viewer)
    widget._model.value = "tiny-random"
    widget._tile.value = 96  # many small tiles: ~300, about 20 batches
    widget._out_dir.value = tmp_path
    widget._run.native.click()
    qtbot.waitUntil(lambda: widget._pbar is not None and widget._pbar.n > 0, timeout=60_000)
    widget._cancel.native.click()
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


# -- region search ------------------------------------------------------------------------------
def draw_around_tile(widget, slide, store, i: int, half: float = 20.0):
    """A small rectangle (world µm) around tile i's centre: only its centre is inside."""
    cx, cy = store.coords[i] + store.tile_l0 / 2
    corners = [world_of_l0(slide, cx - half, cy - half), world_of_l0(slide, cx + half, cy + half)]
    widget.query_layer().add_rectangles(np.array(corners))


def test_region_search_finds_the_drawn_tile_and_steps_through_matches(viewer_cmu):
    viewer, slide, store = viewer_cmu
    widget = RegionSearchWidget(viewer)
    widget.synchronous = True
    assert "Tilescope query" in viewer.layers
    assert widget._exclude.value is True  # the query tiles are left out by default, as on the CLI
    widget._exclude.value = False  # here: the drawn tile must come back as match 1
    i = int(np.argmax(store.tissue))
    draw_around_tile(widget, slide, store, i)
    widget._search.native.click()
    res = widget.last_result
    assert res is not None and list(res.query_idx) == [i]
    assert res.match_idx[0] == i and res.match_sim[0] == pytest.approx(1.0, abs=1e-5)

    matches = viewer.layers["Tilescope matches [UNTRAINED]"]
    assert len(matches.data) == 10
    x, y = store.coords[i]
    t = store.tile_l0
    bounds = [world_of_l0(slide, *p) for p in [(x, y), (x + t, y), (x + t, y + t), (x, y + t)]]
    np.testing.assert_allclose(np.sort(matches.data[0], 0), np.sort(np.array(bounds), 0))
    first = matches.features.iloc[0]
    assert (first["rank"], first["x"], first["y"]) == (1, x, y)
    assert first["slide"] == "CMU-1-Small-Region.svs"

    sims = store.embeddings @ store.embeddings[i]
    layer = viewer.layers["similarity [UNTRAINED]"]
    for j in range(0, store.n_tiles, 23):
        px, py = store.coords[j] + t / 4
        want, _ = covering_mean(sims, store.coords, t, px, py)
        r, c = np.round(layer.world_to_data(world_of_l0(slide, px, py))).astype(int)
        assert layer.data[r, c] == pytest.approx(want, abs=1e-4)

    def centre(k: int) -> tuple[float, float]:
        return world_of_l0(slide, *(store.coords[res.match_idx[k]] + t / 2))

    assert camera_of(viewer).center[-2:] == pytest.approx(centre(0))
    widget._next.native.click()
    assert camera_of(viewer).center[-2:] == pytest.approx(centre(1))
    assert widget._match.value.startswith("match 2/10")
    widget._prev.native.click()
    assert camera_of(viewer).center[-2:] == pytest.approx(centre(0))

    j = int(res.match_idx[1])  # 'not like this' around the second match pushes it down
    cx, cy = store.coords[j] + t / 2
    negative = widget.query_layer("Tilescope not like this")
    negative.add_rectangles(
        np.array([world_of_l0(slide, cx - 9, cy - 9), world_of_l0(slide, cx + 9, cy + 9)])
    )
    assert widget._negative.value is negative
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
    assert len([ly for ly in viewer.layers if ly.name.startswith("Tilescope matches")]) == 1


def test_region_over_glass_is_a_message_not_an_exception(viewer_cmu, qtbot):
    from napari.utils.notifications import notification_manager

    viewer, slide, store = viewer_cmu
    widget = RegionSearchWidget(viewer)
    widget.synchronous = True
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
    assert "covers no embedded tissue tiles" in str(notification_manager.records[-1].message)
    assert widget.last_result is None

    draw_around_tile(widget, slide, store, int(np.argmax(store.tissue)))  # still usable
    widget._search.native.click()
    qtbot.waitUntil(lambda: widget.last_result is not None, timeout=10_000)


def test_search_other_slides_and_refuse_other_models(viewer_cmu, tmp_path):
    viewer, slide, store = viewer_cmu
    widget = RegionSearchWidget(viewer)
    widget.synchronous = True
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


def test_region_search_leaves_the_query_out_by_default(viewer_cmu):
    viewer, slide, store = viewer_cmu
    widget = RegionSearchWidget(viewer)
    widget.synchronous = True
    i = int(np.argmax(store.tissue))
    draw_around_tile(widget, slide, store, i)
    widget._search.native.click()
    res = widget.last_result
    assert res is not None and list(res.query_idx) == [i] and res.request.exclude_query
    assert i not in res.match_idx and len(res.match_idx) == 10
    widget._folder.value = store.path.parent
    widget._search_folder.native.click()
    assert all(m.index != i for m in widget.other_matches)


def test_embed_widget_takes_any_model_name_or_folder(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(need(CMU)), plugin="tilescope")
    widget = EmbedWidget(viewer)
    assert widget._model.value == "biomedclip"
    assert "hf-hub:" in widget._model.tooltip and "folder" in widget._model.tooltip
    for name in ("hf-hub:org/some-clip", str(tmp_path / "my-biomedclip"), "tiny-random"):
        widget._model.value = name  # a combo box of two names refused these
        assert widget.request().model == name
    widget._model.value = "  "
    widget._run.native.click()  # a message, not an exception
    assert widget._status.value.startswith("error: type a model")


def test_heatmap_temperature_is_in_cosine_units(make_napari_viewer):
    widget = PromptHeatmapWidget(make_napari_viewer())
    t = widget._temperature
    assert (t.value, t.min, t.step) == (pytest.approx(0.05), pytest.approx(0.005), 0.005)


def test_every_widget_lists_the_slide_layers(make_napari_viewer):
    viewer = make_napari_viewer()
    widgets = [cls(viewer) for cls in (EmbedWidget, PromptHeatmapWidget, ExportWidget)]
    widgets.append(RegionSearchWidget(viewer))
    layer = viewer.open(str(need(CMU)), plugin="tilescope")[0]
    viewer.add_points([[0, 0]], name="not a slide")
    for widget in widgets:
        assert widget._slide.choices == (layer,)
