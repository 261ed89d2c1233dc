"""The Tissue classifier widget and the QuPath GeoJSON reader in a shown viewer (under Xvfb).

The slide is the 32 CRC-VAL-HE-7K patches as a mosaic (class k on row k, two separate pairs
of patches per class), embedded once with the tiny untrained model: geometry and the whole
path are checked; no accuracy is claimed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from napari_helpers import assert_fits, dock, shown_viewer
from test_classify import crc_mosaic, qupath_annotations

from tilescope._napari._classify_widget import TissueClassifierWidget
from tilescope._napari._common import get_encoder
from tilescope._napari._geojson_reader import napari_get_geojson_reader
from tilescope.classify import Classifier, training_set_from_geojson
from tilescope.embed import embed_slide
from tilescope.grid import TileGrid
from tilescope.store import EmbeddingStore

pytestmark = pytest.mark.napari


@pytest.fixture(scope="module")
def crc(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("crc")
    slide, regions = crc_mosaic(d / "crc.tif")
    store = d / "crc.zarr"
    grid = TileGrid(target_mpp=0.5, tile_px=224, min_tissue=0.0)
    embed_slide(slide, store, encoder=get_encoder("tiny-random"), grid=grid, batch_size=40)
    return slide, store, regions


@pytest.fixture
def viewer_crc(make_napari_viewer, crc, monkeypatch, tmp_path):
    """The mosaic in a shown 1600 x 1000 window; its store sits in the default stores folder,
    where the widget finds it by the slide's identity."""
    slide_path, store, regions = crc
    monkeypatch.setenv("TILESCOPE_STORES", str(Path(store).parent))
    viewer = shown_viewer(make_napari_viewer)
    slide = viewer.open(str(slide_path), plugin="tilescope")[0]
    widget = dock(viewer, "Tissue classifier")
    assert widget._store.value == Path(store)
    return viewer, slide, widget, EmbeddingStore.open(store), regions


def world(slide, x: float, y: float) -> list[float]:
    """World (row, col) of level-0 corner coordinates (x, y) on the slide layer."""
    (sy, sx), (ty, tx) = slide.scale[-2:], slide.translate[-2:]
    return [ty + (y - 0.5) * sy, tx + (x - 0.5) * sx]


def draw(layer, slide, poly) -> None:
    layer.add_polygons([np.array([world(slide, x, y) for x, y in poly.exterior.coords[:-1]])])


def test_drawn_classes_train_and_show_every_layer(viewer_crc, qtbot, tmp_path) -> None:
    viewer, slide, widget, store, regions = viewer_crc
    assert isinstance(widget, TissueClassifierWidget)
    chosen = ["adipose", "lymphocytes", "mucus"]
    for cls in chosen:
        layer = widget.add_class(cls)
        assert layer.name == f"class: {cls}" and layer.mode == "add_polygon"
        draw(layer, slide, regions[cls][0])
    # three classes, one region each: trained (retrain on edit), accuracy not measurable
    res = widget.last_result
    assert res is not None and res.classifier.cv is None
    assert "two separate regions" in widget._accuracy.value
    for cls in chosen:  # a second region per class: now cross-validated by region
        draw(viewer.layers[f"class: {cls}"], slide, regions[cls][1])
    res = widget.last_result
    assert res.classifier.cv is not None and res.classifier.cv.n_folds == 2
    assert "cross-validated by region, 2 folds" in widget._accuracy.value
    assert "UNTRAINED" in widget._accuracy.value
    assert res.training.tiles_per_class() == {c: 4 for c in chosen}
    names = [ly.name for ly in viewer.layers]
    for cls in chosen:
        assert f"classifier P({cls}) · crc [UNTRAINED]" in names
    for name in (
        "classifier: class · crc [UNTRAINED]",
        "classifier uncertainty · crc [UNTRAINED]",
        "classifier training tiles · crc",
    ):
        assert name in names  # fmt: skip
    assert [widget._table.data[i][0] for i in range(3)] == chosen
    assert widget._table.native.item(0, 3).text().count(".") == 1  # 3 decimals, as written
    areas = [float(widget._table.data[i][3]) for i in range(3)]
    assert sum(areas) == pytest.approx(40 * (store.tile_l0 * store.level0_mpp / 1e3) ** 2, 0.01)

    # every tile's probability sits on its own heatmap cell; training tiles are outlined
    heat = viewer.layers["classifier P(adipose) · crc [UNTRAINED]"]
    probs = res.prediction.probs[:, 0]
    for i in range(0, store.n_tiles, 7):
        x, y = store.coords[i] + store.tile_l0 / 2
        r, c = np.round(heat.world_to_data(world(slide, x, y))).astype(int)
        assert heat.data[r, c] == pytest.approx(probs[i], abs=1e-6)
    tiles = viewer.layers["classifier training tiles · crc"]
    assert len(tiles.data) == 12 and set(tiles.features["class"]) == set(chosen)
    first = res.training.indices[0]
    x0, y0 = store.coords[first]
    np.testing.assert_allclose(tiles.data_to_world(tiles.data[0][0]), world(slide, x0, y0),
                               atol=1e-6)  # fmt: skip
    labels = viewer.layers["classifier: class · crc [UNTRAINED]"]
    assert labels.visible and not heat.visible
    from qtpy.QtGui import QColor

    for r in range(3):  # each class's row in the colour its label is drawn
        img = widget._table.native.item(r, 0).icon().pixmap(12, 12).toImage()
        c = QColor(img.pixel(6, 6))
        rgba = np.asarray(labels.colormap.map(np.array([r + 1]))).reshape(-1)
        assert (c.red(), c.green(), c.blue()) == tuple(int(round(255 * v)) for v in rgba[:3])

    # save to the store, write the classifier, apply it again
    widget._save_name.value = "crc"
    widget._save.native.click()
    assert "crc" in EmbeddingStore.open(store.path).score_names()
    widget._clf_file.value = tmp_path / "crc-clf"
    widget._write.native.click()
    clf = Classifier.load(tmp_path / "crc-clf.json")
    assert clf.classes == chosen
    widget._clf_file.value = tmp_path / "crc-clf.json"
    widget._apply.native.click()
    np.testing.assert_allclose(widget.last_result.prediction.probs, res.prediction.probs, 1e-6)
    assert "applied crc-clf.json" in widget._accuracy.value

    viewer.layers.selection.active = viewer.layers["classifier: class · crc [UNTRAINED]"]
    shot = tmp_path / "classifier.png"
    viewer.window.screenshot(str(shot), canvas_only=False)
    assert shot.stat().st_size > 10_000
    assert_fits(viewer)


