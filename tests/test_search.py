"""Region search: shapes to tiles, Rocchio queries, exact top-k, search across stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_store import layout, signature

from tilescope.errors import SearchError
from tilescope.search import (
    build_query,
    query_from_regions,
    search_stores,
    similarity,
    tiles_in_shapes,
    top_k,
)
from tilescope.store import EmbeddingStore

D = 16


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_embeddings(n: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, D)))


def make_store(path: Path, emb: np.ndarray, *, digest: str = "abc", finish: bool = True) -> Path:
    n = len(emb)
    coords, rc, tissue = layout(n)
    sig = signature(n, model__weights_digest=digest, model__embed_dim=D)
    st = EmbeddingStore.create_or_resume(
        path, signature=sig, coords=coords, grid_rc=rc, tissue=tissue, embed_dim=D, chunk_rows=8
    )
    st.write(0, emb if finish else emb[: n // 2])
    if finish:
        st.finalize()
    else:
        st.flush()
    return path


MODEL = {"model_id": "fake/model", "weights_digest": "abc", "trained": False, "embed_dim": D}

# -- shapes -------------------------------------------------------------------------------------
# a 4 x 4 grid of 10 px tiles from (0, 0): centres at 5, 15, 25, 35
COORDS = np.array([(x, y) for y in range(0, 40, 10) for x in range(0, 40, 10)])


def test_rectangle_selects_tiles_whose_centre_is_inside() -> None:
    rect = np.array([[0, 0], [20, 0], [20, 20], [0, 20]])
    np.testing.assert_array_equal(tiles_in_shapes(COORDS, 10, [rect]), [0, 1, 4, 5])
    # a (2, 2) array is a rectangle from two corners, in any order
    np.testing.assert_array_equal(
        tiles_in_shapes(COORDS, 10, [np.array([[21, 29], [4, 11]])]), [4, 5, 8, 9]
    )
    # no centre inside: the tiles it overlaps most (here four, equally)
    np.testing.assert_array_equal(
        tiles_in_shapes(COORDS, 10, [np.array([[6, 6], [14, 14]])]), [0, 1, 4, 5]
    )


def test_shapely_regions_leave_their_holes_out() -> None:
    """QuPath annotations (shapely, with holes): centres inside, not in a hole; a region
    smaller than a tile takes the tiles it overlaps most, as plain polygons do."""
    from shapely.geometry import Polygon, box

    ring = Polygon([(0, 0), (40, 0), (40, 40), (0, 40)], [[(10, 10), (30, 10), (30, 30), (10, 30)]])
    got = tiles_in_shapes(COORDS, 10, [ring])
    np.testing.assert_array_equal(got, [0, 1, 2, 3, 4, 7, 8, 11, 12, 13, 14, 15])
    np.testing.assert_array_equal(tiles_in_shapes(COORDS, 10, [box(6, 6, 14, 14)]), [0, 1, 4, 5])
    eligible = np.ones(16, bool)
    eligible[0] = False
    np.testing.assert_array_equal(tiles_in_shapes(COORDS, 10, [ring], eligible=eligible),
                                  [1, 2, 3, 4, 7, 8, 11, 12, 13, 14, 15])  # fmt: skip


def test_half_open_edges_assign_shared_centres_once() -> None:
    left = np.array([[0, 0], [15, 0], [15, 40], [0, 40]])  # right edge through centres x=15
    right = np.array([[15, 0], [40, 0], [40, 40], [15, 40]])
    a, b = tiles_in_shapes(COORDS, 10, [left]), tiles_in_shapes(COORDS, 10, [right])
    assert set(a).isdisjoint(b) and len(a) + len(b) == 16
    both = tiles_in_shapes(COORDS, 10, [left, right])
    np.testing.assert_array_equal(both, np.arange(16))


def test_polygon_and_winding() -> None:
    tri = np.array([[0, 0], [40, 0], [0, 40]])  # below the anti-diagonal x + y < 40
    centres = COORDS + 5
    expected = np.flatnonzero(centres.sum(1) < 40)
    np.testing.assert_array_equal(tiles_in_shapes(COORDS, 10, [tri]), expected)
    np.testing.assert_array_equal(tiles_in_shapes(COORDS, 10, [tri[::-1]]), expected)
    closed = np.vstack([tri, tri[:1]])
    np.testing.assert_array_equal(tiles_in_shapes(COORDS, 10, [closed]), expected)
    with pytest.raises(SearchError, match="vertices"):
        tiles_in_shapes(COORDS, 10, [np.array([[0, 0], [1, 1], [2, 2]]).T])


# -- queries ------------------------------------------------------------------------------------
def test_query_of_one_tile_ranks_it_first() -> None:
    emb = random_embeddings(500)
    for i in (0, 17, 499):
        q = build_query(emb, [i])
        np.testing.assert_allclose(q, emb[i], atol=1e-6)
        assert top_k(similarity(emb, q), 5)[0] == i


def test_negative_region_lowers_tiles_like_it() -> None:
    rng = np.random.default_rng(3)
    a, b = unit(rng.standard_normal(D)), unit(rng.standard_normal(D))
    emb = unit(
        np.vstack([a + 0.1 * rng.standard_normal((20, D)), b + 0.1 * rng.standard_normal((20, D))])
    )
    mixed = [0, 1, 2, 20, 21, 22]  # the drawn region covers both kinds
    plain = similarity(emb, build_query(emb, mixed))
    pushed = similarity(emb, build_query(emb, mixed, negative_idx=range(20, 30), neg_weight=1.0))
    assert pushed[20:].mean() < plain[20:].mean() - 0.2
    assert pushed[:20].min() > pushed[20:].max()  # every A-like tile outranks every B-like
    assert set(top_k(pushed, 10)) <= set(range(20))
    # tiles in both sets count as positive only
    same = build_query(emb, [0, 1], negative_idx=[1, 25])
    np.testing.assert_allclose(same, build_query(emb, [0, 1], negative_idx=[25]))


def test_query_errors() -> None:
    emb = random_embeddings(10)
    with pytest.raises(SearchError, match="draw over tissue"):
        build_query(emb, [])
    with pytest.raises(SearchError, match="cancel out"):
        build_query(np.vstack([emb[:1], emb[:1]]), [0], negative_idx=[1], neg_weight=1.0)
    with pytest.raises(SearchError, match="width"):
        similarity(emb, np.ones(D + 1, np.float32))


def test_top_k_ties_exclusions_and_stability() -> None:
    sim = np.array([0.5, 0.9, 0.5, np.nan, 0.9, 0.1, 0.5])
    np.testing.assert_array_equal(top_k(sim, 4), [1, 4, 0, 2])
    np.testing.assert_array_equal(top_k(sim, 3, exclude=[1]), [4, 0, 2])
    mask = np.zeros(7, bool)
    mask[[0, 4]] = True
    np.testing.assert_array_equal(top_k(sim, 3, exclude=mask), [1, 2, 6])
    np.testing.assert_array_equal(top_k(sim, 100), [1, 4, 0, 2, 6, 5])  # NaN never ranks
    assert top_k(sim, 0).size == 0 and top_k(np.zeros(0), 3).size == 0
    many = np.random.default_rng(0).integers(0, 20, 5000) / 20.0  # lots of ties
    reference = np.lexsort((np.arange(5000), -many))[:300]
    for _ in range(3):
        np.testing.assert_array_equal(top_k(many, 300), reference)


def test_similarity_is_exact_cosine() -> None:
    emb = random_embeddings(50)
    q = unit(np.random.default_rng(9).standard_normal(D))
    sim = similarity(emb, q)
    assert sim.dtype == np.float32 and sim.shape == (50,)
    np.testing.assert_allclose(sim, emb.astype(np.float64) @ q.astype(np.float64), atol=1e-6)


# -- across stores ------------------------------------------------------------------------------
def test_search_stores_ranks_across_slides(tmp_path: Path) -> None:
    e1, e2 = random_embeddings(30, seed=1), random_embeddings(25, seed=2)
    p1 = make_store(tmp_path / "slides" / "a.zarr", e1)
    p2 = make_store(tmp_path / "slides" / "b.zarr", e2)
    q = build_query(e2, [7])
    matches = search_stores(q, [p1, p2], model=MODEL, k=5)
    assert len(matches) == 5
    assert (matches[0].store, matches[0].index) == (str(p2), 7)
    assert matches[0].similarity == pytest.approx(1.0, abs=1e-5)
    coords, _, _ = layout(25)
    assert (matches[0].x, matches[0].y) == tuple(coords[7]) and matches[0].tile_l0 == 448.0
    assert matches[0].slide_name == "s.svs"
    sims = [m.similarity for m in matches]
    assert sims == sorted(sims, reverse=True)
    every = np.concatenate([similarity(e1, q), similarity(e2, q)])
    assert sims == pytest.approx(sorted(every, reverse=True)[:5], abs=1e-6)
    assert search_stores(q, tmp_path / "slides", model=MODEL, k=5) == matches  # a folder
    again = search_stores(q, [p1, p2], model=MODEL, k=5, exclude={p2: [7]})
    assert (str(p2), 7) not in {(m.store, m.index) for m in again}


def test_store_of_another_model_is_refused(tmp_path: Path) -> None:
    p1 = make_store(tmp_path / "a.zarr", random_embeddings(10))
    p2 = make_store(tmp_path / "b.zarr", random_embeddings(10), digest="other")
    q = random_embeddings(1)[0]
    with pytest.raises(SearchError) as err:
        search_stores(q, [p1, p2], model=MODEL, k=3)
    msg = str(err.value)
    assert str(p2) in msg and "other" in msg and "different model" in msg
    assert str(p1) not in msg
    with pytest.raises(SearchError, match="different model"):
        search_stores(np.ones(D + 1, np.float32), [p1], model=MODEL)
    with pytest.raises(SearchError, match="weights_digest"):
        search_stores(q, [p1], model={})


def test_incomplete_store_searches_done_rows_only(tmp_path: Path) -> None:
    emb = random_embeddings(16)
    p = make_store(tmp_path / "half.zarr", emb, finish=False)
    matches = search_stores(emb[12], [p], model=MODEL, k=16)
    assert {m.index for m in matches} == set(range(8))


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(SearchError, match="no Tilescope embedding stores"):
        search_stores(np.ones(D), tmp_path, model=MODEL)


def test_folder_search_skips_exports_with_a_warning(tmp_path: Path) -> None:
    from tilescope.export import export_store

    folder = tmp_path / "stores"
    p1 = make_store(folder / "a.zarr", random_embeddings(10))
    export_store(p1, folder / "a-export.zarr")
    q = random_embeddings(1)[0]
    with pytest.warns(UserWarning, match="a-export.zarr"):
        matches = search_stores(q, folder, model=MODEL, k=3)
    assert {m.store for m in matches} == {str(p1)}


def test_query_from_regions_uses_embedded_tiles_only(tmp_path: Path) -> None:
    emb = random_embeddings(16)
    store = EmbeddingStore.open(make_store(tmp_path / "half.zarr", emb, finish=False))
    coords, _, _ = layout(16)
    centre = coords + 224  # tile side 448 level-0 px; rows 0..7 are done, 8..15 are not

    def around(*rows: int) -> list[np.ndarray]:
        return [np.array([centre[i] - 10, centre[i] + 10]) for i in rows]

    query, pos, neg = query_from_regions(store, around(7, 8), around(6, 9), neg_weight=0.5)
    assert pos.tolist() == [7] and neg.tolist() == [6]
    np.testing.assert_allclose(query, build_query(emb, [7], [6], 0.5), atol=1e-6)
    with pytest.raises(SearchError, match="tile 8 is not embedded"):
        query_from_regions(store, around(8), empty_message="tile 8 is not embedded")
    with pytest.raises(SearchError, match="covers no embedded tissue tiles"):
        query_from_regions(store, around(8))


def test_search_stores_expands_every_folder_of_a_list(tmp_path: Path) -> None:
    e1, e2, e3 = (random_embeddings(10, seed=s) for s in (1, 2, 3))
    p1 = make_store(tmp_path / "f1" / "a.zarr", e1)
    p2 = make_store(tmp_path / "f2" / "b.zarr", e2)
    p3 = make_store(tmp_path / "c.zarr", e3)
    q = build_query(e2, [4])
    matches = search_stores(q, [tmp_path / "f1", tmp_path / "f2", p3, p2], model=MODEL, k=30)
    assert len(matches) == 30  # every row once: b.zarr, named twice, is searched once
    assert {m.store for m in matches} == {str(p1), str(p2), str(p3)}
    assert (matches[0].store, matches[0].index) == (str(p2), 4)


# -- issue 11 item 10 -------------------------------------------------------------------------
def test_a_region_smaller_than_a_tile_selects_the_tile_it_overlaps_most() -> None:
    # 2 x 2 px inside tile 5 (x 10..20, y 10..20): that tile, not "covers no tiles"
    np.testing.assert_array_equal(
        tiles_in_shapes(COORDS, 10, [np.array([[12, 12], [14, 14]])]), [5]
    )
    # straddling tiles 5 and 6, mostly in 6
    np.testing.assert_array_equal(
        tiles_in_shapes(COORDS, 10, [np.array([[19, 12], [24, 14]])]), [6]
    )
    # a small triangle inside tile 10
    tri = np.array([[21, 21], [24, 21], [21, 24]])
    np.testing.assert_array_equal(tiles_in_shapes(COORDS, 10, [tri]), [10])
    # only eligible tiles (e.g. embedded ones) are chosen
    eligible = np.ones(16, bool)
    eligible[6] = False
    got = tiles_in_shapes(COORDS, 10, [np.array([[19, 12], [24, 14]])], eligible=eligible)
    np.testing.assert_array_equal(got, [5])
    # outside every tile: nothing
    assert tiles_in_shapes(COORDS, 10, [np.array([[50, 50], [52, 52]])]).size == 0


def test_unlike_regions_covering_the_query_are_not_silently_ignored(tmp_path: Path) -> None:
    emb = random_embeddings(10)
    store = EmbeddingStore.open(make_store(tmp_path / "s.zarr", emb))
    coords, _, _ = layout(10)
    box = [np.array([coords[0] - 1, coords[2] + 448])]  # tiles 0, 1, 2
    with pytest.raises(SearchError, match="all of them inside the query regions"):
        query_from_regions(store, box, box)
    # partly overlapping: the shared tiles count as like, and are not reported as unlike
    wider = [np.array([coords[1] - 1, coords[4] + 448])]  # tiles 1..4
    _, pos, neg = query_from_regions(store, box, wider)
    assert pos.tolist() == [0, 1, 2] and neg.tolist() == [3, 4]


def test_default_unlike_weight_keeps_near_duplicates_from_dominating() -> None:
    """A "not like this" region of near-duplicate tissue (cosine ~0.9 to the query) must
    lower tiles like it, not turn the query into their small difference: with the default
    weight the query's own kind still ranks first; with 1.0 it would not."""
    from tilescope.search import NEG_WEIGHT

    rng = np.random.default_rng(0)
    a = unit(rng.standard_normal(D))
    b = unit(a + 0.45 * unit(rng.standard_normal(D)))  # a near-duplicate kind (cos ~0.9)
    c = unit(rng.standard_normal(D))  # unrelated tissue
    emb = unit(np.vstack([k + 0.03 * rng.standard_normal((30, D)) for k in (a, b, c)]))
    assert float(a @ b) > 0.85
    pos, neg = list(range(0, 5)), list(range(30, 35))
    q = build_query(emb, pos, neg)  # the default weight
    sim = similarity(emb, q)
    assert 0.25 <= NEG_WEIGHT <= 0.5
    assert sim[5:30].min() > sim[35:60].max()  # A above B: B is pushed down ...
    assert sim[35:60].min() > sim[60:].max()  # ... but still above unrelated tissue
    assert sim[5:30].mean() > 0.9  # the query still looks like A
    heavy = similarity(emb, build_query(emb, pos, neg, neg_weight=1.0))
    assert heavy[5:30].mean() < 0.5  # at 1.0 the query is mostly the A-B difference ...
    assert heavy[60:].max() > heavy[5:30].min()  # ... and unrelated tissue outranks A
    with pytest.raises(SearchError, match="weight"):
        build_query(emb, pos, neg, neg_weight=-1.0)
