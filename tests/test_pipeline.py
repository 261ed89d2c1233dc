"""The overlapped pipeline: order and regions, live rows in progress reports, the writer
thread's errors, cancel, and the provenance of the resampling."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import zarr

from tilescope import _readers
from tilescope.cli import main
from tilescope.embed import embed_slide, iter_embed_slide
from tilescope.errors import StoreError, StoreNotice
from tilescope.regions import tiles_overlapping
from tilescope.schedule import TileSchedule
from tilescope.store import EmbeddingStore


def _run(gen):
    reports = []
    try:
        while True:
            reports.append(next(gen))
    except StopIteration as stop:
        return reports, stop.value


def test_progress_carries_the_rows_just_embedded(synth_05, tiny_encoder, tmp_path) -> None:
    reports, result = _run(iter_embed_slide(synth_05.path, tmp_path / "s.zarr",
                                            encoder=tiny_encoder, batch_size=8))  # fmt: skip
    live = [r for r in reports if r.indices is not None]
    assert sum(len(r.indices) for r in live) == result.n_tiles == result.embedded_now
    store = EmbeddingStore.open(result.store_path)
    for r in live:
        assert r.embeddings.shape == (len(r.indices), store.embed_dim)
        np.testing.assert_array_equal(store.embeddings[np.sort(r.indices)],
                                      r.embeddings[np.argsort(r.indices)])  # fmt: skip
    assert all(b.done >= a.done for a, b in zip(reports, reports[1:], strict=False))
    again, done = _run(iter_embed_slide(synth_05.path, tmp_path / "s.zarr",
                                        encoder=tiny_encoder))  # fmt: skip
    assert done.embedded_now == 0 and again[-1].rate == 0.0  # no rate from earlier rows


def test_regions_make_a_partial_store_that_a_later_run_completes(synth_05, tiny_encoder,
                                                                 tmp_path) -> None:  # fmt: skip
    full = embed_slide(synth_05.path, tmp_path / "full.zarr", encoder=tiny_encoder)
    box = (300.0, 250.0, 500.0, 300.0)
    part = embed_slide(synth_05.path, tmp_path / "p.zarr", encoder=tiny_encoder, regions=[box])
    store = EmbeddingStore.open(part.store_path)
    want = tiles_overlapping(store.coords, store.tile_l0, [box])
    assert not part.complete and part.embedded_now == len(want) > 0
    np.testing.assert_array_equal(np.flatnonzero(store.done), want)
    rest = embed_slide(synth_05.path, tmp_path / "p.zarr", encoder=tiny_encoder)
    assert rest.complete and rest.embedded_now == rest.n_tiles - len(want)
    a, b = EmbeddingStore.open(part.store_path), EmbeddingStore.open(full.store_path)
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)


@pytest.mark.parametrize("workers", [0, 1])
def test_view_first_embeds_the_nearest_tiles_first(synth_05, tiny_encoder, tmp_path,
                                                   workers) -> None:  # fmt: skip
    schedule = TileSchedule()
    point = (2500.0, 1500.0)  # level 0, far from the grid's first tiles
    schedule.prioritize_near(point)
    gen = iter_embed_slide(synth_05.path, tmp_path / "v.zarr", encoder=tiny_encoder,
                           batch_size=4, order=schedule, num_workers=workers)  # fmt: skip
    first = next(r for r in gen if r.indices is not None)
    gen.close()
    assert schedule.bound
    layout = schedule.layout
    dist = np.hypot(*(layout.coords + layout.tile_l0 / 2 - point).T)
    assert dist[first.indices].max() <= np.sort(dist)[15]  # from the nearest block
    store = EmbeddingStore.open(tmp_path / "v.zarr")
    assert set(first.indices) <= set(np.flatnonzero(store.done))  # written on cancel


def test_a_view_that_moves_while_embedding_reorders_what_is_left(synth_05, tiny_encoder,
                                                                  tmp_path) -> None:  # fmt: skip
    """The napari case at the core: view first, then the view moves while the run goes on."""
    schedule = TileSchedule()
    left = (300.0, 300.0, 1100.0, 900.0)  # level 0: the first piece of tissue
    schedule.prioritize_view(left)
    gen = iter_embed_slide(synth_05.path, tmp_path / "m.zarr", encoder=tiny_encoder,
                           batch_size=4, order=schedule, num_workers=0)  # fmt: skip
    first = next(r for r in gen if r.indices is not None)
    layout = schedule.layout
    centres = layout.coords + layout.tile_l0 / 2
    in_left = tiles_overlapping(layout.coords, layout.tile_l0, [(300, 300, 800, 600)])
    assert set(first.indices) <= set(in_left)
    right = (2000.0, 900.0, 2600.0, 1500.0)  # the other piece of tissue
    schedule.prioritize_view(right)
    in_right = set(tiles_overlapping(layout.coords, layout.tile_l0, [(2000, 900, 600, 600)]))
    later = []
    for r in gen:
        if r.indices is not None:
            later.append(r.indices)
        if len(later) == 4:
            break
    gen.close()
    # one batch was in the model when the view moved; after it, the new view's tiles
    assert set(np.concatenate(later[1:]).tolist()) <= in_right
    assert len(in_right) >= 12
    dist = np.hypot(*(centres[np.concatenate(later[1:])] - (2300.0, 1200.0)).T)
    assert dist.max() < 600  # nearest the new view's centre first


def test_a_writer_error_reaches_the_caller(synth_05, tiny_encoder, tmp_path, monkeypatch):
    def full_disk(self, indices, embeddings):
        raise StoreError(f"{self.path}: could not write embeddings (No space left on device)")

    monkeypatch.setattr(EmbeddingStore, "write_rows", full_disk)
    with pytest.raises(StoreError, match="No space left"):
        embed_slide(synth_05.path, tmp_path / "w.zarr", encoder=tiny_encoder, batch_size=4)
    monkeypatch.undo()
    done = embed_slide(synth_05.path, tmp_path / "w.zarr", encoder=tiny_encoder)  # not locked
    assert done.complete
    assert not _readers._shared or not _readers._shared.busy


def test_cancel_with_reader_processes_keeps_rows(synth_025, tiny_encoder, tmp_path) -> None:
    gen = iter_embed_slide(synth_025.path, tmp_path / "c.zarr", encoder=tiny_encoder,
                           batch_size=4, num_workers=2)  # fmt: skip
    seen = set()
    for r in gen:
        if r.indices is not None:
            seen |= set(r.indices.tolist())
        if len(seen) >= 8:
            break
    gen.close()
    store = EmbeddingStore.open(tmp_path / "c.zarr")
    assert seen <= set(np.flatnonzero(store.done)) and not store.complete
    assert not _readers._shared.busy
    assert all(w.outstanding == 0 for w in _readers._shared.workers)


def test_another_resampling_is_a_notice(synth_05, tiny_encoder, tmp_path) -> None:
    out = tmp_path / "r.zarr"
    gen = iter_embed_slide(synth_05.path, out, encoder=tiny_encoder, batch_size=4)
    next(r for r in gen if r.indices is not None)
    gen.close()
    g = zarr.open_group(str(out), mode="r+")
    sig = dict(g.attrs["tilescope"])
    assert sig["reader"]["resampling"].startswith("integer factors: box mean")
    sig["reader"] = {"resampling": "lanczos"}  # as an older reader would have
    g.attrs["tilescope"] = sig
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        result = embed_slide(synth_05.path, out, encoder=tiny_encoder)
    assert result.complete
    assert any(issubclass(n.category, StoreNotice) and "reader.resampling" in str(n.message)
               for n in notes)  # fmt: skip


def test_cli_region_and_in_process_workers(synth_05, tmp_path, capsys) -> None:
    out = tmp_path / "cli.zarr"
    argv = [
        "embed",
        str(synth_05.path),
        "-o",
        str(out),
        "--model",
        "tiny-random",
        "--region",
        "300,250,500,300",
        "--region",
        "2000,1200,10,10",
        "--workers",
        "0",
    ]
    assert main(argv) == 0
    store = EmbeddingStore.open(out)
    want = tiles_overlapping(store.coords, store.tile_l0,
                             [(300, 250, 500, 300), (2000, 1200, 10, 10)])  # fmt: skip
    np.testing.assert_array_equal(np.flatnonzero(store.done), want)
    capsys.readouterr()
    bad = ["embed", str(synth_05.path), "-o", str(out), "--model", "no-such-model",
           "--region", "1,2,0,4"]  # fmt: skip
    assert main(bad) == 1  # refused before the model loads
    assert "--region '1,2,0,4'" in capsys.readouterr().err
