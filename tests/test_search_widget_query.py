"""What the Region search widget takes as its query, as napari builds the widget (Plugins menu
path, viewer proxy, a shown 1600 x 1000 window; needs an X server): the "not like this"
weight, and QuPath annotations opened as a shapes layer (holes cut out, classes chosen).

One synthetic slide covered with tissue (8 x 6 tiles of 224 px at 0.5 µm/px) is embedded
once with the tiny untrained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from napari_helpers import dock, shown_viewer, world_of_l0

from tilescope._napari import _stores
from tilescope._napari._common import get_encoder
from tilescope._napari._search_layers import SearchRequest
from tilescope.embed import embed_slides
from tilescope.grid import TileGrid
from tilescope.qupath import geojson_query_rows
from tilescope.search import NEG_WEIGHT, build_query
from tilescope.store import EmbeddingStore
from tilescope.synthetic import Blob, SyntheticSlide

pytestmark = pytest.mark.napari

README = Path(__file__).resolve().parents[1] / "README.md"
TILE = 224  # level-0 px (0.5 µm/px slide, 224 px tiles at 0.5 µm/px)


@pytest.fixture(autouse=True)
def empty_stores(monkeypatch, tmp_path):
    monkeypatch.setenv("TILESCOPE_STORES", str(tmp_path / "default-stores"))
    monkeypatch.setattr(_stores, "_SESSION_FOLDERS", [])


@pytest.fixture(scope="module")
def slide_and_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("query")
    spec = SyntheticSlide(8 * TILE, 6 * TILE, mpp=0.5, n_levels=2,
                          blobs=(Blob(448.0, 336.0, 1200.0, 1000.0),))  # fmt: skip
    path = spec.write(root / "s.tif")
    embed_slides([path], root / "stores", encoder=get_encoder("tiny-random"),
                 grid=TileGrid(target_mpp=0.5, tile_px=TILE), batch_size=32)  # fmt: skip
    store = EmbeddingStore.open(root / "stores" / "s.zarr")
    assert store.complete and store.n_tiles == 48, store.state_text()
    return path, root / "stores"


def open_slide(viewer, slide_and_store):
    path, stores = slide_and_store
    _stores.remember_folder(stores)
    slide = viewer.open(str(path), plugin="tilescope")[0]
    return slide, EmbeddingStore.open(stores / "s.zarr")


def test_not_like_this_weight_defaults_to_rocchios(make_napari_viewer, slide_and_store):
    """0.25 everywhere: the core, the CLI (its default is the core's), the widget, the README."""
    assert NEG_WEIGHT == 0.25
    assert SearchRequest(None, None, []).neg_weight == NEG_WEIGHT  # type: ignore[arg-type]
    assert f"--unlike-weight {NEG_WEIGHT}" in README.read_text(encoding="utf-8")
    viewer = shown_viewer(make_napari_viewer)
    slide, _ = open_slide(viewer, slide_and_store)
    widget = dock(viewer, "Region search")
    assert widget._neg_weight.value == NEG_WEIGHT
    widget.query_layer().add_rectangles([world_of_l0(slide, 10, 10), world_of_l0(slide, 400, 400)])
    assert widget.request().neg_weight == NEG_WEIGHT


def qupath_file(path: Path) -> Path:
    """As QuPath exports it: Tumor, a 4 x 4 tile block with a 2 x 2 tile hole; Stroma, a
    2 x 2 tile block elsewhere (level-0 px)."""

    def ring(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]

    def feature(uid, coords, name, color):
        return {"type": "Feature", "id": uid,
                "geometry": {"type": "Polygon", "coordinates": coords},
                "properties": {"objectType": "annotation",
                               "classification": {"name": name, "color": color}}}  # fmt: skip

    t = TILE
    features = [
        feature("6f1c1d38-3b7a-4a57-9d3c-1d1e0f6a0001",
                [ring(t, t, 5 * t, 5 * t), ring(2 * t, 2 * t, 4 * t, 4 * t)], "Tumor",
                [200, 0, 0]),
        feature("6f1c1d38-3b7a-4a57-9d3c-1d1e0f6a0002", [ring(6 * t, 0, 8 * t, 2 * t)],
                "Stroma", [150, 200, 150]),
    ]  # fmt: skip
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def test_qupath_annotations_as_the_query_cut_their_holes_and_follow_the_class(
    make_napari_viewer, slide_and_store, tmp_path
):
    viewer = shown_viewer(make_napari_viewer)
    slide, store = open_slide(viewer, slide_and_store)
    geojson = qupath_file(tmp_path / "annotations.geojson")
    (qupath,) = viewer.open(str(geojson), plugin="tilescope")
    assert list(qupath.features["hole"]) == [False, True, False]  # the hole is a shape
    widget = dock(viewer, "Region search")
    assert not widget._positive_class.visible  # the drawn query layer has no classes
    widget._positive.value = qupath
    assert widget._positive_class.visible
    assert list(widget._positive_class.choices) == [None, "Stroma", "Tumor"]
    widget._positive_class.value = "Tumor"
    widget._negative.value = qupath
    widget._negative_class.value = "Stroma"
    widget._search.native.click()
    res = widget.last_result
    assert res is not None, widget._status.value

    centres = store.coords + store.tile_l0 / 2
    in_block = np.all((centres > TILE) & (centres < 5 * TILE), axis=1)
    in_hole = np.all((centres > 2 * TILE) & (centres < 4 * TILE), axis=1)
    want = np.flatnonzero(in_block & ~in_hole)
    assert len(want) == 12  # 16 tiles of the block, less the 4 of the hole
    np.testing.assert_array_equal(res.query_idx, want)
    pos, neg = geojson_query_rows(store, geojson, classes=["Tumor"], unlike_classes=["Stroma"])
    np.testing.assert_array_equal(res.query_idx, pos)  # as `search --region-geojson` does
    assert len(neg) == 4
    np.testing.assert_allclose(res.query, build_query(store.embeddings, pos, neg, NEG_WEIGHT),
                               atol=1e-6)  # fmt: skip

    # every class but the "not like this" one: the same query; one class alone: its tiles
    widget._positive_class.value = None
    widget._search.native.click()
    np.testing.assert_array_equal(widget.last_result.query_idx, want)
    widget._positive_class.value = "Stroma"
    widget._negative.value = None
    widget._search.native.click()
    np.testing.assert_array_equal(widget.last_result.query_idx, neg)
