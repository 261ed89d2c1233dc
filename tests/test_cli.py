"""The `tilescope` command: embed, score, search, export, and its error handling."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from _paths import CMU, TCGA, need
from PIL import Image
from test_search import make_store, random_embeddings

from tilescope.cli import build_parser, main
from tilescope.store import EmbeddingStore


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    assert main(["embed", str(need(CMU)), "-o", str(out), "--model", "tiny-random"]) == 0
    return out, out / "CMU-1-Small-Region.zarr"


def test_embed_skips_finished_stores(embedded, capsys):
    out, _ = embedded
    assert main(["embed", str(CMU), "-o", str(out), "--model", "tiny-random"]) == 0
    assert "already embedded" in capsys.readouterr().out


def test_embed_refuses_a_finished_store_made_with_other_settings(embedded, capsys):
    """A complete store is no licence to skip: other settings are refused, listing them."""
    out, store = embedded
    argv = ["embed", str(CMU), "-o", str(out), "--model", "tiny-random", "--tile", "256"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "tile_px" in captured.err and "--overwrite" in captured.err
    assert "already embedded" not in captured.out and "Traceback" not in captured.err
    st = EmbeddingStore.open(store)
    assert st.complete and st.signature["grid"]["tile_px"] == 224  # untouched


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
    assert "the region 0,0,50,50 covers no embedded tissue tiles" in err and "draw" not in err


def test_search_against_a_folder_of_stores(embedded, capsys, tmp_path):
    """--against FOLDER searches its stores (skipping exports there, with a warning)."""
    out, store = embedded
    folder = tmp_path / "stores"
    folder.mkdir()
    (folder / "cmu.zarr").symlink_to(store, target_is_directory=True)
    assert main(["export", str(store), "-o", str(folder / "cmu-export.zarr")]) == 0
    capsys.readouterr()
    x, y = (int(v) for v in EmbeddingStore.open(store).coords[10])
    argv = ["search", str(store), "--region", f"{x + 100},{y + 100},24,24", "--against",
            str(folder), "--k", "4", "--json"]  # fmt: skip
    with pytest.warns(UserWarning, match="cmu-export.zarr"):
        assert main(argv) == 0
    matches = json.loads(capsys.readouterr().out)
    assert len(matches) == 4 and {Path(m["store"]).name for m in matches} == {"cmu.zarr"}
    assert all(m["index"] != 10 for m in matches)  # the query tile, reached via the link


def test_search_uses_embedded_tiles_only(tmp_path, capsys):
    """Tiles not embedded (an interrupted run, failed reads) are neither query nor match."""
    emb = random_embeddings(16)
    store = make_store(tmp_path / "half.zarr", emb, finish=False)  # rows 0..7 done
    # tile 7 (done) has its centre at (1220, 722), tile 8 (not done) at (1668, 722)
    assert main(["search", str(store), "--region", "1200,700,500,50", "-k", "20"]) == 0
    out = capsys.readouterr().out
    assert "query: 1 tiles like" in out
    assert "top 7 matches" in out  # the 7 other done rows, none of the rows not embedded
    assert main(["search", str(store), "--region", "1600,700,100,50"]) == 1
    err = capsys.readouterr().err
    assert "the region 1600,700,100,50 covers no embedded tissue tiles" in err


def test_search_png_marks_matches_of_the_same_store_however_spelled(
    embedded, monkeypatch, tmp_path
):
    """Matches found via --against FOLDER are marked on the query's slide too."""
    import tilescope.figures

    out, store = embedded
    seen = {}

    def fake_figure(*args, **kwargs):
        seen.update(kwargs)
        return Path(args[2])

    monkeypatch.setattr(tilescope.figures, "heatmap_figure", fake_figure)
    monkeypatch.chdir(out)
    x, y = (int(v) for v in EmbeddingStore.open(store).coords[10])
    argv = ["search", store.name, "--region", f"{x + 100},{y + 100},24,24", "--against",
            str(out), "-k", "3", "--png", str(tmp_path / "s.png"), "--slide", str(CMU)]  # fmt: skip
    assert main(argv) == 0
    assert len(seen["marks"]) == 3


def test_png_without_slide_is_refused_before_any_work(embedded, capsys):
    _, store = embedded
    argv = ["score", str(store), "--class", "a=tumor", "--class", "b=stroma", "--save",
            "never", "--png", "x.png"]  # fmt: skip
    assert main(argv) == 1
    assert "--slide" in capsys.readouterr().err
    assert "never" not in EmbeddingStore.open(store).score_names()
    assert main(["search", str(store), "--region", "0,0,1,1", "--png", "x.png"]) == 1
    err = capsys.readouterr().err
    assert "--slide" in err and "covers no" not in err


def test_every_option_has_help_and_k_is_a_positive_int(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"tilescope {name} {action.option_strings or action.dest}"
    for command in (["score", "S", "--class", "a=b"], ["search", "S", "--region", "0,0,1,1"]):
        for flag in ("-k", "--k"):
            assert parser.parse_args([*command, flag, "7"]).k == 7
            for bad in ("0", "-3", "two"):
                with pytest.raises(SystemExit) as exit_:
                    parser.parse_args([*command, flag, bad])
                assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "must be at least 1" in err and "not a whole number" in err


def test_export_zarr_and_geojson(embedded, tmp_path):
    _, store = embedded
    assert main(["export", str(store), "-o", str(tmp_path / "e.zarr"), "--dtype", "float32"]) == 0
    g = zarr.open_group(str(tmp_path / "e.zarr"), mode="r")
    np.testing.assert_array_equal(g["embeddings"][:], EmbeddingStore.open(store).embeddings)
    assert main(["export", str(store), "-o", str(tmp_path / "new" / "e.geojson")]) == 0
    features = json.loads((tmp_path / "new" / "e.geojson").read_text())["features"]
    assert len(features) == EmbeddingStore.open(store).n_tiles


def test_export_errors_name_the_flag_and_the_path(embedded, capsys, tmp_path):
    _, store = embedded
    out = tmp_path / "e.geojson"
    assert main(["export", str(store), "-o", str(out)]) == 0
    assert main(["export", str(store), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tilescope: error:") and "pass --overwrite" in err[-1]
    assert "overwrite=True" not in err[-1]
    assert main(["export", str(store), "-o", str(tmp_path / "e.csv")]) == 1
    assert "unknown export type '.csv'" in capsys.readouterr().err


def test_file_system_errors_are_one_line(embedded, capsys, tmp_path):
    """An OSError (here: a file where a folder must go) is a message naming the path."""
    _, store = embedded
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for argv in (["export", str(store), "-o", str(blocker / "e.zarr")],
                 ["embed", str(CMU), "-o", str(blocker), "--model", "tiny-random"]):  # fmt: skip
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tilescope: error:")
        assert str(blocker) in err[0] and "Traceback" not in err[0]


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
