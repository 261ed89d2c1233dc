"""The embedding pipeline end to end: slide → store, equivalence, resume after SIGKILL, errors."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from _paths import CMU, TCGA, need
from PIL import Image

from tilescope.embed import embed_slide, iter_embed_slide
from tilescope.errors import MissingMppError, StoreCorruptError, StoreMismatchError
from tilescope.grid import TileGrid
from tilescope.slide import Slide
from tilescope.store import EmbeddingStore
from tilescope.synthetic import SyntheticSlide
from tilescope.tissue import tissue_mask


def tree_digest(path: Path) -> str:
    """A hash of every file under `path` (names and bytes), to prove nothing changed."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def cmu_store(tmp_path_factory, tiny_encoder):
    out = tmp_path_factory.mktemp("embed") / "cmu.zarr"
    result = embed_slide(need(CMU), out, encoder=tiny_encoder, batch_size=16)
    return out, result


def test_store_contents(cmu_store, tiny_encoder):
    path, result = cmu_store
    assert result.complete and result.n_tiles == result.embedded_now > 20
    assert not result.trained_model
    store = EmbeddingStore.open(path)
    emb = store.embeddings
    assert emb.shape == (result.n_tiles, tiny_encoder.embed_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert store.done.all() and store.complete
    sig = store.signature
    assert sig["model"]["trained"] is False
    assert sig["slide"]["name"] == "CMU-1-Small-Region.svs"
    assert sig["grid"]["tile_px"] == 224 and sig["grid"]["target_mpp"] == 0.5
    # embeddings chunks hold many rows: whole-array reads are a handful of files
    arr = zarr.open_group(str(path), mode="r")["embeddings"]
    assert arr.chunks[0] >= min(1024, result.n_tiles)


def test_pipeline_embedding_equals_open_clip_preprocess(cmu_store, tiny_encoder):
    """A stored row equals open_clip's own preprocess + encode_image of the same tile."""
    import torch

    path, _ = cmu_store
    store = EmbeddingStore.open(path)
    i = len(store.coords) // 2
    x, y = (int(v) for v in store.coords[i])
    with Slide(CMU) as s:
        tile = s.read_region_mpp((x, y), (224, 224), mpp=0.5)
    pre = tiny_encoder.open_clip_preprocess(Image.fromarray(tile)).unsqueeze(0)
    with torch.inference_mode():
        ref = tiny_encoder.model.encode_image(pre, normalize=True)[0].numpy()
    assert float(ref @ store.embeddings[i]) >= 0.999


def test_repeat_run_is_a_no_op_and_deterministic(cmu_store, tiny_encoder, tmp_path):
    path, first = cmu_store
    before = tree_digest(path)
    again = embed_slide(CMU, path, encoder=tiny_encoder)
    assert again.embedded_now == 0 and again.complete
    assert tree_digest(path) == before
    other = embed_slide(CMU, tmp_path / "b.zarr", encoder=tiny_encoder, batch_size=7)
    np.testing.assert_allclose(
        EmbeddingStore.open(other.store_path).embeddings,
        EmbeddingStore.open(path).embeddings,
        atol=1e-5,
    )


def test_mismatched_settings_are_refused_and_store_untouched(cmu_store, tiny_encoder):
    path, _ = cmu_store
    before = tree_digest(path)
    with pytest.raises(StoreMismatchError) as info:
        embed_slide(CMU, path, encoder=tiny_encoder, grid=TileGrid(tile_px=256))
    msg = str(info.value)
    assert "tile_px" in msg and "224" in msg and "256" in msg and "overwrite" in msg
    assert tree_digest(path) == before


def test_corrupted_store_is_a_clear_error(cmu_store, tiny_encoder, tmp_path):
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{ not json")
    before = tree_digest(bad)
    with pytest.raises(StoreCorruptError, match=str(bad)):
        embed_slide(CMU, bad, encoder=tiny_encoder)
    assert tree_digest(bad) == before


def test_slide_without_mpp_needs_an_override(tiny_encoder, tmp_path):
    out = tmp_path / "tcga.zarr"
    with pytest.raises(MissingMppError, match="--slide-mpp"):
        embed_slide(need(TCGA), out, encoder=tiny_encoder)
    assert not out.exists()


def test_cancel_keeps_rows_and_resumes(tiny_encoder, tmp_path):
    spec = SyntheticSlide.with_random_blobs(4096, 3072, mpp=0.5, n=3, seed=7)
    slide = spec.write(tmp_path / "s.tif")
    out = tmp_path / "s.zarr"
    gen = iter_embed_slide(slide, out, encoder=tiny_encoder, batch_size=8)
    for report in gen:
        if report.stage == "embedding" and report.done >= 8:
            break
    gen.close()  # what napari's Cancel does: the batches in flight are written too
    partial = EmbeddingStore.open(out)
    assert 8 <= partial.n_done < partial.n_tiles and not partial.complete
    result = embed_slide(slide, out, encoder=tiny_encoder, batch_size=8)
    assert result.complete and result.embedded_now == result.n_tiles - partial.n_done


KILL_SCRIPT = """
import sys, time
import tilescope.store as store
import tilescope._encoder as enc
store.FLUSH_SECONDS = 0.2  # flush often so a kill lands between flushes
slow = enc.Encoder.submit_images  # what the pipeline calls
def submit_images(self, batch):  # slow the tiny model down so the kill lands mid-run
    time.sleep(0.05)
    return slow(self, batch)
enc.Encoder.submit_images = submit_images
from tilescope.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path):
    spec = SyntheticSlide.with_random_blobs(6144, 4096, mpp=0.5, n=4, seed=11)
    slide = spec.write(tmp_path / "k.tif")
    cmd = [sys.executable, "-c", KILL_SCRIPT, "embed", str(slide), "--model", "tiny-random",
           "--batch-size", "8", "--workers", "1"]  # fmt: skip
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([*cmd, "-o", str(killed)], stderr=subprocess.DEVNULL)
    store_path = killed / "k.zarr"
    deadline = time.monotonic() + 120
    n_done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        try:
            n_done = int(zarr.open_group(str(store_path), mode="r")["done"][:].sum())
        except Exception:
            continue
        if n_done >= 16:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    interrupted = EmbeddingStore.open(store_path)
    assert 16 <= interrupted.n_done < interrupted.n_tiles
    subprocess.run([*cmd, "-o", str(killed)], check=True, stderr=subprocess.DEVNULL)
    subprocess.run([*cmd, "-o", str(clean)], check=True, stderr=subprocess.DEVNULL)
    a, b = EmbeddingStore.open(store_path), EmbeddingStore.open(clean / "k.zarr")
    assert a.complete and b.complete
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.tissue, b.tissue)
    np.testing.assert_array_equal(a.done, b.done)
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)


def test_unreadable_tile_is_recorded_and_the_store_completes(tiny_encoder, tmp_path, monkeypatch):
    """One tile that never decodes must not block the store: it is recorded as failed, left
    out of the results, not retried by default, and retried on request."""
    from tilescope.errors import RegionReadError
    from tilescope.score import PromptSet, score_store

    out = tmp_path / "f.zarr"
    with Slide(need(CMU)) as slide:
        coords = TileGrid().layout(slide, tissue_mask(slide)).coords
    bad = tuple(int(v) + 100 for v in coords[len(coords) // 2])  # a point inside one tile
    real = Slide.read_region_raw

    def flaky(self, location, level, size, *, out=None):
        x, y = location  # level 0 here: the region covers [x, x + w) x [y, y + h)
        tiles = size[0] % 224 == size[1] % 224 == 0  # tile reads, not the tissue detector's
        if tiles and x <= bad[0] < x + size[0] and y <= bad[1] < y + size[1]:
            raise RegionReadError(self.path, f"failed to decode region at {location}")
        return real(self, location, level, size, out=out)

    # in-process reads (num_workers=0) see the patched reader: the block holding the point
    # fails, is read again tile by tile, and only the tile under the point fails
    monkeypatch.setattr(Slide, "read_region_raw", flaky)
    first = embed_slide(need(CMU), out, encoder=tiny_encoder, num_workers=0)
    assert first.complete and len(first.failed) == 1 and first.n_failed == 1
    store = EmbeddingStore.open(out)
    ((i, message),) = store.failures
    assert store.complete and not store.done[i] and "decode" in message
    x, y = store.coords[i]
    assert x <= bad[0] < x + 224 and y <= bad[1] < y + 224
    prompts = PromptSet.parse("a: tumor\nb: stroma")
    scores, pooled = score_store(store, prompts, tiny_encoder.encode_text, tiny_encoder.logit_scale)
    assert np.isnan(scores.probs[i]).all() and np.isfinite(list(pooled.scores.values())).all()

    again = embed_slide(CMU, out, encoder=tiny_encoder, num_workers=0)
    assert again.embedded_now == 0 and again.failed == ()  # not retried by default
    monkeypatch.setattr(Slide, "read_region_raw", real)
    retry = embed_slide(CMU, out, encoder=tiny_encoder, retry_failed=True)
    assert retry.embedded_now == 1 and retry.n_failed == 0
    healed = EmbeddingStore.open(out)
    assert healed.done.all() and healed.failures == [] and healed.complete


def test_should_stop_reports_what_was_done(tiny_encoder, tmp_path):
    calls = []

    def stop_after_two() -> bool:
        calls.append(1)
        return len(calls) > 3

    result = embed_slide(need(CMU), tmp_path / "s.zarr", encoder=tiny_encoder, batch_size=8,
                         should_stop=stop_after_two)  # fmt: skip
    store = EmbeddingStore.open(result.store_path)
    assert not result.complete and result.embedded_now == store.n_done > 0
