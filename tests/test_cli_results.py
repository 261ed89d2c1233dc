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
from tilescope.synthetic import Blob, SyntheticSlide

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


# -- saved score sets drawn: score --scores NAME --png -----------------------------------------
@pytest.fixture(scope="module")
def slide_store(tmp_path_factory):
    """A synthetic slide covered with tissue (8 x 6 tiles of 224 px), embedded with the tiny
    untrained model."""
    root = tmp_path_factory.mktemp("saved")
    spec = SyntheticSlide(8 * 224, 6 * 224, mpp=0.5, n_levels=2,
                          blobs=(Blob(448.0, 336.0, 1200.0, 1000.0),))  # fmt: skip
    slide = spec.write(root / "s.tif")
    assert main(["embed", str(slide), "-o", str(root / "stores"), "--model", "tiny-random"]) == 0
    return slide, root / "stores" / "s.zarr"


def annotations(path, regions: dict) -> str:
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
              "properties": {"objectType": "annotation",
                             "classification": {"name": cls, "color": [200, 0, 0]}}}
             for cls, rings in regions.items() for ring in rings]  # fmt: skip
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return str(path)


def ring(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_score_draws_a_classifiers_saved_scores(slide_store, tmp_path, capsys):
    slide, store = slide_store
    ann = annotations(
        tmp_path / "a.geojson",
        {"left": [ring(0, 0, 448, 1344)], "right": [ring(1344, 0, 1792, 1344)]},
    )
    assert main(["classify", str(store), "--train", ann, "--save", "tissue"]) == 0
    capsys.readouterr()
    png = tmp_path / "tissue.png"
    argv = ["score", str(store), "--scores", "tissue", "--png", str(png), "--slide", str(slide),
            "--json"]  # fmt: skip
    assert main(argv) == 0
    data = json_out(capsys)
    st = EmbeddingStore.open(store)
    probs = st.read_scores("tissue")[0]["probs"]
    won = np.bincount(np.argmax(probs, 1), minlength=2)
    assert data["kind"] == "classifier" and data["classes"] == ["left", "right"]
    assert data["tiles_won"] == {"left": int(won[0]), "right": int(won[1])}
    assert data["shown"] == ("left" if won[0] >= won[1] else "right")
    assert data["quantity"] == "probability" and data["partial"] is False
    assert data["trained_model"] is False and png.exists()
    assert main(["score", str(store), "--scores", "nope"]) == 1
    assert "tissue" in capsys.readouterr().err  # the saved sets are named


def test_score_png_of_a_saved_set_draws_its_values_where_the_tiles_are(
    slide_store, tmp_path, capsys
):
    """P(east) rises from 0 at the left edge to 1 at the right: the PNG is dark on the left,
    bright on the right (inferno, fixed 0-1 scale), whichever class is the default."""
    from PIL import Image

    slide, store = slide_store
    st = EmbeddingStore.open(store)
    east = (st.coords[:, 0] / st.coords[:, 0].max()).astype(np.float32)
    st.write_scores("ramp", {"probs": np.stack([east, 1 - east], 1)}, {"classes": ["east", "west"]})
    png = tmp_path / "ramp.png"
    argv = ["score", str(store), "--scores", "ramp", "--show", "east", "--png", str(png),
            "--slide", str(slide)]  # fmt: skip
    assert main(argv) == 0
    assert "east" in capsys.readouterr().out
    img = np.asarray(Image.open(png).convert("RGB")).astype(float)
    sx = img.shape[1] / (8 * 224)  # thumbnail px per level-0 px (the thumbnail is 1024 wide)

    def brightness(x_l0: float, y_l0: float) -> float:
        return float(img[int(y_l0 * sx), int(x_l0 * sx)].mean())

    left, right = brightness(112, 672), brightness(7 * 224 + 112, 672)
    assert right > left + 60, (left, right)
    # a similarity map saved by search: drawn stretched, as search --png draws it
    argv = ["search", str(store), "--region", "100,100,24,24", "--save", "like", "-k", "3"]
    assert main(argv) == 0
    argv = ["score", str(store), "--scores", "like", "--json", "--png", str(png), "--slide",
            str(slide)]  # fmt: skip
    assert main(argv) == 0
    data = json_out(capsys)
    assert data["kind"] == "similarity" and data["quantity"] == "similarity"


def test_score_scores_refuses_prompts_and_folders(slide_store, capsys):
    _, store = slide_store
    assert main(["score", str(store), "--scores", "x", "--class", "a=b"]) == 1
    assert "one or the other" in capsys.readouterr().err
    assert main(["score", str(store.parent), "--scores", "x"]) == 1
    assert "pass a store" in capsys.readouterr().err
    assert main(["score", str(store)]) == 1
    assert "--class" in capsys.readouterr().err


# -- the classifier on a partial store ---------------------------------------------------------
def test_classify_says_partial_in_text_and_json(tmp_path, capsys):
    """A store with 18 of its 24 tiles embedded (an interrupted run): training and applying
    say 'partial: 18 of 24 tiles', in --json too, as `score` does."""
    rc = full_grid(4, 6)
    emb = two_kinds(24)
    st = grid_store(tmp_path / "p.zarr", emb, rc, done=np.arange(24) < 18, complete=False)
    assert (st.n_done, st.complete) == (18, False)
    x = [ORIGIN[0] + c * TILE for c in range(7)]
    y0, y1 = ORIGIN[1], ORIGIN[1] + 4 * TILE
    ann = annotations(tmp_path / "a.geojson", {"a": [ring(x[0], y0, x[2], y1)],
                                               "b": [ring(x[4], y0, x[6], y1)]})  # fmt: skip
    clf = tmp_path / "clf.json"
    argv = ["classify", str(st.path), "--train", ann, "--write-classifier", str(clf)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "[partial: 18 of 24 tiles]" in text and "NOTE: the store is partial" in text
    assert main([*argv[:4], "--json"]) == 0
    data = json_out(capsys)
    assert (data["partial"], data["coverage"]) == (True, "partial: 18 of 24 tiles")
    assert (data["n_done"], data["n_tiles"]) == (18, 24)
    assert main(["classify", str(st.path), "--classifier", str(clf), "--save", "x"]) == 0
    assert "18 tiles [partial: 18 of 24 tiles] -> scores/x" in capsys.readouterr().out
    assert main(["classify", str(st.path), "--classifier", str(clf), "--json"]) == 0
    out = capsys.readouterr().out
    (row,) = json.loads(out[out.index("[") : out.rindex("]") + 1])
    assert row["coverage"] == "partial: 18 of 24 tiles" and row["partial"] is True
    # a complete store says nothing of the kind
    whole = grid_store(tmp_path / "w.zarr", emb, rc)
    assert main(["classify", str(whole.path), "--classifier", str(clf), "--json"]) == 0
    out = capsys.readouterr().out
    (row,) = json.loads(out[out.index("[") : out.rindex("]") + 1])
    assert (row["partial"], row["coverage"], row["n_done"]) == (False, "", 24)
