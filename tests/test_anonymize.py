"""`export --anonymize`: no slide path, file name or stem in any byte an export writes.

The slide, its store and its annotation file sit in a folder whose name and path are
identifying too; the store carries a prompt score set named after the slide and a classifier
trained from that annotation file (whose metadata names the slide, the store and the file).
Every export (zarr, GeoJSON tiles / detections / annotations, h5 in each layout, a folder of
stores, the napari Export widget) is read byte by byte for any of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import Polygon
from synthetic_stores import cell_box, full_grid, grid_store
from test_classify import qupath_annotations

from tilescope.anonymize import Anonymizer, slide_alias
from tilescope.cli import main
from tilescope.export import export_store
from tilescope.score import PromptSet, save_scores, score_patches

STEM = "ACC-98765-secret"
FOLDER = "PATIENT-DIR-77"
R, C, D = 6, 8, 16


def secrets(folder: Path) -> list[str]:
    return [STEM, FOLDER, "98765", str(folder)]


def leaks(out: Path, words: list[str]) -> list[str]:
    """Every (file, word) where `word` occurs (any case) in a file's bytes or its name
    (relative to the export), over every file the export wrote."""
    files = [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file())
    found = []
    for f in files:
        data = f.read_bytes().lower()
        name = str(f.relative_to(out)).lower() if out.is_dir() else f.name.lower()
        found += [f"{f}: {w}" for w in words if w.lower().encode() in data or w.lower() in name]
    return found


@pytest.fixture
def secret_store(tmp_path: Path):
    """A store of ``PATIENT-DIR-77/ACC-98765-secret.svs`` with a prompt score set and a
    classifier trained from ``ACC-98765-secret annotations.geojson`` beside it."""
    folder = tmp_path / FOLDER
    folder.mkdir()
    rc = full_grid(R, C)
    rng = np.random.default_rng(0)
    truth = rc[:, 1] // 4  # two bands of 4 columns
    emb = rng.standard_normal((2, D))[truth] * 2 + 0.3 * rng.standard_normal((len(rc), D))
    st = grid_store(folder / f"{STEM}.zarr", emb, rc, slide=f"{STEM}.svs")
    ps = PromptSet({"tumor": ["carcinoma"], "normal": ["benign"]})
    text = rng.standard_normal((2, D)).astype(np.float32)
    save_scores(st, f"{STEM}-prompts", score_patches(st.embeddings, text, 20.0, ps.class_names),
                ps)  # fmt: skip
    regions = {
        "Tumor": [Polygon(cell_box(0, 0, 1, 1)), Polygon(cell_box(4, 1, 5, 2))],
        "Stroma": [Polygon(cell_box(0, 5, 1, 6)), Polygon(cell_box(4, 6, 5, 7))],
    }
    ann = qupath_annotations(folder / f"{STEM} annotations.geojson", regions)
    assert main(["classify", str(st.path), "--train", str(ann), "--save", "tissue"]) == 0
    return st


def test_the_store_itself_names_the_slide_everywhere(secret_store, tmp_path):
    """The check can fail: an export without --anonymize leaks in each of these places."""
    st = secret_store
    meta = st.read_scores("tissue")[1]["classifier"]["training"]
    assert STEM in meta["slide"] and STEM in meta["store"] and STEM in meta["source"]
    plain = export_store(st.path, tmp_path / "plain.zarr")
    assert leaks(plain, [STEM])
    ann = export_store(st.path, tmp_path / "plain.geojson", objects="annotations",
                       scores=["tissue"])  # fmt: skip
    assert leaks(ann, [STEM])  # "tilescope slide"


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("a.zarr", {}),
        ("a.zarr", {"dtype": "float32", "scores": ["tissue"]}),
        ("tiles.geojson", {}),
        ("det.geojson", {"objects": "detections"}),
        ("det1.geojson", {"objects": "detections", "scores": ["tissue"]}),
        ("ann.geojson", {"objects": "annotations", "scores": ["tissue"]}),
        ("ann2.geojson", {"objects": "annotations", "scores": [f"{STEM}-prompts"]}),
        ("t.h5", {"mil_format": "trident"}),
        ("c.h5", {"mil_format": "clam"}),
        ("s.h5", {"mil_format": "stamp"}),
    ],
)
def test_anonymized_exports_hold_no_slide_name_or_path(secret_store, tmp_path, name, kw):
    st = secret_store
    out = export_store(st.path, tmp_path / "out" / name, anonymize=True, **kw)
    assert leaks(out, secrets(st.path.parent)) == []
    if out.suffix != ".geojson" or kw.get("objects") == "annotations":  # provenance or names
        alias = slide_alias(st.signature)
        assert alias.encode() in (out / "zarr.json" if out.is_dir() else out).read_bytes()


def test_anonymized_zarr_keeps_the_score_sets_under_scrubbed_names(secret_store, tmp_path):
    import zarr

    st = secret_store
    alias = slide_alias(st.signature)
    out = export_store(st.path, tmp_path / "a.zarr", anonymize=True)
    g = zarr.open_group(str(out), mode="r")
    assert sorted(g["scores"].group_keys()) == sorted([f"{alias}-prompts", "tissue"])
    training = g["scores/tissue"].attrs["tilescope_scores"]["classifier"]["training"]
    assert training["slide"] == alias and training["store"] == alias
    assert training["source"] == f"{alias} annotations.geojson"
    prov = g.attrs["tilescope_export"]["provenance"]
    assert prov["slide"]["name"] == alias and g.attrs["tilescope_export"]["anonymized"] is True
    np.testing.assert_array_equal(g[f"scores/{alias}-prompts/probs"][:],
                                  st.read_scores(f"{STEM}-prompts")[0]["probs"])  # fmt: skip


def test_cli_folder_export_names_files_by_alias(secret_store, tmp_path, capsys):
    st = secret_store
    other = grid_store(st.path.parent / f"{STEM}-copy.zarr", st.embeddings, st.grid_rc,
                       slide=f"{STEM}.svs")  # fmt: skip  # the same slide file, embedded twice
    out = tmp_path / "h5"
    assert main(["export", str(st.path.parent), "-o", str(out), "--anonymize"]) == 0
    alias = slide_alias(st.signature)
    assert sorted(p.name for p in out.iterdir()) == [f"{alias}-2.h5", f"{alias}.h5"]
    assert leaks(out, secrets(st.path.parent)) == []
    assert other.path.exists()
    clam = tmp_path / "clam"  # CLAM's feature folder: h5_files/ and pt_files/
    assert main(["export", str(st.path.parent), "-o", str(clam), "--anonymize",
                 "--format", "clam"]) == 0  # fmt: skip
    assert sorted(p.name for p in (clam / "pt_files").iterdir()) == [f"{alias}-2.pt",
                                                                      f"{alias}.pt"]  # fmt: skip
    assert leaks(clam, secrets(st.path.parent)) == []
    capsys.readouterr()
    one = tmp_path / f"{STEM}.zarr"
    assert main(["export", str(st.path), "-o", str(one), "--anonymize"]) == 0
    said = capsys.readouterr().out
    assert f"written as {alias}" in said and "NOTE: the output's own name" in said


def test_anonymizer_replaces_longest_first_and_ignores_case(tmp_path):
    a = Anonymizer("slide-abc", ["ACC-1.svs", "ACC-1", "/x/ACC-1.zarr", "s"])
    assert a.text("/x/acc-1.zarr and ACC-1.svs, acc-1") == "slide-abc and slide-abc, slide-abc"
    assert a.value({"ACC-1 key": ["ACC-1", 3, None]}) == {"slide-abc key": ["slide-abc", 3, None]}
    assert a.text("s") == "s"  # too short to be identifying
    assert a.leaks("x acc-1 y") == ["ACC-1"]


@pytest.mark.napari
def test_export_widget_anonymize_box(make_napari_viewer, tmp_path, monkeypatch, tiny_encoder):
    from napari_helpers import dock, shown_viewer

    from tilescope._napari import _stores
    from tilescope.embed import embed_slide
    from tilescope.synthetic import SyntheticSlide

    folder = tmp_path / FOLDER
    folder.mkdir()
    slide = SyntheticSlide.with_random_blobs(1536, 1024, mpp=0.5, n=3, seed=1).write(
        folder / f"{STEM}.tif"
    )
    store = folder / f"{STEM}.zarr"
    embed_slide(slide, store, encoder=tiny_encoder)
    monkeypatch.setenv("TILESCOPE_STORES", str(folder))
    monkeypatch.setattr(_stores, "_SESSION_FOLDERS", [])
    viewer = shown_viewer(make_napari_viewer)
    viewer.open(str(slide), plugin="tilescope")
    widget = dock(viewer, "Export embeddings")
    assert widget._out.value == folder / "exports" / f"{STEM}.zarr"
    assert widget._anonymize.value is False
    widget._anonymize.value = True
    alias = slide_alias(_open(store).signature)
    assert widget._out.value == folder / "exports" / f"{alias}.zarr"
    widget._run.native.click()
    assert widget.last_output == folder / "exports" / f"{alias}.zarr"
    assert leaks(widget.last_output, secrets(folder)) == []
    widget._format.value = "geojson"
    assert widget._out.value == folder / "exports" / f"{alias}.geojson"
    widget._run.native.click()
    assert leaks(widget.last_output, secrets(folder)) == []
    widget._anonymize.value = False  # back to the slide's name
    assert widget._out.value == folder / "exports" / f"{STEM}.geojson"


def _open(path: Path):
    from tilescope.store import EmbeddingStore

    return EmbeddingStore.open(path)