def test_qupath_geojson_opens_over_the_slide_and_trains_like_the_cli(viewer_crc, tmp_path):
    viewer, slide, widget, store, regions = viewer_crc
    colors = {c: (10 * k, 200, 255 - 10 * k) for k, c in enumerate(regions)}
    ann = qupath_annotations(tmp_path / "crc.geojson", regions, colors)
    assert napari_get_geojson_reader(str(ann)) is not None
    (layer,) = viewer.open(str(ann), plugin="tilescope")
    assert layer.metadata["tilescope"]["frame"] == "slide"
    assert list(layer.features["class"][:2]) == ["adipose", "adipose"]
    # the first adipose rectangle's corner sits on the slide where its level-0 pixel is
    x, y = regions["adipose"][0].exterior.coords[0]
    np.testing.assert_allclose(layer.data_to_world(layer.data[0][0]), world(slide, x, y))
    widget._train.native.click()
    res = widget.last_result
    cli = training_set_from_geojson(store, ann)
    assert res.classifier.classes == cli.classes
    np.testing.assert_array_equal(np.sort(res.training.indices), np.sort(cli.indices))
    assert res.classifier.colors[1] == colors[cli.classes[1]]  # QuPath's class colour


def test_reader_declines_other_json_and_keeps_holes(tmp_path) -> None:
    other = tmp_path / "config.json"
    other.write_text(json.dumps({"model": "x"}))
    assert napari_get_geojson_reader(str(other)) is None
    assert napari_get_geojson_reader(str(tmp_path / "slide.svs")) is None
    from tilescope._napari._geojson_reader import geojson_layer_data

    ring = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    hole = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]
    p = tmp_path / "h.geojson"
    geometry = {"type": "Polygon", "coordinates": [ring, hole]}
    feature = {"type": "Feature", "geometry": geometry, "properties": {"classification": "T"}}
    p.write_text(json.dumps(feature))
    shapes, kwargs, kind = geojson_layer_data(p)
    assert kind == "shapes" and len(shapes) == 2
    assert list(kwargs["features"]["hole"]) == [False, True]
    np.testing.assert_allclose(shapes[0][1], [0, 100])  # (row, col) = (y, x)
    assert kwargs["metadata"]["tilescope"]["frame"] == "level0"


def test_errors_are_worded_for_the_widget(make_napari_viewer, crc, tmp_path) -> None:
    viewer = shown_viewer(make_napari_viewer)
    widget = dock(viewer, "Tissue classifier")
    widget._train.native.click()
    assert widget._status.value.startswith("error: open a slide first")
    slide = viewer.open(str(crc[0]), plugin="tilescope")[0]
    slide.metadata["tilescope"]["store"] = str(crc[1])  # as the Embed widget records it
    widget.reset_choices()
    widget._train.native.click()
    assert "at least two classes" in widget._status.value and "--" not in widget._status.value
    widget._save.native.click()
    assert "train first" in widget._status.value
    with pytest.raises(Exception, match="type a class name"):
        widget.add_class("  ")
    widget._apply.native.click()  # the classifier box still empty
    assert "choose a classifier file first" in widget._status.value
    assert "Errno" not in widget._status.value and "--" not in widget._status.value
    bogus = tmp_path / "bogus.json"
    bogus.write_text("{}")
    widget._clf_file.value = bogus
    widget._apply.native.click()
    assert "not a Tilescope classifier" in widget._status.value
    assert "--" not in widget._status.value and "press Write" in widget._status.value
    assert Path(crc[1]).exists()
    assert_fits(viewer)
