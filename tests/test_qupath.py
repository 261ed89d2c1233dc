"""QuPath GeoJSON both ways: QuPath's file forms in, QuPath-importable objects out."""

from __future__ import annotations

import json
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon, shape
from synthetic_stores import ORIGIN, cell_box, full_grid, grid_store

from tilescope.cli import main
from tilescope.export import export_store
from tilescope.qupath import (
    AnnotationError,
    annotation_feature,
    annotation_regions,
    read_geojson,
    regions_by_class,
    score_annotations,
    tile_union,
    tiles_in_regions,
    write_features,
)
from tilescope.store import EmbeddingStore

TUMOR_ID = "6b1e5a4e-3c1f-4c5e-9b0a-2f6a9c0d7e11"


def qupath_file() -> dict:
    """What QuPath 0.5 writes with File > Export objects as GeoJSON (FeatureCollection), plus
    the older forms its importer still reads."""
    outer = cell_box(1, 1, 5, 5)
    hole = cell_box(3, 3, 3, 3)  # around tile (3, 3) only: its centre is in the hole
    island = cell_box(8, 8, 8, 8)
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "id": TUMOR_ID,
                "geometry": {"type": "MultiPolygon", "coordinates": [[outer, hole], [island]]},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    "isLocked": True,
                    "measurements": {"Area µm^2": 12345.6, "Perimeter": float("nan")},
                },
            },
            {
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": {"type": "Polygon", "coordinates": [cell_box(7, 0, 9, 2)]},
                "properties": {
                    "objectType": "annotation",
                    "name": "stroma 1",
                    "classification": {"name": "Stroma", "color": [150, 200, 150]},
                    "color": [10, 20, 30],
                },
            },
            {  # QuPath 0.2/0.3: type in the id, colorRGB packed, measurements as a list
                "type": "Feature",
                "id": "PathAnnotationObject",
                "geometry": {"type": "Polygon", "coordinates": [cell_box(0, 7, 1, 9)]},
                "properties": {
                    "classification": {"name": "Immune cells", "colorRGB": -6895466},
                    "measurements": [{"name": "Num Detections", "value": 3.0}],
                },
            },
            {  # a derived class on a detection
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": {"type": "Polygon", "coordinates": [cell_box(0, 0, 0, 0)]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"names": ["Tumor", "Positive"], "color": [255, 0, 0]},
                },
            },
            {  # a point annotation encloses no area
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": {"type": "Point", "coordinates": [500.0, 500.0]},
                "properties": {"objectType": "annotation", "classification": "Tumor"},
            },
            {"type": "Feature", "geometry": None, "properties": {"note": "nothing to draw"}},
        ],
    }


@pytest.fixture
def qp_path(tmp_path: Path) -> Path:
    p = tmp_path / "annotations.geojson"
    # QuPath may write NaN (GsonTools serialises special floats); keep it in the file
    p.write_text(json.dumps(qupath_file(), indent=2))
    return p


@pytest.fixture
def store(tmp_path: Path) -> EmbeddingStore:
    rc = full_grid(10, 10)
    emb = np.random.default_rng(0).standard_normal((len(rc), 16))
    return grid_store(tmp_path / "s.zarr", emb, rc)


def test_reads_the_objects_as_qupath_does(qp_path: Path) -> None:
    objs = read_geojson(qp_path)
    assert len(objs) == 5  # the feature without geometry is skipped
    tumor, stroma, immune, det, point = objs
    assert tumor.object_type == "annotation" and tumor.id == TUMOR_ID and tumor.locked
    assert tumor.classification == "Tumor" and tumor.class_color == (200, 0, 0)
    assert tumor.measurements["Area µm^2"] == 12345.6
    assert np.isnan(tumor.measurements["Perimeter"])  # QuPath writes and keeps NaN
    assert tumor.geometry.geom_type == "MultiPolygon"
    first = shapely.get_parts(tumor.geometry)[0]
    assert len(first.interiors) == 1  # the hole survives
    assert stroma.name == "stroma 1" and stroma.class_color == (150, 200, 150)
    assert immune.object_type == "annotation" and immune.id is None  # v0.2 id: a type
    assert immune.classification == "Immune cells" and immune.class_color == (150, 200, 150)
    assert immune.measurements == {"Num Detections": 3.0}
    assert det.object_type == "detection" and det.classification == "Tumor: Positive"
    assert point.classification == "Tumor" and point.area is None


