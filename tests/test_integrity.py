"""Issue 11: nothing lost, nothing silently wrong, whatever happens to a store.

Store-level tests: replacing a store aside (item 2), same-name score saves (3), failure
messages before flags (4), damaged stores refused and repaired (6, 13), readers racing a
replacement (7), resuming from the store's own tiles (11), full disks (14), leftovers (15).
"""

from __future__ import annotations

import errno
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_store import D, create, layout, names, rows, signature, tree_hash

from tilescope import _fsops
from tilescope.errors import (
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
    StoreReplacedError,
)
from tilescope.store import EmbeddingStore


def finished(path: Path, n: int = 10, **sig_changes: object) -> EmbeddingStore:
    coords, rc, tissue = layout(n)
    st = EmbeddingStore.create_or_resume(
        path, signature=signature(n, **sig_changes), coords=coords, grid_rc=rc, tissue=tissue,
        embed_dim=D, chunk_rows=4,
    )  # fmt: skip
    st.write(0, rows(0, n))
    st.finalize()
    st.close()
    return EmbeddingStore.open(path)


def resume(path: Path, n: int = 10, *, overwrite: bool = False, **sig_changes: object):
    coords, rc, tissue = layout(n)
    return EmbeddingStore.create_or_resume(
        path, signature=signature(n, **sig_changes), coords=coords, grid_rc=rc, tissue=tissue,
        embed_dim=D, chunk_rows=4, overwrite=overwrite,
    )  # fmt: skip


# -- item 2: overwrite builds the new store aside -----------------------------------------------
@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_overwrite_keeps_the_old_store_until_the_new_one_is_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, atomic_exchange: bool
) -> None:
    if not atomic_exchange:  # a system without renameat2: two renames, recovered if killed
        monkeypatch.setattr(_fsops, "exchange", lambda a, b: False)
    path = tmp_path / "s.zarr"
    old = finished(path)
    new = resume(path, overwrite=True, grid__min_tissue=0.4)  # other settings
    new.write(0, rows(0, 4))  # one chunk saved, then the run is killed
    new.flush()
    del new  # (the lock goes with the process)
    still = EmbeddingStore.open(path)
    assert still.complete and still.signature["grid"]["min_tissue"] == 0.5
    np.testing.assert_array_equal(still.embeddings, old.embeddings)
    again = resume(path, overwrite=True, grid__min_tissue=0.4)  # resumes the replacement
    assert again.n_done == 4 and again.pending_ranges() == [(4, 10)]
    again.write(4, rows(4, 10))
    again.finalize()  # swapped in now
    again.close()
    done = EmbeddingStore.open(path)
    assert done.complete and done.signature["grid"]["min_tissue"] == 0.4
    assert done.generation != old.generation
    assert names(tmp_path) == ["s.zarr"]  # no replacement, no .old, no .tmp left


def test_a_replacement_whose_old_store_was_deleted_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    finished(path)
    new = resume(path, overwrite=True, grid__min_tissue=0.4)
    new.write(0, rows(0, 4))
    new.close()  # interrupted; then the user deletes the old store
    import shutil

    shutil.rmtree(path)
    again = resume(path, grid__min_tissue=0.4)  # no overwrite needed: nothing to replace
    assert again.n_done == 4 and not again.is_replacement
    again.close()
    assert names(tmp_path) == ["s.zarr"]


def test_kill_between_the_two_renames_is_recovered(tmp_path: Path) -> None:
    """Without an atomic exchange the old folder is renamed aside first; a run killed right
    then leaves the target missing: the next run puts the old store back."""
    path = tmp_path / "s.zarr"
    old = finished(path)
    aside = _fsops.temp_path(path, "old")
    os.replace(path, aside)  # what a kill after the first rename leaves
    assert not path.exists()
    st = resume(path)  # the next run
    assert st.complete and st.generation == old.generation
    st.close()
    assert names(tmp_path) == ["s.zarr"]


