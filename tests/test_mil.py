"""MIL-ready .h5 export: the layouts TRIDENT, CLAM and STAMP read, read back the way they do."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from synthetic_stores import full_grid, grid_store

from tilescope.cli import main
from tilescope.errors import StoreError
from tilescope.export import export_store
from tilescope.mil import export_h5_cohort, magnification
from tilescope.store import EmbeddingStore


def store_with_a_failed_tile(tmp_path: Path, mpp: float = 0.25, **kw) -> EmbeddingStore:
    rc = full_grid(4, 5)
    emb = np.random.default_rng(3).standard_normal((len(rc), 12))
    done = np.ones(len(rc), bool)
    done[7] = False  # this tile could not be read
    return grid_store(tmp_path / f"{kw.get('slide', 's')}.zarr", emb, rc, done=done, mpp=mpp, **kw)


@pytest.mark.parametrize("mpp", [0.25, 0.2631, 0.499])
def test_trident_layout_reads_back_as_trident_reads_it(tmp_path: Path, mpp: float) -> None:
    st = store_with_a_failed_tile(tmp_path, mpp)
    out = export_store(st.path, tmp_path / "slide.h5")
    keep = np.flatnonzero(st.done)
    with h5py.File(out, "r") as f:  # what trident.IO.read_coords and extract_slide_features do
        coords_attrs = dict(f["coords"].attrs)
        coords, feats = f["coords"][:], f["features"][:]
        assert f["features"].attrs["name"] == "slide"
        prov = json.loads(f.attrs["tilescope_export"])
    assert feats.dtype == np.float32 and feats.shape == (len(keep), 12)
    np.testing.assert_array_equal(feats, st.embeddings[keep])  # the failed tile is left out
    assert coords.dtype == np.int64
    np.testing.assert_array_equal(coords, st.coords[keep])
    assert coords_attrs["patch_size"] == 224
    assert coords_attrs["patch_size_level0"] == round(st.tile_l0)  # read by TITAN, GigaPath
    assert coords_attrs["target_magnification"] == 20.0
    assert coords_attrs["level0_magnification"] == magnification(mpp)
    # TRIDENT's WSIPatcher with src_mag/dst_mag re-reads patches of this level-0 size
    src_px, dst_px = (
        10 / coords_attrs["level0_magnification"],
        10 / coords_attrs["target_magnification"],
    )
    assert round(coords_attrs["patch_size"] * dst_px / src_px) == round(st.tile_l0)
    assert coords_attrs["name"] == "slide" and coords_attrs["overlap"] == 0
    assert prov["provenance"]["model"]["weights_digest"] == "abc123"
    assert prov["n_tiles"] == len(keep) and prov["n_failed"] == 1 and prov["layout"] == "trident"


def test_clam_layout_patch_size_is_level0_pixels_at_level_0(tmp_path: Path) -> None:
    st = store_with_a_failed_tile(tmp_path, 0.2631)
    out = export_store(st.path, tmp_path / "slide.h5", mil_format="clam")
    with h5py.File(out, "r") as f:
        # CLAM's Generic_MIL_Dataset (use_h5): features and coords; Whole_Slide_Bag_FP reads
        # read_region(coord, patch_level, (patch_size, patch_size))
        features, coords = f["features"][:], f["coords"][:]
        level, size = f["coords"].attrs["patch_level"], f["coords"].attrs["patch_size"]
        assert list(f["coords"].attrs["level_dim"]) == st.signature["slide"]["dimensions"]
    assert len(features) == len(coords) == st.n_done
    assert level == 0 and size == round(st.tile_l0) == 426


def test_stamp_layout_is_feats_and_micrometres(tmp_path: Path) -> None:
    st = store_with_a_failed_tile(tmp_path, 0.2631)
    out = export_store(st.path, tmp_path / "slide.h5", mil_format="stamp")
    keep = np.flatnonzero(st.done)
    with h5py.File(out, "r") as f:  # stamp.modeling.data.get_coords: tile_size_um -> µm coords
        assert "features" not in f
        feats, coords = f["feats"][:], f["coords"][:]
        assert f.attrs["unit"] == "um" and f.attrs["feat_type"] == "tile"
        tile_um, tile_px = f.attrs["tile_size_um"], f.attrs["tile_size_px"]
        assert f.attrs["extractor"] == "fake/model"
    np.testing.assert_array_equal(feats, st.embeddings[keep])
    np.testing.assert_allclose(coords, st.coords[keep] * 0.2631)
    assert tile_um == pytest.approx(112.0) and tile_px == 224


def test_unfinished_stores_and_existing_files_are_refused(tmp_path: Path, capsys) -> None:
    rc = full_grid(2, 3)
    done = np.array([1, 1, 0, 1, 0, 1], bool)
    st = grid_store(tmp_path / "part.zarr", np.eye(6), rc, done=done, complete=False)
    with pytest.raises(StoreError, match="incomplete"):
        export_store(st.path, tmp_path / "p.h5")
    assert not (tmp_path / "p.h5").exists()
    ok = store_with_a_failed_tile(tmp_path)
    out = tmp_path / "o.h5"
    assert main(["export", str(ok.path), "-o", str(out), "--format", "stamp"]) == 0
    assert main(["export", str(ok.path), "-o", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(ok.path), "-o", str(out), "--overwrite"]) == 0
    with h5py.File(out, "r") as f:
        assert "features" in f  # replaced by the TRIDENT layout
    # no temporaries left (the stores' writer lock files are filelock's, beside each store)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.suffix != ".lock"]


def test_a_folder_of_stores_exports_one_file_per_slide(tmp_path: Path, capsys) -> None:
    stores = tmp_path / "stores"
    stores.mkdir()
    a = store_with_a_failed_tile(stores, slide="TCGA-AA-0001.svs")
    b = store_with_a_failed_tile(stores, slide="TCGA-AA-0002.ndpi")
    grid_store(stores / "late.zarr", np.eye(4), full_grid(2, 2), done=np.array([1, 0, 1, 1], bool),
               complete=False, slide="late.svs")  # fmt: skip
    out = tmp_path / "h5_files"
    assert main(["export", str(stores), "-o", str(out)]) == 1  # one store is unfinished
    cap = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["TCGA-AA-0001.h5", "TCGA-AA-0002.h5"]
    assert "late.zarr: skipped" in cap.err and "incomplete" in cap.err
    for st in (a, b):
        with h5py.File(out / f"{Path(st.slide_name).stem}.h5", "r") as f:
            np.testing.assert_array_equal(f["features"][:], st.embeddings[st.done])
    assert main(["export", str(stores), "-o", str(tmp_path / "x.h5")]) == 1
    assert "names a folder" in capsys.readouterr().err


def test_two_slides_with_one_name_keep_their_store_names(tmp_path: Path) -> None:
    stores = tmp_path / "stores"
    stores.mkdir()
    grid_store(stores / "one.zarr", np.eye(4), full_grid(2, 2), slide="x.svs")
    grid_store(stores / "two.zarr", np.eye(4), full_grid(2, 2), slide="x.svs")
    result = export_h5_cohort(stores, tmp_path / "out")
    assert sorted(p.name for p in result.written) == ["one.h5", "two.h5"]
    with pytest.raises(StoreError, match="no Tilescope embedding stores"):
        export_h5_cohort(tmp_path / "out", tmp_path / "o2")


def test_an_embedded_slide_exports_for_trident(synth_05, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert main(["embed", str(synth_05.path), "-o", str(out), "--model", "tiny-random"]) == 0
    (store,) = out.glob("*.zarr")
    st = EmbeddingStore.open(store)
    h5 = export_store(store, tmp_path / "synth_05.h5")
    with h5py.File(h5, "r") as f:
        assert f["features"].shape == (st.n_done, st.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(f["features"][:], axis=1), 1, atol=1e-3)
        assert f["coords"].attrs["patch_size_level0"] == 224
        assert f["coords"].attrs["level0_magnification"] == 20.0
        assert f["coords"].attrs["level0_width"] == 3072


def clam_generic_mil_getitem(data_dir: Path, slide_id: str, use_h5: bool):
    """What CLAM's ``Generic_MIL_Dataset.__getitem__`` does with a feature folder
    (dataset_modules/dataset_generic.py): the .pt by default, the .h5 with load_from_h5(True)."""
    import os

    import torch

    if not use_h5:
        full_path = os.path.join(data_dir, "pt_files", "{}.pt".format(slide_id))  # noqa: UP032
        return (torch.load(full_path),)
    full_path = os.path.join(data_dir, "h5_files", "{}.h5".format(slide_id))  # noqa: UP032
    with h5py.File(full_path, "r") as hdf5_file:
        features = hdf5_file["features"][:]
        coords = hdf5_file["coords"][:]
    return torch.from_numpy(features), coords


def test_clam_format_writes_pt_files_that_clam_loads(tmp_path: Path, capsys) -> None:
    import torch

    st = store_with_a_failed_tile(tmp_path, 0.2631, slide="TCGA-AA-0003.svs")
    keep = np.flatnonzero(st.done)
    feats_dir = tmp_path / "feats"
    out = feats_dir / "h5_files" / "TCGA-AA-0003.h5"
    assert main(["export", str(st.path), "-o", str(out), "--format", "clam"]) == 0
    assert "pt_files/TCGA-AA-0003.pt" in capsys.readouterr().out
    (features,) = clam_generic_mil_getitem(feats_dir, "TCGA-AA-0003", use_h5=False)
    assert isinstance(features, torch.Tensor) and features.dtype == torch.float32
    assert tuple(features.shape) == (len(keep), 12)  # the failed tile is left out
    np.testing.assert_array_equal(features.numpy(), st.embeddings[keep])
    from_h5, coords = clam_generic_mil_getitem(feats_dir, "TCGA-AA-0003", use_h5=True)
    assert torch.equal(from_h5, features)  # the same rows in the same order as the .h5
    np.testing.assert_array_equal(coords, st.coords[keep])
    # an .h5 that is not in an h5_files folder gets pt_files/ beside it
    export_store(st.path, tmp_path / "x" / "s.h5", mil_format="clam")
    assert (tmp_path / "x" / "pt_files" / "s.pt").is_file()
    # an existing .pt is kept unless told to overwrite, and nothing is written then
    (tmp_path / "y" / "pt_files").mkdir(parents=True)
    (tmp_path / "y" / "pt_files" / "s.pt").write_bytes(b"old")
    with pytest.raises(StoreError, match=r"pt_files/s.pt: already exists"):
        export_store(st.path, tmp_path / "y" / "s.h5", mil_format="clam")
    assert not (tmp_path / "y" / "s.h5").exists()
    export_store(st.path, tmp_path / "y" / "s.h5", mil_format="clam", overwrite=True)
    assert torch.equal(torch.load(tmp_path / "y" / "pt_files" / "s.pt"), features)
    # trident and stamp write no .pt
    export_store(st.path, tmp_path / "z" / "s.h5")
    assert not (tmp_path / "z" / "pt_files").exists()
    assert not [p for p in tmp_path.rglob(".*") if p.suffix != ".lock"]  # no temporaries


def test_a_folder_of_stores_exports_clams_feature_folder(tmp_path: Path, capsys) -> None:
    stores = tmp_path / "stores"
    stores.mkdir()
    a = store_with_a_failed_tile(stores, slide="TCGA-AA-0001.svs")
    b = store_with_a_failed_tile(stores, slide="TCGA-AA-0002.ndpi")
    out = tmp_path / "clam_feats"
    assert main(["export", str(stores), "-o", str(out), "--format", "clam"]) == 0
    assert sorted(p.name for p in (out / "h5_files").iterdir()) == [
        "TCGA-AA-0001.h5", "TCGA-AA-0002.h5"]  # fmt: skip
    assert sorted(p.name for p in (out / "pt_files").iterdir()) == [
        "TCGA-AA-0001.pt", "TCGA-AA-0002.pt"]  # fmt: skip
    for st in (a, b):
        slide_id = Path(st.slide_name).stem
        (features,) = clam_generic_mil_getitem(out, slide_id, use_h5=False)
        np.testing.assert_array_equal(features.numpy(), st.embeddings[st.done])
    # -o naming the h5_files folder itself: the same feature folder
    again = export_h5_cohort(stores, tmp_path / "f2" / "h5_files", fmt="clam")
    assert len(again.written) == 2 and (tmp_path / "f2" / "pt_files" / "TCGA-AA-0001.pt").exists()
