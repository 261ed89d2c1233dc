"""EmbeddingStore: create, resume, refuse mismatches and damaged stores, survive SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tilescope import _signature as store_mod  # where the signature records the version
from tilescope.errors import StoreCorruptError, StoreError, StoreMismatchError
from tilescope.store import EmbeddingStore

D = 8


def layout(n: int, cols: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """coords, grid_rc, tissue of n tiles on a grid with stride 448 level-0 px from (100, 50)."""
    rc = np.stack([np.arange(n) // cols, np.arange(n) % cols], axis=1).astype(np.int32)
    coords = np.array([100, 50]) + rc[:, ::-1].astype(np.int64) * 448
    tissue = np.linspace(0.5, 1.0, n, dtype=np.float32)
    return coords, rc, tissue


def signature(n: int, **changes: object) -> dict:
    """A signature as embed.py builds it; ``part__key=value`` changes one entry."""
    sig = {
        "model": {
            "model_id": "fake/model",
            "weights_digest": "abc",
            "trained": False,
            "embed_dim": D,
            "source": "/cache/a",
        },
        "grid": {"target_mpp": 0.5, "tile_px": 224, "overlap_px": 0, "min_tissue": 0.5},
        "layout": {
            "downsample": 2.0,
            "tile_l0": 448.0,
            "stride_l0": 448.0,
            "origin": [100, 50],
            "grid_shape": [max(1, -(-n // 5)), 5],
        },
        "slide": {
            "name": "s.svs",
            "size_bytes": 123,
            "dimensions": [3000, 2000],
            "mpp": [0.25, 0.25],
            "header_sha256": "f00",
        },
        "level0_mpp": [0.25, 0.25],
    }
    for key, value in changes.items():
        part, _, sub = key.partition("__")
        if sub:
            sig[part][sub] = value
        else:
            sig[part] = value
    return sig


def rows(start: int, stop: int) -> np.ndarray:
    """Deterministic unit embeddings for rows start..stop."""
    out = np.stack([np.random.default_rng(i).standard_normal(D) for i in range(start, stop)])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32).reshape(-1, D)


def create(path: Path, n: int = 10, chunk_rows: int = 4, **kw: object) -> EmbeddingStore:
    coords, rc, tissue = layout(n)
    return EmbeddingStore.create_or_resume(
        path,
        signature=signature(n),
        coords=coords,
        grid_rc=rc,
        tissue=tissue,
        embed_dim=D,
        chunk_rows=chunk_rows,
        **kw,
    )


def names(folder: Path) -> list[str]:
    """What is in `folder`, apart from the stores' lock files (kept between runs)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".zarr.lock"))