def test_regions_keep_holes_and_leave_out_points_and_detections(qp_path, store) -> None:
    regions = regions_by_class(read_geojson(qp_path))
    assert list(regions) == ["Tumor", "Stroma", "Immune cells"]
    assert len(regions["Tumor"]) == 1  # the point is not a region
    rows = tiles_in_regions(store.coords, store.tile_l0, regions["Tumor"])
    rc = {tuple(v) for v in store.grid_rc[rows]}
    expected = {(r, c) for r in range(1, 6) for c in range(1, 6)} - {(3, 3)} | {(8, 8)}
    assert rc == expected
    with pytest.raises(AnnotationError, match="'Necrosis'.*classes with polygons: 'Tumor'"):
        regions_by_class(read_geojson(qp_path), classes=["Necrosis"])


@pytest.mark.parametrize("form", ["list", "feature", "geometry"])
def test_other_forms_qupath_reads(tmp_path: Path, form: str) -> None:
    feature = qupath_file()["features"][1]
    data = {"list": [feature, feature], "feature": feature, "geometry": feature["geometry"]}
    p = tmp_path / "a.json"
    p.write_text(json.dumps(data[form]))
    objs = read_geojson(p)
    assert len(objs) == (2 if form == "list" else 1)
    assert objs[0].classification == (None if form == "geometry" else "Stroma")
    assert objs[0].object_type == "annotation"


def test_bad_files_name_the_file_and_the_feature(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="no such file"):
        read_geojson(tmp_path / "missing.geojson")
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match=r"bad\.geojson: not valid JSON"):
        read_geojson(bad)
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    with pytest.raises(AnnotationError, match="no GeoJSON features"):
        read_geojson(bad)
    broken = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0]]]}}
    bad.write_text(json.dumps([qupath_file()["features"][1], broken]))
    with pytest.raises(AnnotationError, match="feature 2"):
        read_geojson(bad)


