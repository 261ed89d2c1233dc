"""Export: zarr read back with plain zarr, GeoJSON tile polygons in level-0 pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_store import D, create, layout, rows, signature

from tilescope.errors import StoreError
from tilescope.export import export_store
from tilescope.score import PromptSet, save_scores, score_patches
from tilescope.store import EmbeddingStore


def finished_store(tmp_path: Path, n: int = 10, with_scores: bool = True) -> EmbeddingStore:
    st = create(tmp_path / "s.zarr", n=n)
    st.write(0, rows(0, n))
    st.finalize()
    ro = EmbeddingStore.open(tmp_path / "s.zarr")
    if with_scores:
        ps = PromptSet({"tumor": ["carcinoma"], "normal": ["benign"]})
        save_scores(
            ro, "run1", score_patches(ro.embeddings, rows(50, 52), 20.0, ps.class_names), ps
        )
    return ro


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_zarr_export_reads_back_with_plain_zarr(tmp_path: Path, dtype: str) -> None:
    st = finished_store(tmp_path)
    out = export_store(st.path, tmp_path / "out.zarr", dtype=dtype)  # type: ignore[arg-type]
    expected_scores, _ = st.read_scores("run1")

    # reading part: plain zarr only
    g = zarr.open_group(str(out), mode="r")
    emb = g["embeddings"][:]
    assert emb.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(emb, st.embeddings.astype(dtype))
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float64), axis=1), 1, atol=2e-3)
    np.testing.assert_array_equal(g["coords"][:], st.coords)
    np.testing.assert_allclose(g["coords_um"][:], st.coords * 0.25)
    np.testing.assert_array_equal(g["grid_rc"][:], st.grid_rc)
    np.testing.assert_array_equal(g["tissue"][:], st.tissue)
    np.testing.assert_array_equal(g["scores/run1/probs"][:], expected_scores["probs"])
    assert g["scores/run1"].attrs["tilescope_scores"]["classes"] == ["tumor", "normal"]
    attrs = g.attrs["tilescope_export"]
    assert attrs["dtype"] == dtype and attrs["tile_um"] == pytest.approx(448 * 0.25)
    assert attrs["provenance"]["model"]["model_id"] == "fake/model"
    assert attrs["provenance"]["slide"]["name"] == "s.svs"
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert hidden == [".s.zarr.lock"]  # no temporaries (the writer lock stays)


def test_geojson_polygons_match_tiles(tmp_path: Path) -> None:
    st = finished_store(tmp_path)
    out = export_store(st.path, tmp_path / "tiles.geojson")
    data = json.loads(out.read_text())
    probs = st.read_scores("run1")[0]["probs"]
    assert data["type"] == "FeatureCollection" and len(data["features"]) == st.n_tiles
    for i, feature in enumerate(data["features"]):
        x, y = st.coords[i]
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon"
        assert ring == [[x, y], [x + 448, y], [x + 448, y + 448], [x, y + 448], [x, y]]
        props = feature["properties"]
        assert props["index"] == i and [props["row"], props["col"]] == st.grid_rc[i].tolist()
        assert props["tissue"] == pytest.approx(float(st.tissue[i]))
        # the store's model is untrained: its scores say so in every measurement name
        assert props["measurements"]["run1: tumor [UNTRAINED]"] == pytest.approx(probs[i, 0])
        assert props["measurements"]["run1: normal [UNTRAINED]"] == pytest.approx(probs[i, 1])
        assert props["objectType"] == "tile"
        assert "id" not in feature  # QuPath takes a feature id for an object UUID


def test_geojson_omits_missing_values_and_names_trained_scores_plainly(tmp_path: Path) -> None:
    n = 6
    coords, rc, tissue = layout(n)
    st = EmbeddingStore.create_or_resume(
        tmp_path / "t.zarr", signature=signature(n, model__trained=True), coords=coords,
        grid_rc=rc, tissue=tissue, embed_dim=D,
    )  # fmt: skip
    st.write(0, rows(0, n))
    st.finalize()
    ro = EmbeddingStore.open(st.path)
    ps = PromptSet({"tumor": ["carcinoma"], "normal": ["benign"]})
    scores = score_patches(ro.embeddings, rows(50, 52), 20.0, ps.class_names)
    scores.probs[2, 0] = np.nan  # e.g. a tile that was not scored
    save_scores(ro, "run1", scores, ps)
    text = export_store(ro.path, tmp_path / "t.geojson").read_text()
    assert "null" not in text and "NaN" not in text
    features = json.loads(text)["features"]
    assert "run1: tumor" not in features[2]["properties"]["measurements"]
    assert features[2]["properties"]["measurements"]["run1: normal"] == pytest.approx(
        float(scores.probs[2, 1])
    )
    assert set(features[0]["properties"]["measurements"]) == {
        "tissue", "run1: tumor", "run1: normal"
    }  # fmt: skip


def test_export_without_scores_and_empty_store(tmp_path: Path) -> None:
    st = finished_store(tmp_path)
    out = export_store(st.path, tmp_path / "plain.zarr", scores=[])
    assert "scores" not in zarr.open_group(str(out), mode="r")
    empty = create(tmp_path / "e.zarr", n=0)
    empty.finalize()
    g = zarr.open_group(str(export_store(empty.path, tmp_path / "e-out.zarr")), mode="r")
    assert g["embeddings"].shape == (0, 8)
    geo = json.loads(export_store(empty.path, tmp_path / "e.geojson").read_text())
    assert geo["features"] == []


def test_export_refusals(tmp_path: Path) -> None:
    st = finished_store(tmp_path, with_scores=False)
    out = tmp_path / "out.zarr"
    export_store(st.path, out, dtype="float32")
    with pytest.raises(StoreError, match="already exists"):
        export_store(st.path, out)
    export_store(st.path, out, overwrite=True)  # float16 now
    assert zarr.open_group(str(out), mode="r")["embeddings"].dtype == np.float16
    with pytest.raises(StoreError, match="store itself"):
        export_store(st.path, st.path, overwrite=True)
    folder = tmp_path / "docs.zarr"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    with pytest.raises(StoreError, match="refusing"):
        export_store(st.path, folder, fmt="zarr", overwrite=True)
    assert (folder / "keep.txt").exists()
    half = create(tmp_path / "half.zarr")
    half.write(0, rows(0, 4))
    with pytest.raises(StoreError, match="incomplete"):
        export_store(half.path, tmp_path / "half-out.zarr")
    with pytest.raises(StoreError, match="no saved scores"):
        export_store(st.path, tmp_path / "x.zarr", scores=["nope"])


def test_export_refuses_unknown_suffixes_and_never_replaces_a_store(tmp_path: Path) -> None:
    st = finished_store(tmp_path, with_scores=False)
    for name in ("out.csv", "out", "out.zarr.bak"):
        with pytest.raises(StoreError, match="unknown export type"):
            export_store(st.path, tmp_path / name)
        assert not (tmp_path / name).exists()
    with pytest.raises(StoreError, match="suffix .geojson"):
        export_store(st.path, tmp_path / "x.zarr", fmt="geojson")
    other = create(tmp_path / "other.zarr", n=4)  # an embedding store, even incomplete
    other.write(0, rows(0, 2))
    other.flush()
    with pytest.raises(StoreError, match="is an embedding store"):
        export_store(st.path, other.path, overwrite=True)
    assert EmbeddingStore.open(other.path).n_done == 2  # untouched


def test_export_creates_the_output_folder_and_names_the_flag(tmp_path: Path) -> None:
    st = finished_store(tmp_path, with_scores=False)
    out = export_store(st.path, tmp_path / "a" / "b" / "tiles.geojson")
    assert out.is_file()
    with pytest.raises(StoreError, match="pass --overwrite") as err:
        export_store(st.path, out)
    assert "overwrite=True" not in str(err.value)