def tree_hash(path: Path) -> str:
    """Names, contents and mtimes of everything under `path` (or of the file itself)."""
    h = hashlib.sha256()
    items = [path] if path.is_file() else sorted(path.rglob("*"))
    for p in items:
        h.update(str(p.relative_to(path.parent)).encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


def test_create_write_finalize_and_read(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    with create(path) as st:
        assert st.pending_ranges() == [(0, 10)]
        st.write(0, rows(0, 3))
        assert st.n_done == 0 and st.pending_ranges() == [(3, 10)]  # staged, not on disk
        st.write(3, rows(3, 9))  # completes chunks 0 and 1
        assert st.n_done == 8
        st.write(9, rows(9, 10))  # the last, short chunk is whole too
        assert st.n_done == 10 and st.todo_indices().size == 0
        st.finalize()
    assert names(tmp_path) == ["s.zarr"]  # no temporaries left
    ro = EmbeddingStore.open(path)
    coords, rc, tissue = layout(10)
    assert ro.complete and ro.n_tiles == 10 and ro.embed_dim == D and ro.model_id == "fake/model"
    np.testing.assert_array_equal(ro.embeddings, rows(0, 10))
    np.testing.assert_array_equal(ro.coords, coords)
    np.testing.assert_array_equal(ro.grid_rc, rc)
    np.testing.assert_array_equal(ro.tissue, tissue)
    assert ro.coords.dtype == np.int64 and ro.grid_rc.dtype == np.int32
    sig = ro.signature
    assert sig["format"] == "tilescope-embeddings" and sig["format_version"] == 2
    assert len(sig["generation"]) == 32
    assert sig["layout"]["origin"] == [100, 50] and sig["complete"] is True
    assert {"created", "tilescope_version", "slide", "grid", "model"} <= set(sig)
    with pytest.raises(StoreError, match="read-only"):
        ro.write(0, rows(0, 1))
    # the layout is plain zarr v3 that other tools read
    meta = json.loads((path / "embeddings" / "zarr.json").read_text())
    assert meta["shape"] == [10, D] and meta["chunk_grid"]["configuration"]["chunk_shape"] == [4, D]


def test_resume_keeps_done_rows_and_drops_unflushed(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    st = create(path)
    st.write(0, rows(0, 6))  # chunk 0 saved, rows 4-5 only staged
    del st  # a crash: staged rows are lost, saved ones stay
    st = create(path)
    assert st.pending_ranges() == [(4, 10)] and not st.complete
    st.write(6, rows(6, 8))
    st.flush()  # a partial chunk is saved on flush
    assert st.pending_ranges() == [(4, 6), (8, 10)]
    st.write(4, rows(4, 6))
    st.write(8, rows(8, 10))
    st.finalize()
    st.close()  # lets the next writer in
    np.testing.assert_array_equal(EmbeddingStore.open(path).embeddings, rows(0, 10))
    again = create(path)  # resuming a complete store: nothing to do
    assert again.complete and again.pending_ranges() == []


def test_write_rows_in_any_order(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    st = create(path)
    st.write_rows(np.array([9, 2, 5, 0]), rows(0, 10)[[9, 2, 5, 0]])
    assert st.n_done == 0 and st.todo_indices().tolist() == [1, 3, 4, 6, 7, 8]
    st.write_rows(np.array([3, 1]), rows(0, 10)[[3, 1]])  # chunk 0 (rows 0-3) is whole
    assert st.done.tolist() == [True] * 4 + [False] * 6
    st.write_rows(np.array([], dtype=int), np.zeros((0, D), np.float32))
    st.flush_seconds = 0.0  # from now on every write also flushes staged rows
    st.write_rows(np.array([7]), rows(7, 8))
    assert st.n_done == 7 and st.pending_ranges() == [(4, 5), (6, 7), (8, 9)]
    st.write_rows(np.array([8, 6, 4]), rows(0, 10)[[8, 6, 4]])
    st.finalize()
    np.testing.assert_array_equal(EmbeddingStore.open(path).embeddings, rows(0, 10))


def test_failed_tiles_complete_the_store_and_can_be_retried(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    assert not EmbeddingStore.is_complete(path)
    st = create(path)
    st.write(0, rows(0, 9))
    st.record_failures([(9, "JPEG decode error")])
    assert st.n_done == 9 and st.n_failed == 1 and st.failures == [(9, "JPEG decode error")]
    assert st.todo_indices().size == 0  # not retried by default ...
    assert st.todo_indices(include_failed=True).tolist() == [9]  # ... unless asked
    st.finalize()
    st.close()
    opened = EmbeddingStore.open(path)
    assert opened.complete and opened.signature["n_failed"] == 1
    assert opened.failures == [(9, "JPEG decode error")] and not opened.done[9]
    assert EmbeddingStore.is_complete(path)
    resumed = create(path)
    resumed.write(9, rows(9, 10))  # a retry that works
    resumed.record_failures([])
    assert resumed.failures == [] and resumed.done.all() and resumed.n_failed == 0
    (tmp_path / "junk.zarr").write_text("junk")
    assert not EmbeddingStore.is_complete(tmp_path / "junk.zarr")


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    first = create(path)
    with pytest.raises(StoreError, match="another writer"):
        create(path)
    assert EmbeddingStore.open(path).n_tiles == 10  # readers are welcome
    first.close()
    create(path).close()  # free again; the lock file stays (filelock keeps its inode)
    assert names(tmp_path) == ["s.zarr"]


def test_finalize_refuses_missing_rows(tmp_path: Path) -> None:
    st = create(tmp_path / "s.zarr")
    st.write(0, rows(0, 4))
    with pytest.raises(StoreError, match="6 of 10 tiles are not embedded"):
        st.finalize()


def test_write_validation(tmp_path: Path) -> None:
    st = create(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="width"):
        st.write(0, np.ones((2, D + 1), np.float32))
    with pytest.raises(StoreError, match="10 rows"):
        st.write(9, rows(0, 2))
    with pytest.raises(StoreError, match="L2-normalised"):
        st.write(0, np.ones((2, D), np.float32))
    assert st.n_done == 0


def test_mismatch_lists_differences_and_leaves_store_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    create(path).write(0, rows(0, 4))
    before = tree_hash(path)
    coords, rc, tissue = layout(10)
    sig = signature(10, model__weights_digest="xyz", grid__tile_px=256)
    with pytest.raises(StoreMismatchError) as err:
        EmbeddingStore.create_or_resume(
            path, signature=sig, coords=coords, grid_rc=rc, tissue=tissue, embed_dim=D
        )
    msg = str(err.value)
    assert str(path) in msg and "overwrite" in msg
    assert "model.weights_digest: store has 'abc', requested 'xyz'" in msg
    assert "grid.tile_px: store has 224, requested 256" in msg
    with pytest.raises(StoreMismatchError, match="tile coordinates differ"):
        EmbeddingStore.create_or_resume(
            path,
            signature=signature(10),
            coords=coords + 1,
            grid_rc=rc,
            tissue=tissue,
            embed_dim=D,
        )
    assert tree_hash(path) == before
    fresh = EmbeddingStore.create_or_resume(
        path,
        signature=sig,
        coords=coords,
        grid_rc=rc,
        tissue=tissue,
        embed_dim=D,
        overwrite=True,
    )
    assert fresh.n_done == 0 and fresh.signature["grid"]["tile_px"] == 256


def test_ignored_keys_do_not_block_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.zarr"
    create(path).write(0, rows(0, 4))
    monkeypatch.setattr(store_mod, "__version__", "0.1.99")  # a patch release
    coords, rc, tissue = layout(10)
    sig = signature(10, model__source="/elsewhere")  # not an identity key
    st = EmbeddingStore.create_or_resume(
        path, signature=sig, coords=coords, grid_rc=rc, tissue=tissue, embed_dim=D
    )
    assert st.n_done == 4
    st.close()
    monkeypatch.setattr(store_mod, "__version__", "0.2.0")
    with pytest.raises(StoreMismatchError, match="tilescope_version: store has '0.1'"):
        create(path)


def _garbage_attrs(p: Path) -> None:
    meta = json.loads((p / "zarr.json").read_text())
    meta["attributes"]["tilescope"] = "garbage"
    (p / "zarr.json").write_text(json.dumps(meta))


def _lost_key(p: Path) -> None:
    meta = json.loads((p / "zarr.json").read_text())
    del meta["attributes"]["tilescope"]["slide"]
    (p / "zarr.json").write_text(json.dumps(meta))


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


CORRUPTIONS = {
    "garbage attrs": _garbage_attrs,
    "signature lacks a key": _lost_key,
    "unparsable zarr.json": lambda p: (p / "zarr.json").write_text("{not json"),
    "deleted array": lambda p: shutil.rmtree(p / "embeddings"),
    "array of wrong shape": lambda p: _edit_json(p / "done" / "zarr.json", shape=[11]),
    "a file, not a folder": lambda p: (shutil.rmtree(p), p.write_bytes(os.urandom(100))),
    "folder without zarr.json": lambda p: (p / "zarr.json").unlink(),
}


@pytest.mark.parametrize("damage", CORRUPTIONS)
def test_corrupt_store_is_refused_and_untouched(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "x.zarr"
    create(path).write(0, rows(0, 4))
    CORRUPTIONS[damage](path)
    before = tree_hash(path)
    with pytest.raises(StoreCorruptError) as err:
        create(path)
    assert str(path) in str(err.value) and "overwrite" in str(err.value)
    with pytest.raises(StoreCorruptError):
        EmbeddingStore.open(path)
    assert tree_hash(path) == before
    assert create(path, overwrite=True).n_done == 0


def test_overwrite_never_deletes_a_foreign_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my documents"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious")
    with pytest.raises(StoreCorruptError):
        create(folder)
    with pytest.raises(StoreError, match="refusing to delete"):
        create(folder, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "precious"
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    assert create(empty).n_tiles == 10  # an empty folder holds nothing to lose


def test_open_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such embedding store"):
        EmbeddingStore.open(tmp_path / "nope.zarr")


def test_empty_slide(tmp_path: Path) -> None:
    path = tmp_path / "empty.zarr"
    with create(path, n=0) as st:
        assert st.pending_ranges() == [] and st.n_tiles == 0
        st.finalize()
    ro = EmbeddingStore.open(path)
    assert ro.complete and ro.embeddings.shape == (0, D) and ro.coords.shape == (0, 2)
    ro.write_scores("none", {"probs": np.zeros((0, 2), np.float32)}, {"classes": ["a", "b"]})
    arrays, meta = ro.read_scores("none")
    assert arrays["probs"].shape == (0, 2) and meta["classes"] == ["a", "b"]


def test_scores_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    st = create(path)
    st.write(0, rows(0, 4))  # a partial store may be scored: its state is recorded
    st.write_scores("a", {"probs": np.zeros((10, 2))}, {"classes": ["x", "y"]})
    state = st.read_scores("a")[1]["store_state"]
    assert state["n_done"] == 4 and state["n_tiles"] == 10 and state["complete"] is False
    st.write(4, rows(4, 10))
    st.finalize()
    ro = EmbeddingStore.open(path)
    assert ro.score_names() == ["a"]
    probs = np.random.default_rng(0).random((10, 3)).astype(np.float32)
    ro.write_scores("tumor-v1", {"probs": probs, "label": np.arange(10)}, {"classes": ["a"]})
    ro.write_scores("tumor-v1", {"probs": probs * 2}, {"classes": ["b"]})  # replaces
    arrays, meta = ro.read_scores("tumor-v1")
    assert set(arrays) == {"probs"} and meta["classes"] == ["b"]
    assert meta["store_state"]["complete"] is True and meta["store_state"]["n_done"] == 10
    np.testing.assert_array_equal(arrays["probs"], probs * 2)
    with pytest.raises(StoreError, match="N=10 rows"):
        ro.write_scores("bad", {"probs": probs[:3]}, {})
    with pytest.raises(StoreError, match="use only A-Z"):
        ro.write_scores("a/b", {"probs": probs}, {})
    with pytest.raises(StoreError, match="saved: a, tumor-v1"):
        ro.read_scores("missing")
    np.testing.assert_array_equal(ro.embeddings, rows(0, 10))


def test_done_flag_written_only_after_data(tmp_path: Path) -> None:
    """A crash while a chunk's data is written leaves nothing marked done (flags come after
    the data), and the rows are recomputed on resume."""
    path = tmp_path / "s.zarr"
    st = create(path)

    class Crash:
        def __setitem__(self, key: object, value: object) -> None:
            raise KeyboardInterrupt  # the process dies while writing embeddings

    st._arr["embeddings"] = Crash()
    with pytest.raises(KeyboardInterrupt):
        st.write(0, rows(0, 4))
    assert not EmbeddingStore.open(path).done.any()
    assert st._lock is not None
    st._lock.release()  # the process died: the OS drops its lock
    resumed = create(path)
    assert resumed.pending_ranges() == [(0, 10)]


WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_store import create, rows
    path, batch, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    st = create(path, n={n}, chunk_rows={chunk})
    for a, b in st.pending_ranges():
        for s in range(a, b, batch):
            st.write(s, rows(s, min(b, s + batch)))
            print(st.n_done, flush=True)
            time.sleep(pause)
    st.finalize()
    print("finished", flush=True)
    """
)


@pytest.mark.parametrize("pause", [0.001, 0.01])
def test_sigkill_mid_write_then_resume_matches_uninterrupted(tmp_path: Path, pause: float) -> None:
    n, chunk = 2000, 64
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(Path(__file__).parent), n=n, chunk=chunk))
    path = tmp_path / "killed.zarr"
    rng = np.random.default_rng(int(pause * 1000))
    for _ in range(2):  # kill twice, at a random moment after the first saved chunk
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), "10", str(pause)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        while proc.stdout.readline().strip() == "0":
            pass  # wait until a chunk is saved
        time.sleep(float(rng.uniform(0, 0.05)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ro = EmbeddingStore.open(path)  # a done row always holds its final embedding
        done = ro.done
        assert 0 < done.sum() < n and not ro.complete
        np.testing.assert_array_equal(ro.embeddings[done], rows(0, n)[done])
    st = create(path, n=n, chunk_rows=chunk)
    for a, b in st.pending_ranges():
        st.write(a, rows(a, b))
    st.finalize()
    reference = create(tmp_path / "reference.zarr", n=n, chunk_rows=chunk)
    reference.write(0, rows(0, n))
    reference.finalize()
    killed, ref = EmbeddingStore.open(path), EmbeddingStore.open(tmp_path / "reference.zarr")
    for name in ("embeddings", "coords", "grid_rc", "tissue", "done"):
        np.testing.assert_array_equal(getattr(killed, name), getattr(ref, name))
    assert killed.complete and not list(path.rglob("*.partial"))
