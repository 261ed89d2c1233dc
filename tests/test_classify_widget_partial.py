"""The Tissue classifier widget on a partial store says so, as the Prompt heatmap does
("partial: n of N tiles"), in a shown viewer as napari builds the widget (needs an X server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from napari_helpers import dock, shown_viewer

from tilescope._napari._common import get_encoder
from tilescope.embed import embed_slide
from tilescope.grid import TileGrid
from tilescope.store import EmbeddingStore
from tilescope.synthetic import Blob, SyntheticSlide

pytestmark = pytest.mark.napari


def ring(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_classifier_on_a_partial_store_says_partial(make_napari_viewer, monkeypatch, tmp_path):
    spec = SyntheticSlide(8 * 224, 6 * 224, mpp=0.5, n_levels=2,
                          blobs=(Blob(448.0, 336.0, 1200.0, 1000.0),))  # fmt: skip
    slide_path = spec.write(tmp_path / "s.tif")
    stores = tmp_path / "stores"
    # the left four columns of tiles only: the store stays partial
    embed_slide(slide_path, stores / "s.zarr", encoder=get_encoder("tiny-random"),
                grid=TileGrid(target_mpp=0.5, tile_px=224), batch_size=32,
                regions=[(0, 0, 4 * 224 - 8, 6 * 224)])  # fmt: skip
    store = EmbeddingStore.open(stores / "s.zarr")
    assert (store.n_done, store.n_tiles, store.complete) == (24, 48, False)
    monkeypatch.setenv("TILESCOPE_STORES", str(stores))
    boxes = (("left", (0, 0, 448, 1344)), ("right", (448, 0, 896, 1344)))
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring(*box)]},
              "properties": {"objectType": "annotation",
                             "classification": {"name": cls, "color": [200, 0, 0]}}}
             for cls, box in boxes]  # fmt: skip
    ann = tmp_path / "a.geojson"
    ann.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))

    viewer = shown_viewer(make_napari_viewer)
    viewer.open(str(slide_path), plugin="tilescope")
    widget = dock(viewer, "Tissue classifier")
    assert widget._store.value == Path(stores / "s.zarr")
    viewer.open(str(ann), plugin="tilescope")
    widget._train.native.click()
    res = widget.last_result
    assert res is not None, widget._status.value
    assert res.prediction.coverage == "partial: 24 of 48 tiles"
    assert "partial: 24 of 48 tiles" in widget._status.value
