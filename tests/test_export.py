"""Export: zarr read back with plain zarr, GeoJSON tile polygons in level-0 pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_store import D, create, layout, rows, signature

from tilescope.errors import OutputExistsError, StoreError
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


def test_export_creates_the_output_folder_and_names_no_flag(tmp_path: Path) -> None:
    """The core says "overwrite it"; each front end names its own control (see test_cli)."""
    st = finished_store(tmp_path, with_scores=False)
    out = export_store(st.path, tmp_path / "a" / "b" / "tiles.geojson")
    assert out.is_file()
    with pytest.raises(OutputExistsError, match="or overwrite it") as err:
        export_store(st.path, out)
    assert "--overwrite" not in str(err.value) and "overwrite=True" not in str(err.value)


# -- issue 11 items 3, 5, 8, 16 -----------------------------------------------------------------
def store_with_failed_and_missing_tiles(tmp_path: Path) -> EmbeddingStore:
    """10 tiles: rows 0-5 embedded, 6-7 failed to read, 8-9 not embedded yet."""
    st = create(tmp_path / "p.zarr", n=10)
    st.write(0, rows(0, 6))
    st.record_failures([(6, "JPEG error"), (7, "JPEG error")])
    st.close()
    ro = EmbeddingStore.open(st.path)
    ps = PromptSet({"tumor": ["carcinoma"], "normal": ["benign"]})
    save_scores(ro, "s", score_patches(ro.embeddings, rows(50, 52), 20.0, ps.class_names), ps)
    return ro


def test_failed_and_missing_tiles_are_left_out_of_exports(tmp_path: Path) -> None:
    st = store_with_failed_and_missing_tiles(tmp_path)
    g = zarr.open_group(str(export_store(st.path, tmp_path / "p-out.zarr")), mode="r")
    emb = g["embeddings"][:].astype(np.float64)
    assert emb.shape == (6, D)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)  # no zero rows
    np.testing.assert_array_equal(g["store_index"][:], np.arange(6))
    np.testing.assert_array_equal(g["coords"][:], st.coords[:6])
    assert g["scores/s/probs"].shape == (6, 2)
    counts = g.attrs["tilescope_export"]["rows"]
    assert counts["n_tiles"] == 10 and counts["n_exported"] == 6 and counts["n_failed"] == 2
    assert counts["n_not_embedded"] == 2 and counts["complete"] is False
    features = json.loads(export_store(st.path, tmp_path / "p.geojson").read_text())["features"]
    assert [f["properties"]["index"] for f in features] == list(range(6))  # no polygons for them


def test_a_killed_overwrite_keeps_the_old_export(tmp_path: Path, monkeypatch) -> None:
    from tilescope import _fsops

    st = finished_store(tmp_path, with_scores=False)
    for name in ("e.zarr", "e.geojson"):
        out = tmp_path / name
        export_store(st.path, out, dtype="float32")
        before = sorted(p.name for p in out.rglob("*")) if out.is_dir() else out.read_bytes()

        def killed(new: Path, target: Path) -> None:
            raise KeyboardInterrupt  # the export is killed before its new output is in place

        monkeypatch.setattr(_fsops, "publish", killed)
        with pytest.raises(KeyboardInterrupt):
            export_store(st.path, out, overwrite=True)
        monkeypatch.undo()
        after = sorted(p.name for p in out.rglob("*")) if out.is_dir() else out.read_bytes()
        assert after == before  # the old export is whole
    # and a kill between the two renames of a system without an atomic exchange is undone
    aside = _fsops.temp_path(tmp_path / "e.zarr", "old")
    (tmp_path / "e.zarr").rename(aside)
    with pytest.raises(OutputExistsError):  # the old export is back, so it exists
        export_store(st.path, tmp_path / "e.zarr")
    assert (tmp_path / "e.zarr" / "zarr.json").exists() and not aside.exists()


def test_leftovers_of_killed_exports_are_removed(tmp_path: Path) -> None:
    import os
    import time

    from tilescope import _fsops

    st = finished_store(tmp_path, with_scores=False)
    out = tmp_path / "e.zarr"
    junk = _fsops.temp_path(out)
    junk.mkdir()
    os.utime(junk, (time.time() - 3600, time.time() - 3600))
    export_store(st.path, out)
    assert not junk.exists()


def test_anonymize_replaces_the_slide_name_by_a_digest(tmp_path: Path) -> None:
    st = finished_store(tmp_path, with_scores=False)
    out = export_store(st.path, tmp_path / "a.zarr", anonymize=True)
    attrs = zarr.open_group(str(out), mode="r").attrs["tilescope_export"]
    assert attrs["anonymized"] is True
    assert attrs["provenance"]["slide"]["name"] == "slide-" + "f00"  # the header digest
    assert "s.svs" not in json.dumps(attrs)
    assert "s.svs" not in (out / "zarr.json").read_text()
