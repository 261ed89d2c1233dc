"""The `tilescope` command: embed, score, search, export, and its error handling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from _paths import CMU, TCGA, need
from PIL import Image

from tilescope.cli import main
from tilescope.store import EmbeddingStore


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    assert main(["embed", str(need(CMU)), "-o", str(out), "--model", "tiny-random"]) == 0
    return out, out / "CMU-1-Small-Region.zarr"


def test_embed_skips_finished_stores(embedded, capsys):
    out, _ = embedded
    assert main(["embed", str(CMU), "-o", str(out), "--model", "tiny-random"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_score_prints_label_json_and_png(embedded, capsys, tmp_path):
    _, store = embedded
    png = tmp_path / "heat.png"
    args = ["score", str(store), "--class", "tumor=invasive carcinoma|malignant epithelium",
            "--class", "normal=benign tissue", "--pooling", "topk", "--k", "5", "--json",
            "--png", str(png), "--slide", str(CMU), "--save", "tn"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    data = json.loads(out[: out.rindex("}") + 1])
    assert data["label"] in ("tumor", "normal") and set(data["scores"]) == {"tumor", "normal"}
    assert sum(data["scores"].values()) == pytest.approx(1.0, abs=1e-5)  # top-k softmax
    assert data["trained_model"] is False
    img = np.asarray(Image.open(png))
    assert img.std() > 10  # not blank
    assert "tn" in EmbeddingStore.open(store).score_names()


def test_untrained_model_is_labelled_in_text_output(embedded, capsys):
    _, store = embedded
    assert main(["score", str(store), "--class", "a=tumor", "--class", "b=stroma"]) == 0
    assert "UNTRAINED" in capsys.readouterr().out


def test_search_ranks_and_excludes_the_query(embedded, capsys, tmp_path):
    _, store = embedded
    st = EmbeddingStore.open(store)
    x, y = (int(v) for v in st.coords[10])
    box = f"{x + 100},{y + 100},24,24"  # holds tile 10's centre only
    png = tmp_path / "sim.png"
    args = ["search", str(store), "--region", box, "-k", "3", "--json", "--png", str(png),
            "--slide", str(CMU)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    matches = json.loads(out[: out.rindex("]") + 1])
    assert len(matches) == 3 and all(m["index"] != 10 for m in matches)
    sims = [m["similarity"] for m in matches]
    assert sims == sorted(sims, reverse=True)
    assert np.asarray(Image.open(png)).std() > 10


def test_search_over_glass_is_a_clear_error(embedded, capsys):
    _, store = embedded
    assert main(["search", str(store), "--region", "0,0,50,50"]) == 1
    err = capsys.readouterr().err
    assert "tilescope: error:" in err and "Traceback" not in err


def test_export_zarr_and_geojson(embedded, tmp_path):
    _, store = embedded
    assert main(["export", str(store), "-o", str(tmp_path / "e.zarr"), "--dtype", "float32"]) == 0
    g = zarr.open_group(str(tmp_path / "e.zarr"), mode="r")
    np.testing.assert_array_equal(g["embeddings"][:], EmbeddingStore.open(store).embeddings)
    assert main(["export", str(store), "-o", str(tmp_path / "e.geojson")]) == 0
    features = json.loads((tmp_path / "e.geojson").read_text())["features"]
    assert len(features) == EmbeddingStore.open(store).n_tiles


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["embed", "NOPE.svs", "-o", "{tmp}", "--model", "tiny-random"], "no such file"),
        (["embed", str(TCGA), "-o", "{tmp}", "--model", "tiny-random"], "--slide-mpp"),
        (["embed", str(CMU), "-o", "{tmp}", "--model", "no-such-model-xyz"], "no-such-model-xyz"),
        (["score", "{tmp}/missing.zarr", "--class", "a=b"], "missing.zarr"),
    ],
)
def test_bad_inputs_exit_nonzero_with_one_line(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and needle in err[-1] and err[-1].startswith("tilescope: error:")


def test_embed_goes_on_after_a_bad_slide(tmp_path, capsys):
    """One unreadable slide in a batch is reported; the others are still embedded."""
    bad = tmp_path / "broken.svs"
    bad.write_text("not a slide")
    out = tmp_path / "out"
    assert main(["embed", str(bad), str(need(CMU)), "-o", str(out), "--model", "tiny-random"]) == 1
    err = capsys.readouterr().err
    assert "broken.svs" in err and "Traceback" not in err
    assert EmbeddingStore.open(out / "CMU-1-Small-Region.zarr").complete