def test_overwrite_never_replaces_another_slides_store(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    finished(path)
    before = tree_hash(path)
    with pytest.raises(StoreMismatchError, match="another slide") as err:
        resume(path, overwrite=True, slide__header_sha256="0ther", slide__name="s.svs")
    assert err.value.can_overwrite is False and "even with overwrite" in str(err.value)
    assert tree_hash(path) == before


# -- item 3: saving scores under an existing name -----------------------------------------------
def test_a_killed_score_save_keeps_the_earlier_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = finished(tmp_path / "s.zarr")
    first = np.full((10, 2), 0.25, np.float32)
    st.write_scores("run", {"probs": first}, {"classes": ["a", "b"]})

    def killed(new: Path, target: Path) -> None:
        raise KeyboardInterrupt  # killed after the new set was written, before the swap

    monkeypatch.setattr(_fsops, "publish", killed)
    with pytest.raises(KeyboardInterrupt):
        st.write_scores("run", {"probs": first * 2}, {"classes": ["a", "b"]})
    monkeypatch.undo()
    arrays, meta = EmbeddingStore.open(st.path).read_scores("run")
    np.testing.assert_array_equal(arrays["probs"], first)
    leftovers = [p for p in (st.path / "scores").iterdir() if p.name.startswith(".")]
    for p in leftovers:  # a killed save's temporary: cleaned by the next save once it is old
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    st.write_scores("run", {"probs": first * 3}, {"classes": ["a", "b"]})
    np.testing.assert_array_equal(st.read_scores("run")[0]["probs"], first * 3)
    assert sorted(p.name for p in (st.path / "scores").iterdir()) == ["run", "zarr.json"]


def test_empty_or_hidden_score_names_are_refused(tmp_path: Path) -> None:
    st = finished(tmp_path / "s.zarr")
    for bad in ("", ".hidden", "-x", "a/b", "a b"):
        with pytest.raises(StoreError, match="score name"):
            st.write_scores(bad, {"probs": np.zeros((10, 1))}, {})
    assert st.score_names() == []


# -- item 4: failure messages are written before the failure flags ------------------------------
def test_a_kill_while_recording_failures_leaves_no_failed_row_without_its_message(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.zarr"
    st = create(path)
    st.write(0, rows(0, 8))

    class KilledOnFlags:
        def __init__(self, arr: zarr.Array) -> None:
            self.arr = arr

        def __setitem__(self, key: object, value: object) -> None:
            raise KeyboardInterrupt  # the process dies as the flags are written

    st._arr["done"] = KilledOnFlags(st._arr["done"])  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        st.record_failures([(8, "JPEG error at (1000, 2000)"), (9, "truncated tile")])
    assert st._lock is not None
    st._lock.release()
    ro = EmbeddingStore.open(path)
    assert all(message != "(no message recorded)" for _, message in ro.failures)
    assert ro.n_failed == 0  # not flagged: both are simply tried again
    again = create(path)
    assert again.todo_indices().tolist() == [8, 9]
    again.record_failures([(8, "JPEG error at (1000, 2000)"), (9, "truncated tile")])
    again.close()
    assert EmbeddingStore.open(path).failures == [
        (8, "JPEG error at (1000, 2000)"), (9, "truncated tile"),
    ]  # fmt: skip


# -- items 6 and 13: damaged stores ---------------------------------------------------------------
def _chunk_file(path: Path, array: str, c: int) -> Path:
    two_d = array in ("embeddings", "coords", "grid_rc")
    return path / array / "c" / str(c) / "0" if two_d else path / array / "c" / str(c)


def _edit_attrs(path: Path, **layout_changes: object) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    sig = meta["attributes"]["tilescope"]
    for key, value in layout_changes.items():
        part, _, sub = key.partition("__")
        if sub:
            sig[part][sub] = value
        else:
            sig[part] = value
    (path / "zarr.json").write_text(json.dumps(meta))


def _dtype(path: Path, array: str, dtype: str) -> None:
    meta = json.loads((path / array / "zarr.json").read_text())
    meta["data_type"] = dtype
    (path / array / "zarr.json").write_text(json.dumps(meta))


#: damage -> (what it does, the array named, the rows re-embedded on repair or None if the
#: store cannot be repaired by re-embedding)
DAMAGE = {
    "deleted embeddings chunk": (lambda p: _chunk_file(p, "embeddings", 1).unlink(),
                                 "embeddings", [4, 5, 6, 7]),
    "zeroed embeddings chunk": (lambda p: _chunk_file(p, "embeddings", 0).write_bytes(
                                 bytes(4 * D * 4)), "embeddings", [0, 1, 2, 3]),
    "random bytes in embeddings": (lambda p: _chunk_file(p, "embeddings", 2).write_bytes(
                                   np.random.default_rng(1).bytes(4 * D * 4)), "embeddings",
                                   [8, 9]),
    "truncated embeddings chunk": (lambda p: _chunk_file(p, "embeddings", 1).write_bytes(
                                   _chunk_file(p, "embeddings", 1).read_bytes()[:50]),
                                   "embeddings", [4, 5, 6, 7]),
    "truncated done chunk": (lambda p: _chunk_file(p, "done", 1).write_bytes(
                             _chunk_file(p, "done", 1).read_bytes()[:5]), "done", [4, 5, 6, 7]),
    "deleted done chunk": (lambda p: _chunk_file(p, "done", 0).unlink(), "done", [0, 1, 2, 3]),
    "deleted coords chunk": (lambda p: _chunk_file(p, "coords", 1).unlink(), "coords", []),
    "changed embeddings dtype": (lambda p: _dtype(p, "embeddings", "float64"), "embeddings",
                                 None),
    "edited layout.tile_l0": (lambda p: _edit_attrs(p, layout__tile_l0=500.0), None, None),
    "edited level0_mpp": (lambda p: _edit_attrs(p, level0_mpp=[0.5, 0.5]), None, None),
}  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_store_is_never_trusted(tmp_path: Path, damage: str) -> None:
    """Every reader gets a StoreCorruptError naming the store and the array (never zeros,
    NaN, tiles at (0, 0) or a traceback); a writer re-embeds what it can."""
    path = tmp_path / "s.zarr"
    ref = finished(path)
    expected = ref.embeddings.copy()
    act, array, redo = DAMAGE[damage]
    act(path)
    with pytest.raises(StoreCorruptError) as err:
        EmbeddingStore.open(path).embeddings  # noqa: B018 - reading is the test
    assert str(path) in str(err.value) and err.value.array == array
    if array:
        assert array in str(err.value)
    before = tree_hash(path)
    if redo is None:  # metadata: refused, untouched
        with pytest.raises((StoreCorruptError, StoreMismatchError)):
            resume(path)
        assert tree_hash(path) == before
        return
    st = resume(path)  # repairs: the damaged rows are to be embedded again
    assert st.todo_indices().tolist() == redo and st.repaired
    st.write_rows(np.array(redo, dtype=np.int64), rows(0, 10)[redo])
    st.finalize()
    st.close()
    fixed = EmbeddingStore.open(path)
    assert fixed.complete
    np.testing.assert_array_equal(fixed.embeddings, expected)
    np.testing.assert_array_equal(fixed.coords, layout(10)[0])


# -- item 7: a reader racing a replacement ------------------------------------------------------
def test_a_reader_never_mixes_two_stores(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    finished(path)
    reader = EmbeddingStore.open(path)  # reads done flags of the old store
    new = resume(path, overwrite=True, grid__min_tissue=0.4)
    new.write(0, rows(20, 30))
    new.finalize()  # swapped in while the reader holds the old one
    new.close()
    with pytest.raises(StoreReplacedError, match="open it again"):
        reader.read_embeddings()
    with pytest.raises(StoreReplacedError):
        reader.embeddings  # noqa: B018 - reading is the test
    fresh = EmbeddingStore.open(path)
    np.testing.assert_array_equal(fresh.embeddings, rows(20, 30))


def test_open_retries_when_the_store_is_swapped_while_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tilescope.store as store_mod

    path = tmp_path / "s.zarr"
    finished(path)
    other = finished(tmp_path / "other.zarr", grid__min_tissue=0.4)
    real = store_mod.read_state
    swapped = []

    def read_state_then_swap(p, arrays, sig):  # the swap lands between two reads of open()
        state = real(p, arrays, sig)
        if not swapped:
            staged = _fsops.temp_path(path)
            os.replace(other.path, staged)
            _fsops.publish(staged, path)
            swapped.append(True)
        return state

    monkeypatch.setattr(store_mod, "read_state", read_state_then_swap)
    st = EmbeddingStore.open(path)
    assert swapped and st.signature["grid"]["min_tissue"] == 0.4  # all of the new store
    np.testing.assert_array_equal(st.embeddings, rows(0, 10))


# -- item 11: resume from the store's own tiles -------------------------------------------------
def test_resume_never_recomputes_the_layout(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    st = create(path)
    st.write(0, rows(0, 4))
    st.close()

    def moved_mask():  # e.g. a Pillow upgrade moved the tissue mask by a pixel
        raise AssertionError("resume must not detect tissue again")

    sig = signature(10)
    again = EmbeddingStore.resume_or_create(
        path, signature=sig, embed_dim=D, make_layout=moved_mask
    )
    assert again.n_done == 4 and again.pending_ranges() == [(4, 10)]
    again.close()


def test_other_tissue_parameters_are_a_difference_and_old_stores_a_notice(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.zarr"
    finished(path, tissue={"detector": "t", "mask_mpp": 8.0})
    with pytest.raises(StoreMismatchError, match=r"tissue.mask_mpp: store has 8.0"):
        resume(path, tissue={"detector": "t", "mask_mpp": 4.0})
    old = tmp_path / "old.zarr"
    finished(old)  # made before tissue parameters were recorded
    st = resume(old, tissue={"detector": "t", "mask_mpp": 8.0})
    assert any("tissue.mask_mpp: not recorded" in n for n in st.notices)
    st.close()


def test_backend_and_precision_are_notices_not_refusals(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    finished(path, model__backend="torch", model__compute_precision="fp32")
    st = resume(path, model__backend="openvino", model__compute_precision="bf16")
    assert st.complete
    assert "model.backend: store has 'torch', this run 'openvino'" in st.notices
    assert "model.compute_precision: store has 'fp32', this run 'bf16'" in st.notices
    st.close()


# -- item 14: a full disk names the store ------------------------------------------------------
def test_a_full_disk_names_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zarr.storage import LocalStore

    path = tmp_path / "s.zarr"
    st = create(path)

    async def full(self, key, value):  # what zarr meets on a full disk: no file name
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalStore, "set", full)
    with pytest.raises(StoreError) as err:
        st.write(0, rows(0, 4))
    assert str(path) in str(err.value) and "free some disk space" in str(err.value)


# -- item 15: leftovers of killed runs, read-only stores ---------------------------------------
def test_leftovers_of_killed_runs_are_cleaned(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    finished(path)
    for kind in ("tmp", "tmp", "old"):
        junk = _fsops.temp_path(path, kind)
        junk.mkdir()
        (junk / "zarr.json").write_text("{}")
    assert len(names(tmp_path)) == 4
    resume(path).close()
    assert names(tmp_path) == ["s.zarr"]


def test_a_finished_store_needs_no_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no lock file can be made (a read-only file system), a finished store is used as
    it is; one that needs writing says why. (`test_cli` runs this on a real read-only mount.)"""
    import tilescope._store_open as store_open

    path = tmp_path / "s.zarr"
    finished(path)
    half = tmp_path / "half.zarr"
    h = create(half)
    h.write(0, rows(0, 4))
    h.close()

    class ReadOnly:
        def __init__(self, p: Path) -> None:
            raise OSError(errno.EROFS, "Read-only file system", str(p))

    monkeypatch.setattr(store_open, "WriterLock", ReadOnly)
    before = tree_hash(path)
    st = resume(path)
    assert st.read_only and st.complete and st.todo_indices().size == 0
    st.record_failures([])  # what embed does at the end: nothing to write
    st.close()
    assert tree_hash(path) == before
    with pytest.raises(StoreError, match="Read-only file system") as err:
        resume(half)
    assert "6 not embedded yet" in str(err.value)


# -- the embedding pipeline on top of the store ---------------------------------------------------
@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    from tilescope.synthetic import Blob, SyntheticSlide

    spec = SyntheticSlide(1536, 1024, mpp=0.5, n_levels=2, blobs=(Blob(380, 250, 300, 200),))
    return spec.write(tmp_path_factory.mktemp("slides") / "small.tif")


def test_embed_records_tissue_parameters_and_compute_precision(small_slide, tiny_encoder, tmp_path):
    from tilescope.embed import embed_slide

    out = embed_slide(small_slide, tmp_path / "s.zarr", encoder=tiny_encoder,
                      tissue_kwargs={"mask_mpp": 4.0}).store_path  # fmt: skip
    sig = EmbeddingStore.open(out).signature
    assert sig["tissue"]["mask_mpp"] == 4.0 and "min_object_um2" in sig["tissue"]
    assert sig["model"]["compute_precision"] == "fp32"  # on the CPU
    with pytest.raises(StoreMismatchError, match="tissue.mask_mpp"):
        embed_slide(small_slide, out, encoder=tiny_encoder)  # other tissue settings


def test_embed_resumes_a_finished_store_without_detecting_tissue_again(
    small_slide, tiny_encoder, tmp_path, monkeypatch
):
    """A Pillow or scikit-image upgrade that moves the mask cannot refuse a finished store:
    resuming never computes the tissue again (item 11)."""
    import tilescope.embed as embed_mod
    from tilescope.embed import embed_slide

    out = tmp_path / "s.zarr"
    first = embed_slide(small_slide, out, encoder=tiny_encoder)
    before = tree_hash(out)

    def moved(*args, **kwargs):
        raise AssertionError("the tissue mask was computed again on resume")

    monkeypatch.setattr(embed_mod, "tissue_mask", moved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice either: nothing differs
        again = embed_slide(small_slide, out, encoder=tiny_encoder)
    assert again.complete and again.embedded_now == 0 and again.n_tiles == first.n_tiles
    assert tree_hash(out) == before


def test_cancelled_overwrite_keeps_the_old_store(small_slide, tiny_encoder, tmp_path):
    from tilescope.embed import embed_slide, iter_embed_slide
    from tilescope.grid import TileGrid

    out = tmp_path / "s.zarr"
    embed_slide(small_slide, out, encoder=tiny_encoder)
    old = EmbeddingStore.open(out)
    gen = iter_embed_slide(small_slide, out, encoder=tiny_encoder, overwrite=True,
                           grid=TileGrid(min_tissue=0.1), batch_size=2)  # fmt: skip
    for report in gen:
        if report.stage == "embedding" and report.done >= 2:
            gen.close()  # napari's Cancel
            break
    kept = EmbeddingStore.open(out)
    assert kept.generation == old.generation and kept.complete
    np.testing.assert_array_equal(kept.embeddings, old.embeddings)
    done = embed_slide(small_slide, out, encoder=tiny_encoder, overwrite=True,
                       grid=TileGrid(min_tissue=0.1))  # fmt: skip
    assert done.complete and done.embedded_now < done.n_tiles  # resumed the replacement
    new = EmbeddingStore.open(out)
    assert new.signature["grid"]["min_tissue"] == 0.1 and new.generation != old.generation
    assert names(tmp_path) == ["s.zarr"]


# -- item 18: every third-party module the package imports is declared ----------------------------
def test_every_imported_package_is_declared() -> None:
    import ast
    import sys

    import tomllib

    root = Path(__file__).resolve().parents[1]
    meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = [d for deps in meta.get("optional-dependencies", {}).values() for d in deps]
    declared = {  # extras count: their modules import them lazily, with a message if missing
        d.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
        for d in [*meta["dependencies"], *extras]
    }
    dist_of = {"openslide": "openslide-python", "skimage": "scikit-image",
               "open_clip": "open_clip_torch", "sklearn": "scikit-learn", "PIL": "pillow",
               "yaml": "pyyaml", "faiss": "faiss-cpu"}  # fmt: skip
    implied = {"pillow", "pyyaml"}  # installed with napari / scikit-image, never alone
    implied |= {"triton"}  # optional: imported only when present (see _napari/_common.py)
    missing = set()
    for py in (root / "src" / "tilescope").rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            names_ = []
            if isinstance(node, ast.Import):
                names_ = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names_ = [node.module]
            for name in names_:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("tilescope", "__future__"):
                    continue
                dist = dist_of.get(top, top).lower().replace("_", "-")
                if dist not in {d.replace("_", "-") for d in declared} | implied:
                    missing.add(f"{top} ({py.relative_to(root)})")
    assert not missing, f"imported but not in pyproject dependencies: {sorted(missing)}"
