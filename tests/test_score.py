"""Prompt parsing, the zero-shot text matrix, patch scores, heatmaps and pooling, by hand."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_store import create, rows

from tilescope.errors import GridError, PromptError, SearchError
from tilescope.score import (
    Heatmap,
    PatchScores,
    PromptSet,
    PromptWarning,
    TileGeometry,
    heatmap,
    load_scores,
    pool,
    save_scores,
    score_patches,
    text_matrix,
)
from tilescope.store import EmbeddingStore

# -- prompts ------------------------------------------------------------------------------------


def parse_quiet(text: str | list[str]) -> PromptSet:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning expected
        return PromptSet.parse(text)


def test_parse_lines_and_cli_style_agree() -> None:
    text = "tumor: invasive carcinoma; malignant epithelium\n\n# comment\nnormal: benign tissue"
    cli = ["tumor=invasive carcinoma|malignant epithelium", "normal = benign  tissue"]
    expected = {
        "tumor": ["invasive carcinoma", "malignant epithelium"],
        "normal": ["benign tissue"],
    }
    assert parse_quiet(text).classes == expected
    assert parse_quiet(cli).classes == expected


def test_parse_bare_items_are_classes() -> None:
    ps = parse_quiet("necrosis; lymphocytes\nstroma")
    assert ps.classes == {
        "necrosis": ["necrosis"],
        "lymphocytes": ["lymphocytes"],
        "stroma": ["stroma"],
    }


def test_templates_times_prompts() -> None:
    ps = PromptSet({"a": ["x", "y"], "b": ["z"]}, ["an H&E image of {}", "{} tissue"])
    assert ps.texts() == [
        "an H&E image of x",
        "x tissue",
        "an H&E image of y",
        "y tissue",
        "an H&E image of z",
        "z tissue",
    ]
    assert ps.class_names == ["a", "b"]


def test_duplicate_classes_merge_with_warning() -> None:
    with pytest.warns(PromptWarning, match="'tumor' given twice"):
        ps = PromptSet.parse("tumor: a\nnormal: n\ntumor: b; a")
    assert ps.classes == {"tumor": ["a", "b"], "normal": ["n"]}


def test_empty_prompts_are_dropped_with_warning() -> None:
    with pytest.warns(PromptWarning, match="empty prompt dropped"):
        ps = PromptSet.parse("tumor: a;; b;\nnormal: n")
    assert ps.classes["tumor"] == ["a", "b"]
    with pytest.warns(PromptWarning, match="empty prompt dropped"):
        assert PromptSet.parse("x;;y").class_names == ["x", "y"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "no classes"),
        ("# only a comment\n   \n", "no classes"),
        ("tumor:\nnormal: n", "'tumor' has no prompts"),
        ("tumor: ;  |\nnormal: n", "'tumor' has no prompts"),
        (": carcinoma\nnormal: n", "no class name"),
    ],
)
def test_prompt_errors(text: str, match: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptWarning)
        with pytest.raises(PromptError, match=match):
            PromptSet.parse(text)


def test_one_class_warns_but_works() -> None:
    with pytest.warns(PromptWarning, match="always 1"):
        ps = PromptSet.parse("tumor: carcinoma")
    scores = score_patches(np.eye(2, dtype=np.float32), np.array([[1.0, 0.0]]), 10.0)
    np.testing.assert_array_equal(scores.probs, [[1.0], [1.0]])
    np.testing.assert_allclose(scores.cosine[:, 0], [1.0, 0.0])
    assert ps.class_names == ["tumor"]


def test_templates_need_one_placeholder() -> None:
    with pytest.raises(PromptError, match="exactly one"):
        PromptSet({"a": ["x"], "b": ["y"]}, ["no placeholder"])
    with pytest.raises(PromptError, match="exactly one"):
        PromptSet({"a": ["x"], "b": ["y"]}, [])


def test_text_matrix_averages_then_renormalises() -> None:
    vectors = {
        "x": [3.0, 0, 0],
        "y": [0, 2.0, 0],
        "z": [0, 0, 5.0],
        "a x": [1.0, 0, 0],
        "b x": [0, 1.0, 0],
        "a z": [0, 0, 1.0],
        "b z": [0, 0, 2.0],
    }
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return np.array([vectors[t] for t in texts])

    m = text_matrix(PromptSet({"A": ["x", "y"], "B": ["z"]}), encode)
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(m, [[s, s, 0], [0, 0, 1]], atol=1e-7)
    assert m.dtype == np.float32 and calls == [["x", "y", "z"]]  # one call for everything
    m2 = text_matrix(PromptSet({"A": ["x"], "B": ["z"]}, ["a {}", "b {}"]), encode)
    np.testing.assert_allclose(m2, [[s, s, 0], [0, 0, 1]], atol=1e-7)
    with pytest.raises(PromptError, match="expected"):
        text_matrix(PromptSet({"A": ["x"], "B": ["z"]}), lambda t: np.zeros((1, 3)))


# -- scores and pooling -------------------------------------------------------------------------
E = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
T = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
P = np.array([[0.88079708, 0.11920292], [0.11920292, 0.88079708], [0.40131234, 0.59868766]])


def test_score_patches_by_hand() -> None:
    sc = score_patches(E, T, 2.0, ["a", "b"])
    np.testing.assert_allclose(sc.cosine, [[1, 0], [0, 1], [0.6, 0.8]], atol=1e-7)
    np.testing.assert_allclose(sc.logits, [[2, 0], [0, 2], [1.2, 1.6]], atol=1e-6)
    np.testing.assert_allclose(sc.probs, P, atol=1e-6)
    assert sc.probs.dtype == np.float32 and sc.classes == ["a", "b"]
    with pytest.raises(PromptError, match="width"):
        score_patches(E, np.ones((2, 3)), 2.0)


def test_pool_mean_by_hand() -> None:
    sc = score_patches(E, T, 2.0, ["a", "b"])
    r = pool(sc, "mean")
    assert r.label == "b" and r.method == "mean" and r.attention is None
    assert r.scores == pytest.approx({"a": 0.46710411, "b": 0.53289589}, abs=1e-6)
    rw = pool(sc, "mean", weights=np.array([1.0, 0.0, 1.0]))
    assert rw.scores["a"] == pytest.approx((P[0, 0] + P[2, 0]) / 2, abs=1e-6)


def test_pool_topk_by_hand() -> None:
    sc = score_patches(E, T, 2.0, ["a", "b"])
    # top-2 logits: a -> (2 + 1.2) / 2 = 1.6, b -> (2 + 1.6) / 2 = 1.8; softmax
    r = pool(sc, "topk", k=2)
    assert r.scores == pytest.approx({"a": 0.450166, "b": 0.549834}, abs=1e-6)
    # k larger than N is clipped: means 3.2/3 and 3.6/3
    big = pool(sc, "topk", k=100).scores
    e = math.exp(1.2 - 3.2 / 3)
    assert big["b"] == pytest.approx(e / (1 + e), abs=1e-6)
    # weight 0 leaves a patch out: a's logits without patch 0 are 0, 1.2
    assert pool(sc, "topk", k=1, weights=np.array([0, 1, 1])).scores["a"] == pytest.approx(
        math.exp(1.2) / (math.exp(1.2) + math.exp(2.0)), abs=1e-6
    )


@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
def test_pool_attention_by_hand(temperature: float) -> None:
    sc = score_patches(E, T, 2.0, ["a", "b"])
    cosine = [[1, 0], [0, 1], [0.6, 0.8]]
    logits = [[2, 0], [0, 2], [1.2, 1.6]]
    r = pool(sc, "attention", temperature=temperature)
    slide_logits = []
    for c in range(2):
        w = [math.exp(cosine[i][c] / temperature) for i in range(3)]
        a = [wi / sum(w) for wi in w]
        np.testing.assert_allclose(r.attention[:, c], a, atol=1e-6)
        slide_logits.append(sum(a[i] * logits[i][c] for i in range(3)))
    e = [math.exp(v) for v in slide_logits]
    assert r.scores == pytest.approx({"a": e[0] / sum(e), "b": e[1] / sum(e)}, abs=1e-6)
    assert sum(r.scores.values()) == pytest.approx(1.0)
    assert r.attention.shape == (3, 2)


def test_pool_attention_is_not_decided_by_one_outlier_tile() -> None:
    """10,000 tiles that are clearly b and one tile that is clearly a: the slide is b."""
    rng = np.random.default_rng(0)
    cos_b = 0.35 + 0.01 * rng.standard_normal(10_000)
    cosine = np.stack([0.25 + 0.01 * rng.standard_normal(10_000), cos_b], axis=1)
    cosine = np.vstack([cosine, [[0.45, 0.20]]]).astype(np.float32)  # the outlier
    logits = (100.0 * cosine).astype(np.float32)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
    sc = PatchScores(["a", "b"], cosine, logits, probs, 100.0)
    for method in ("attention", "topk", "mean"):
        assert pool(sc, method).label == "b", method
    # with a very low temperature attention becomes max pooling: the outlier then decides
    assert pool(sc, "attention", temperature=0.001).label == "a"


def test_tiles_with_weight_zero_take_no_part_even_if_nan() -> None:
    sc = score_patches(E, T, 2.0, ["a", "b"])
    for arr in (sc.cosine, sc.logits, sc.probs):
        arr[1] = np.nan  # a tile that was never embedded
    w = np.array([1.0, 0.0, 1.0])
    clean = score_patches(E[[0, 2]], T, 2.0, ["a", "b"])
    for method in ("mean", "topk", "attention"):
        got = pool(sc, method, weights=w).scores
        assert got == pytest.approx(pool(clean, method).scores, abs=1e-6), method


def test_pool_errors() -> None:
    empty = score_patches(np.zeros((0, 2), np.float32), T, 2.0, ["a", "b"])
    for method in ("mean", "topk", "attention"):
        with pytest.raises(SearchError, match="no tissue tiles"):
            pool(empty, method)
    sc = score_patches(E, T, 2.0, ["a", "b"])
    with pytest.raises(PromptError, match="unknown pooling"):
        pool(sc, "max")  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="weights"):
        pool(sc, weights=np.array([1.0, -1.0, 1.0]))
    with pytest.raises(SearchError):
        pool(sc, weights=np.zeros(3))


# -- heatmaps -----------------------------------------------------------------------------------
def test_heatmap_overlap_by_hand() -> None:
    # tile 4 px, stride 2 px -> cell 2 px; tile = 2x2 cells, stride = 1 cell
    geo = TileGeometry(np.array([[0, 0], [0, 1], [1, 1]]), (2, 2), 4, 2, 2.0, (10.0, 20.0))
    hm = heatmap(np.array([1.0, 3.0, 5.0]), geo)
    nan = np.nan
    np.testing.assert_allclose(hm.raster, [[1, 2, 3], [1, 3, 4], [nan, 5, 5]])
    assert hm.raster.dtype == np.float32 and hm.cell_l0 == 4.0 and hm.origin_l0 == (10.0, 20.0)
    scale, translate = hm.world_scale_translate(0.5)
    assert scale == (2.0, 2.0)
    assert translate == (pytest.approx((20 + 2 - 0.5) * 0.5), pytest.approx((10 + 2 - 0.5) * 0.5))


def test_heatmap_without_overlap_is_the_grid() -> None:
    rc = np.array([[0, 0], [1, 2], [0, 2]])
    hm = heatmap(np.array([0.1, 0.2, 0.3]), TileGeometry(rc, (2, 3), 224, 224, 1.0, (0, 0)))
    nan = np.nan
    np.testing.assert_allclose(hm.raster, [[0.1, nan, 0.3], [nan, nan, 0.2]], rtol=1e-6)
    assert hm.cell_l0 == 224.0


def test_heatmap_matches_brute_force_and_lands_on_tiles() -> None:
    rng = np.random.default_rng(1)
    rows_, cols_ = 5, 7
    rc = np.array([(r, c) for r in range(rows_) for c in range(cols_) if rng.random() < 0.7])
    vals = rng.random(len(rc))
    tile, stride, ds, origin = 224, 192, 1.5, (33.0, 71.0)  # overlap 32: cell 32 px
    hm = heatmap(vals, TileGeometry(rc, (rows_, cols_), tile, stride, ds, origin))
    g, a, s = 32, 7, 6
    total, count = np.zeros(hm.raster.shape), np.zeros(hm.raster.shape)
    for (r, c), v in zip(rc, vals, strict=True):
        total[r * s : r * s + a, c * s : c * s + a] += v
        count[r * s : r * s + a, c * s : c * s + a] += 1
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(hm.raster, total / count, rtol=1e-5)
    assert hm.cell_l0 == g * ds
    # tile i's cells cover exactly tile i's level-0 square
    stride_l0, tile_l0 = stride * ds, tile * ds
    for r, c in rc[:5]:
        y0 = origin[1] + r * s * hm.cell_l0
        x0 = origin[0] + c * s * hm.cell_l0
        assert (x0, y0) == pytest.approx((origin[0] + c * stride_l0, origin[1] + r * stride_l0))
        assert a * hm.cell_l0 == pytest.approx(tile_l0)


def test_heatmap_smoothing_ignores_nan() -> None:
    rc = np.array([(r, c) for r in range(6) for c in range(6) if c < 4])
    geo = TileGeometry(rc, (6, 6), 224, 224, 1.0, (0, 0))
    flat = heatmap(np.full(len(rc), 0.7), geo, smooth_sigma=1.5).raster
    np.testing.assert_allclose(flat[:, :4], 0.7, rtol=1e-5)  # no zeros bleed in from NaN
    assert np.isnan(flat[:, 4:]).all()
    spike = np.zeros(len(rc))
    spike[0] = 1.0
    smooth = heatmap(spike, geo, smooth_sigma=1.0).raster
    assert 0 < smooth[0, 1] < smooth[0, 0] < 1
    assert np.nansum(smooth) > 0


def test_heatmap_errors_and_empty() -> None:
    with pytest.raises(GridError, match="common factor"):
        heatmap(np.zeros(1), TileGeometry(np.array([[0, 0]]), (5000, 5000), 224, 223, 1.0, (0, 0)))
    with pytest.raises(GridError, match="outside"):
        heatmap(np.zeros(1), TileGeometry(np.array([[3, 0]]), (2, 2), 224, 224, 1.0, (0, 0)))
    empty = heatmap(np.zeros(0), TileGeometry(np.zeros((0, 2)), (0, 0), 224, 224, 1.0, (0, 0)))
    assert empty.raster.shape == (0, 0)


def test_geometry_from_store_and_layout(tmp_path: Path) -> None:
    st = create(tmp_path / "s.zarr")
    geo = TileGeometry.from_store(st)
    assert (geo.tile_px, geo.stride_px, geo.downsample, geo.origin_l0) == (224, 224, 2.0, (100, 50))
    assert geo.grid_shape == (2, 5)
    hm = heatmap(np.arange(10.0), geo)
    np.testing.assert_array_equal(hm.raster, np.arange(10.0).reshape(2, 5))
    assert isinstance(hm, Heatmap) and hm.cell_l0 == 448.0

    class Layout:
        grid_rc, origin, grid_shape, downsample = st.grid_rc, (100, 50), (2, 5), 2.0

    assert TileGeometry.from_layout(Layout(), tile_px=224, overlap_px=32).stride_px == 192


# -- persistence --------------------------------------------------------------------------------
def test_scores_round_trip_through_store(tmp_path: Path) -> None:
    st = create(tmp_path / "s.zarr")
    st.write(0, rows(0, 10))
    st.finalize()
    ro = EmbeddingStore.open(tmp_path / "s.zarr")
    text = rows(20, 23)
    ps = PromptSet({"a": ["x"], "b": ["y", "z"], "c": ["w"]}, ["an image of {}"])
    sc = score_patches(ro.embeddings, text, 30.0, ps.class_names)
    save_scores(ro, "run1", sc, ps, meta={"note": "test"})
    back, meta = load_scores(EmbeddingStore.open(tmp_path / "s.zarr"), "run1")
    assert isinstance(back, PatchScores) and back.classes == ["a", "b", "c"]
    for name in ("cosine", "logits", "probs"):
        np.testing.assert_array_equal(getattr(back, name), getattr(sc, name))
    assert back.logit_scale == 30.0 and meta["model_id"] == "fake/model"
    assert meta["prompts"] == {"a": ["x"], "b": ["y", "z"], "c": ["w"]} and meta["note"] == "test"
    assert meta["templates"] == ["an image of {}"]
    assert pool(back, "topk", k=3).label == pool(sc, "topk", k=3).label