def test_a_self_crossing_outline_is_repaired_with_a_warning(tmp_path: Path) -> None:
    bowtie = [[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]
    p = tmp_path / "b.geojson"
    p.write_text(json.dumps({"type": "Polygon", "coordinates": [bowtie]}))
    with pytest.warns(UserWarning, match="repaired in features"):
        (obj,) = read_geojson(p)
    assert obj.area is not None and obj.area.is_valid and obj.area.area == pytest.approx(5000)


def test_written_features_are_what_qupath_imports(tmp_path: Path) -> None:
    poly = Polygon(cell_box(0, 0, 2, 2), [cell_box(1, 1, 1, 1)])
    f = annotation_feature(poly, classification="Tumor", measurements={"a": 1.0, "b": np.nan})
    assert "id" not in f  # QuPath gives imported objects fresh UUIDs
    props = f["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"]["name"] == "Tumor"
    assert len(props["classification"]["color"]) == 3  # QuPath refuses a name without colour
    assert props["measurements"] == {"a": 1.0}
    out = write_features(tmp_path / "o.geojson", [f])
    (back,) = read_geojson(out)
    assert back.geometry.equals(poly) and back.classification == "Tumor"
    with pytest.raises(AnnotationError, match="already exists"):
        write_features(out, [f])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def scored_store(tmp_path: Path, mpp: float = 0.25) -> EmbeddingStore:
    """A 12 x 12 grid; class 'tumor' high in a ring (rows/cols 2..7, not the centre 4..5)
    and in one far tile; tile (0, 0) failed to read."""
    rc = full_grid(12, 12)
    emb = np.random.default_rng(1).standard_normal((len(rc), 8))
    failed = (rc[:, 0] == 0) & (rc[:, 1] == 0)
    st = grid_store(tmp_path / "sc.zarr", emb, rc, done=~failed, mpp=mpp)
    ring = (rc >= 2).all(1) & (rc <= 7).all(1) & ~((rc >= 4).all(1) & (rc <= 5).all(1))
    p = np.where(ring | ((rc[:, 0] == 10) & (rc[:, 1] == 10)) | failed, 0.9, 0.1)
    probs = np.stack([p, 1 - p], axis=1).astype(np.float32)
    probs[failed] = np.nan
    st.write_scores("tc", {"probs": probs}, {"classes": ["tumor", "normal"],
                                             "colors": [[200, 0, 0], [0, 0, 200]]})  # fmt: skip
    return st


@pytest.mark.parametrize("mpp", [0.25, 0.2631])  # 448 px tiles; 425.69 px (fractional)
def test_score_regions_become_classified_annotations_with_holes(tmp_path, mpp) -> None:
    st = scored_store(tmp_path, mpp)
    feats = score_annotations(st, "tc", threshold=0.5, classes=["tumor"])
    assert len(feats) == 2  # the ring and the far tile; no slivers between tiles
    geoms = [shape(f["geometry"]) for f in feats]
    ring = max(geoms, key=lambda g: g.area)
    assert len(ring.interiors) == 1  # the low-probability centre is a hole
    t = st.tile_l0
    assert ring.area == pytest.approx((36 - 4) * t * t, rel=0.01)
    props = feats[0]["properties"]
    assert props["classification"] == {"name": "tumor", "color": [200, 0, 0]}
    assert props["name"].startswith("tumor (probability >= 0.5)")
    assert "[UNTRAINED]" in props["name"]  # the fake model is untrained
    tiles = sorted(f["properties"]["measurements"]["Tiles"] for f in feats)
    assert tiles == [1, 32]
    # round trip: the annotation covers exactly its tiles (centres inside)
    rows = tiles_in_regions(st.coords, t, [ring])
    assert len(rows) == 32 and (st.read_scores("tc")[0]["probs"][rows, 0] > 0.5).all()


def test_tile_union_is_exact_on_the_grid(tmp_path) -> None:
    st = scored_store(tmp_path, 0.2631)
    geom, cells = tile_union(st, np.array([1, 2, 13, 14]))  # a 2 x 2 block
    assert cells.equals(shapely.box(1, 0, 3, 2))
    x0, y0 = ORIGIN[0] + st.tile_l0, ORIGIN[1]
    want = shapely.box(x0, y0, x0 + 2 * st.tile_l0, y0 + 2 * st.tile_l0)
    assert shapely.normalize(geom).equals_exact(shapely.normalize(want), 1e-6)


def test_export_annotations_and_detections_from_the_cli(tmp_path, capsys) -> None:
    st = scored_store(tmp_path)
    out = tmp_path / "regions.geojson"
    argv = ["export", str(st.path), "--scores", "tc", "--as", "annotations", "--threshold",
            "0.5", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    objs = read_geojson(out)
    assert {o.classification for o in objs} == {"tumor", "normal"}
    assert all(o.object_type == "annotation" and o.class_color for o in objs)
    det = tmp_path / "tiles.geojson"
    assert (
        main(["export", str(st.path), "--scores", "tc", "--as", "detections", "-o", str(det)]) == 0
    )
    tiles = read_geojson(det)
    assert len(tiles) == st.n_tiles - 1  # the failed tile is left out
    assert {o.object_type for o in tiles} == {"detection"}
    by_class = {o.classification for o in tiles}
    assert by_class == {"tumor", "normal"}
    one = next(o for o in tiles if o.classification == "tumor")
    assert one.measurements["tc: tumor [UNTRAINED]"] == pytest.approx(0.9)
    assert one.class_color == (200, 0, 0)


def test_annotations_need_one_score_set(tmp_path, capsys) -> None:
    st = scored_store(tmp_path)
    st.write_scores("other", {"probs": np.full((st.n_tiles, 1), 0.7, np.float32)},
                    {"classes": ["x"]})  # fmt: skip
    out = tmp_path / "a.geojson"
    assert main(["export", str(st.path), "--as", "annotations", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--scores NAME" in err and "other, tc" in err and not out.exists()
    assert main(["export", str(st.path), "--as", "annotations", "-o", str(tmp_path / "a.zarr"),
                 "--scores", "tc"]) == 1  # fmt: skip
    assert "GeoJSON" in capsys.readouterr().err
    with pytest.raises(AnnotationError, match="no class 'necrosis'"):
        score_annotations(st, "tc", classes=["necrosis"])


def test_search_from_qupath_annotations_leaves_the_hole_out(qp_path, store, capsys) -> None:
    argv = ["search", str(store.path), "--region-geojson", str(qp_path), "--region-class",
            "Tumor", "--json", "-k", "100"]  # fmt: skip
    assert main(argv) == 0
    matches = json.loads(capsys.readouterr().out)["matches"]
    rows = {m["index"] for m in matches}
    query = tiles_in_regions(store.coords, store.tile_l0, regions_by_class(
        read_geojson(qp_path))["Tumor"])  # fmt: skip
    assert not rows & set(query.tolist())  # query tiles are not matches
    hole = int(np.flatnonzero((store.grid_rc == [3, 3]).all(1))[0])
    assert hole in rows  # the hole is not part of the query: it can be a match
    emb = store.embeddings
    q = emb[query].mean(0)
    q /= np.linalg.norm(q)
    best = max((i for i in range(store.n_tiles) if i not in set(query)), key=lambda i: emb[i] @ q)
    assert matches[0]["index"] == best


def test_search_unlike_class_and_errors(qp_path, store, capsys) -> None:
    argv = ["search", str(store.path), "--region-geojson", str(qp_path), "--region-class",
            "Tumor", "--unlike-class", "Stroma", "--json"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    argv = ["search", str(store.path), "--region-geojson", str(qp_path), "--region-class", "Fat"]
    assert main(argv) == 1
    assert "no annotation polygons of class 'Fat'" in capsys.readouterr().err
    assert main(["search", str(store.path)]) == 1
    assert "--region-geojson" in capsys.readouterr().err


@pytest.fixture(scope="module")
def crc(tmp_path_factory: pytest.TempPathFactory):
    """The 32 labelled CRC-VAL-HE-7K patches as a slide (`test_classify.crc_mosaic`: class k
    on grid row k, patches in columns 0-1 and 3-4, glass in column 2), embedded with the small
    model, and QuPath annotations of each class's two regions: ``full.geojson`` classifies both
    as the class, ``split.geojson`` the second as "<class> held-out"."""
    from test_classify import crc_mosaic, qupath_annotations

    tmp = tmp_path_factory.mktemp("crc")
    slide, regions = crc_mosaic(tmp / "crc.tif")
    argv = ["embed", str(slide), "-o", str(tmp), "--model", "tiny-random", "--min-tissue", "0"]
    assert main(argv) == 0
    st = EmbeddingStore.open(tmp / "crc.zarr")
    classes = list(regions)
    label = np.where(st.grid_rc[:, 1] != 2, st.grid_rc[:, 0], -1)  # class index; -1: glass
    full = qupath_annotations(tmp / "full.geojson", regions)
    split = {**{c: r[:1] for c, r in regions.items()},
             **{f"{c} held-out": r[1:] for c, r in regions.items()}}  # fmt: skip
    return st, classes, label, full, qupath_annotations(tmp / "split.geojson", split)


def ranking(capsys, st, ann: Path, like: list[str], unlike: list[str], label, *more: str):
    """Store rows of the labelled patches in `tilescope search`'s match order."""
    argv = ["search", str(st.path), "--region-geojson", str(ann), "--json", "-k", "100",
            "--exact", "--no-index", *more]  # fmt: skip
    argv += [a for c in like for a in ("--region-class", c)]
    argv += [a for c in unlike for a in ("--unlike-class", c)]
    capsys.readouterr()
    assert main(argv) == 0
    rows = np.array([m["index"] for m in json.loads(capsys.readouterr().out)["matches"]])
    return rows[label[rows] >= 0]


def mean_rank(order: np.ndarray, rows: np.ndarray) -> float:
    """Mean position of `rows` in `order` (0: first), as a fraction of the last position."""
    return float(np.mean([np.flatnonzero(order == r)[0] for r in rows]) / (len(order) - 1))


def test_unlike_class_patches_are_ranked_low_on_labelled_patches(crc, capsys) -> None:
    """For every pair of CRC classes (like A, not like B), with QuPath annotations: B's
    patches never rise when B is "not like this", and sink for most pairs; with weight 1 they
    sit in the lower part of the ranking; B's patches that were *not* annotated (held out)
    sink too. The model is untrained (its features still follow colour and texture), so the
    bounds leave room below what was measured: 43 of 56 pairs sink at the default weight (the
    rest keep their ranks), mean position 0.55 (0.50 without), 0.65 at weight 1; held-out
    patches sink by 62 positions summed over the pairs."""
    st, classes, label, full, split = crc
    sunk = 0
    position, position_w1 = [], []
    for a, cls_a in enumerate(classes):
        base = ranking(capsys, st, full, [cls_a], [], label)
        assert not np.isin(base, np.flatnonzero(label == a)).any()  # the query is no match
        for b, cls_b in enumerate(classes):
            if b == a:
                continue
            patches_b = np.flatnonzero(label == b)
            before = mean_rank(base, patches_b)
            after = mean_rank(ranking(capsys, st, full, [cls_a], [cls_b], label), patches_b)
            assert after >= before, f"not like {cls_b!r} moved its patches up ({cls_a!r})"
            sunk += after > before
            position.append(after)
    assert sunk >= 36  # of 56 pairs
    assert np.mean(position) >= 0.53
    for a, cls_a in enumerate(classes):
        for b, cls_b in enumerate(classes):
            if b != a:
                order = ranking(capsys, st, full, [cls_a], [cls_b], label, "--unlike-weight", "1")
                position_w1.append(mean_rank(order, np.flatnonzero(label == b)))
    assert np.mean(position_w1) >= 0.6
    held_shift = 0.0
    for a, cls_a in enumerate(classes):
        like = [cls_a, f"{cls_a} held-out"]
        base = ranking(capsys, st, split, like, [], label)
        for b, cls_b in enumerate(classes):
            if b == a:
                continue
            held = np.flatnonzero((label == b) & (st.grid_rc[:, 1] > 2))  # not annotated
            order = ranking(capsys, st, split, like, [cls_b], label)
            held_shift += (mean_rank(order, held) - mean_rank(base, held)) * (len(order) - 1)
    assert held_shift >= 30


def test_roi_for_embedding_is_every_annotation_polygon(qp_path, tmp_path) -> None:
    regions = annotation_regions(qp_path)
    assert len(regions) == 3  # tumor, stroma, immune; not the point nor the detection
    p = tmp_path / "points.geojson"
    p.write_text(json.dumps(qupath_file()["features"][4]))
    with pytest.raises(AnnotationError, match="no annotation polygons"):
        annotation_regions(p)


def test_embed_roi_is_checked_before_the_model_loads(qp_path, tmp_path, capsys) -> None:
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"not a slide")
    argv = ["embed", str(slide), str(slide), "-o", str(tmp_path / "o"), "--roi", str(qp_path),
            "--model", "no-such-model"]  # fmt: skip
    assert main(argv) == 1
    assert "one slide" in capsys.readouterr().err
    argv = ["embed", str(slide), "-o", str(tmp_path / "o"), "--roi", str(tmp_path / "none.json"),
            "--model", "no-such-model"]  # fmt: skip
    assert main(argv) == 1
    assert "none.json: no such file" in capsys.readouterr().err


def test_embed_roi_embeds_only_the_annotated_tiles(synth_05, tmp_path) -> None:
    """`embed --roi` embeds exactly the tiles whose square shares area with an annotation,
    checked against shapely's intersection areas (not the code under test). The ROI is laid
    on synth_05's 224 px grid (origin 0) so that each rule is put to the test: a polygon
    whose right edge lies on a grid line (the tiles beyond only touch it), a hole that is
    exactly tile (row 2, col 3) (inside the polygon's outline, left out), and an annotation
    smaller than a tile (its tile is embedded)."""
    roi = tmp_path / "roi.geojson"
    outer = [[300, 250], [1120, 250], [1120, 1000], [300, 1000], [300, 250]]
    hole = [[672, 448], [896, 448], [896, 672], [672, 672], [672, 448]]
    speck = [[1800, 700], [1810, 700], [1810, 705], [1800, 705], [1800, 700]]
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [outer, hole]},
         "properties": {"objectType": "annotation"}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [speck]},
         "properties": {"objectType": "annotation"}},
    ]}))  # fmt: skip
    out = tmp_path / "o"
    argv = ["embed", str(synth_05.path), "-o", str(out), "--model", "tiny-random", "--roi",
            str(roi)]  # fmt: skip
    assert main(argv) == 0
    (store_path,) = out.glob("*.zarr")
    st = EmbeddingStore.open(store_path)  # coords: every tissue tile of the grid
    assert st.tile_l0 == 224.0 and (st.coords % 224 == 0).all()
    area = shapely.union(Polygon(outer, [hole]), Polygon(speck))
    shared = [shapely.box(x, y, x + 224, y + 224).intersection(area).area for x, y in st.coords]
    want = np.flatnonzero(np.asarray(shared) > 0)
    np.testing.assert_array_equal(np.flatnonzero(st.done), want)
    cells = {(int(y) // 224, int(x) // 224): i for i, (x, y) in enumerate(st.coords)}
    assert not st.done[cells[(2, 3)]]  # in the hole
    touching = [cells[(r, 5)] for r in range(1, 5) if (r, 5) in cells]
    assert touching and not st.done[touching].any()  # only touch the outline
    assert st.done[cells[(3, 8)]]  # under the speck
    assert 0 < st.n_done < st.n_tiles


def test_detections_without_a_score_set_are_unclassified(tmp_path) -> None:
    """`--as detections` with no score set: tiles with tissue only, no classification."""
    st = scored_store(tmp_path)
    out = export_store(st.path, tmp_path / "d.geojson", objects="detections", scores=[])
    tiles = read_geojson(out)
    assert all(o.classification is None for o in tiles)
    assert all(set(o.measurements) == {"tissue"} for o in tiles)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_geojson(out)  # nothing to repair


def test_a_similarity_map_and_search_matches_become_annotations(tmp_path) -> None:
    """A one-column score set without classes (as a saved similarity map would be) exports as
    regions named after it; top matches export as one classified square each."""
    from tilescope.qupath import match_features
    from tilescope.search import Match

    st = scored_store(tmp_path)
    sim = st.read_scores("tc")[0]["probs"][:, 0]
    st.write_scores("like_q", {"similarity": sim}, {"query": "drawn"})
    feats = score_annotations(st, "like_q", threshold=0.8)
    assert {f["properties"]["classification"]["name"] for f in feats} == {"like_q"}
    assert feats[0]["properties"]["name"].startswith("like_q (similarity >= 0.8)")
    matches = [Match(str(st.path), st.slide_name, 5, 100, 50, 0.9, st.tile_l0),
               Match("other.zarr", "other.svs", 1, 0, 0, 0.8, st.tile_l0)]  # fmt: skip
    out = write_features(tmp_path / "m.geojson", match_features(matches, slide_name="slide.svs"))
    (obj,) = read_geojson(out)
    assert obj.classification == "Search match" and obj.measurements["Rank"] == 1
    assert obj.geometry.bounds == (100, 50, 100 + st.tile_l0, 50 + st.tile_l0)
