"""What the Region search widget takes as its query, as napari builds the widget (Plugins menu
path, viewer proxy, a shown 1600 x 1000 window; needs an X server): the "not like this"
weight, and QuPath annotations opened as a shapes layer (holes cut out, classes chosen).

One synthetic slide covered with tissue (8 x 6 tiles of 224 px at 0.5 µm/px) is embedded
once with the tiny untrained model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from napari_helpers import dock, shown_viewer, world_of_l0

from tilescope._napari import _stores
from tilescope._napari._common import get_encoder
from tilescope._napari._search_layers import SearchRequest
from tilescope.embed import embed_slides
from tilescope.grid import TileGrid
from tilescope.search import NEG_WEIGHT
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
