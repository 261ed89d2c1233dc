"""The `tilescope` command's results that other tools take up: search matches as QuPath
objects, the similarity map saved as a score set, saved score sets drawn as PNGs, and the
classifier saying when a store is partial.

Stores come from `synthetic_stores.grid_store` (no model): a 4 x 6 grid of 448 px tiles whose
embeddings the test chooses, so it knows which tiles match.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from synthetic_stores import ORIGIN, TILE, full_grid, grid_store, unit_rows

from tilescope.cli import main
from tilescope.qupath import read_geojson
from tilescope.store import EmbeddingStore

D = 16


def two_kinds(n: int, seed: int = 0) -> np.ndarray:
    """Rows 0-5 near one direction (the query's kind), the rest near another, plus noise."""
    rng = np.random.default_rng(seed)
    a, b = np.eye(D)[0], np.eye(D)[1]
    base = np.where(np.arange(n)[:, None] < 6, a, b)
    return unit_rows(base + 0.3 * rng.standard_normal((n, D)))


@pytest.fixture
def store(tmp_path) -> EmbeddingStore:
    return grid_store(tmp_path / "s.zarr", two_kinds(24), full_grid(4, 6))


def box_of(st: EmbeddingStore, i: int) -> str:
    """A 24 px --region around tile i's centre (it holds that centre only)."""
    x, y = st.coords[i] + st.tile_l0 / 2
    return f"{x - 12:g},{y - 12:g},24,24"


def json_out(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") : out.rindex("}") + 1])


def test_search_writes_matches_as_qupath_objects_and_saves_the_similarity_map(
    store, tmp_path, capsys
):
    out = tmp_path / "matches.geojson"
    argv = ["search", str(store.path), "--region", box_of(store, 0), "-k", "5", "--geojson",
            str(out), "--save", "like0", "--json"]  # fmt: skip
    assert main(argv) == 0
    data = json_out(capsys)
    matches = data["matches"]
    assert len(matches) == 5 and {m["index"] for m in matches} <= {1, 2, 3, 4, 5, 6, 7}
    assert data["geojson"]["objects"] == 5 and data["saved_as"] == "like0"
    objects = read_geojson(out)
    assert len(objects) == 5
    for rank, (obj, m) in enumerate(zip(objects, matches, strict=True), 1):
        x, y = store.coords[m["index"]]  # level-0 top-left of the matched tile
        assert (m["x"], m["y"]) == (x, y)
        assert obj.object_type == "annotation" and obj.classification == "Search match"
        square = shapely.box(x, y, x + TILE, y + TILE)  # the tile, level-0 px
        assert obj.geometry.equals(square), obj.geometry.wkt
        assert x >= ORIGIN[0] and y >= ORIGIN[1]
        assert obj.measurements["Rank"] == rank
        assert obj.measurements["Similarity"] == pytest.approx(m["similarity"], abs=1e-6)
    # the similarity map, saved as a score set: the matches' values, one column named NAME
    arrays, meta = EmbeddingStore.open(store.path).read_scores("like0")
    sim = arrays["similarity"]
    assert sim.shape == (store.n_tiles,) and meta["kind"] == "similarity"
    np.testing.assert_allclose(sim[[m["index"] for m in matches]],
                               [m["similarity"] for m in matches], atol=1e-6)  # fmt: skip
    assert int(np.argmax(sim)) == 0  # the query tile is most like itself
    # ... which export turns into QuPath regions like any score set
    regions = tmp_path / "regions.geojson"
    argv = ["export", str(store.path), "--scores", "like0", "--as", "annotations",
            "--threshold", f"{float(np.sort(sim)[-6]):.6f}", "-o", str(regions)]  # fmt: skip
    assert main(argv) == 0
    assert {o.classification for o in read_geojson(regions)} == {"like0"}


def test_search_geojson_as_detections_keeps_this_slides_matches_only(store, tmp_path, capsys):
    other = grid_store(tmp_path / "o.zarr", two_kinds(24, seed=1), full_grid(4, 6),
                       slide="other.svs")  # fmt: skip
    out = tmp_path / "m.geojson"
    argv = ["search", str(store.path), "--region", box_of(store, 0), "-k", "10", "--against",
            str(store.path), "--against", str(other.path), "--geojson", str(out),
            "--geojson-as", "detections"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    objects = read_geojson(out)
    ranks = [int(line.split(".")[0]) for line in text.splitlines()
             if line.strip()[:1].isdigit() and "s.zarr" in line]  # fmt: skip
    assert objects and all(o.object_type == "detection" for o in objects)
    assert [int(o.measurements["Rank"]) for o in objects] == ranks  # global ranks kept
    assert "left out" in text


def test_search_geojson_must_be_named_geojson(store, tmp_path, capsys):
    argv = ["search", str(store.path), "--region", box_of(store, 0), "--geojson",
            str(tmp_path / "m.txt")]  # fmt: skip
    assert main(argv) == 1
    assert "--geojson" in capsys.readouterr().err and not (tmp_path / "m.txt").exists()
