"""Live results at the core: scores and similarities that grow batch by batch while a slide is
embedded, equal to scoring the finished store, with tiles not embedded yet left clear."""

from __future__ import annotations

import numpy as np
import pytest

from tilescope.embed import embed_slide, iter_embed_slide
from tilescope.errors import SearchError
from tilescope.live import LiveScores, LiveSimilarity, coverage_text
from tilescope.raster import TileGeometry, heatmap
from tilescope.schedule import TileSchedule
from tilescope.score import PromptSet, score_store
from tilescope.search import similarity_map
from tilescope.store import EmbeddingStore

PROMPTS = PromptSet.parse("tumor: carcinoma\nstroma: fibrous stroma\nfat: adipose tissue")


@pytest.fixture(scope="module")
def whole(synth_05, tiny_encoder, tmp_path_factory):
    """The slide embedded whole, for reference."""
    out = tmp_path_factory.mktemp("live") / "whole.zarr"
    embed_slide(synth_05.path, out, encoder=tiny_encoder, batch_size=8)
    return EmbeddingStore.open(out)


def test_scores_grow_batch_by_batch_to_those_of_the_whole_store(synth_05, tiny_encoder, tmp_path,
                                                                whole):  # fmt: skip
    enc = tiny_encoder
    schedule = TileSchedule()
    schedule.prioritize_view((300.0, 300.0, 1100.0, 900.0))
    stop = []
    gen = iter_embed_slide(
        synth_05.path,
        tmp_path / "p.zarr",
        encoder=enc,
        batch_size=8,
        order=schedule,
        num_workers=0,
        should_stop=lambda: bool(stop),
    )
    live = None
    seen: list[int] = []
    for report in gen:
        if report.indices is None:
            continue
        if live is None:  # the first batch is in: score the store as it is (maybe empty)
            live = LiveScores.from_store(EmbeddingStore.open(tmp_path / "p.zarr"), PROMPTS,
                                         enc.encode_text, enc.logit_scale)  # fmt: skip
        live.add(report.indices, report.embeddings)
        seen += report.indices.tolist()
        # only the rows embedded so far have scores; the others are NaN, not 0
        assert live.n_done == len(set(seen))
        assert np.isnan(live.probs[~live.done]).all() and not np.isnan(live.probs[live.done]).any()
        if len(seen) >= 24 and not stop:
            partial_label = live.pool("attention")
            hm = heatmap(live.probs[:, 0], TileGeometry.from_store(whole))
            assert np.isnan(hm.raster).sum() > 0  # tiles not embedded are clear
            stop.append(1)  # the batches in flight are still reported (should_stop)
    assert live is not None and partial_label.label in PROMPTS.class_names
    # the rest of the slide, then the same as scoring the finished store
    rest = iter_embed_slide(synth_05.path, tmp_path / "p.zarr", encoder=enc, batch_size=8)
    for report in rest:
        if report.indices is not None:
            live.add(report.indices, report.embeddings)
    ref, pooled = score_store(whole, PROMPTS, enc.encode_text, enc.logit_scale)
    assert live.done.all()
    np.testing.assert_allclose(live.probs, ref.probs, atol=1e-5)
    again = live.pool("attention")
    assert again.label == pooled.label
    assert again.scores == pytest.approx(pooled.scores, abs=1e-5)


def test_similarity_grows_and_matches_the_store(whole):
    emb, n = whole.embeddings, whole.n_tiles
    query = emb[3] / np.linalg.norm(emb[3])
    live = LiveSimilarity(query, n)
    live.add(np.arange(0, n, 2), emb[::2])
    assert np.isnan(live.sim[1::2]).all() and np.isfinite(live.sim[::2]).all()
    live.add(np.arange(1, n, 2), emb[1::2])
    np.testing.assert_allclose(live.sim, similarity_map(whole, query), atol=1e-6)
    with pytest.raises(SearchError, match="another model"):
        live.add(np.array([0]), np.zeros((1, 7), np.float32))


def test_coverage_text():
    assert coverage_text(612, 36_864) == "partial: 612 of 36,864 tiles"
    assert coverage_text(10, 10) == ""
    assert coverage_text(9, 10, complete=True) == ""  # the missing tile failed to read
