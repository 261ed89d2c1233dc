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
    st = EmbeddingStore.open(store)
    x, y = (int(v) for v in st.coords[len(st.coords) // 2])
    assert main(["search", str(store), "--region", f"{x},{y},224,224", "-k", "3"]) == 0
    assert "UNTRAINED model: these matches mean nothing" in capsys.readouterr().out
    assert main(["search", str(store), "--region", f"{x},{y},224,224", "-k", "3", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[: out.rindex("}") + 1])["trained_model"] is False


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
    data = json.loads(out[: out.rindex("}") + 1])
    matches = data["matches"]
    assert data["n_done"] == data["n_tiles"] == st.n_tiles and data["query"]["like"] == 1
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
    matches = json.loads(capsys.readouterr().out)["matches"]
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


# -- issue 11 and issue 10 (first contact) ------------------------------------------------------
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from tilescope.synthetic import Blob, SyntheticSlide  # noqa: E402

TINY = ["--model", "tiny-random"]


@pytest.fixture
def no_model(monkeypatch):
    """Fail if a model is loaded: inputs must be checked first."""
    import tilescope.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(tilescope.models, "load_encoder", refuse)
    monkeypatch.setattr(tilescope.models, "load_encoder_for_store", refuse)


@pytest.fixture(scope="module")
def synth_slide(tmp_path_factory):
    spec = SyntheticSlide(1536, 1024, mpp=0.5, n_levels=2, blobs=(Blob(380, 250, 300, 200),))
    return spec.write(tmp_path_factory.mktemp("synth") / "slide.tif")


def copy_store(store: Path, dest: Path) -> Path:
    shutil.copytree(store, dest)
    return dest


def err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("tilescope: error:") and "Traceback" not in "".join(err)
    return err[-1]


def test_two_slides_with_one_stem_get_two_stores(synth_slide, tmp_path, capsys):
    """Item 1: dA/slide.svs and dB/slide.tif (both `slide`) never share a store, even with
    --overwrite."""
    a, b = tmp_path / "dA", tmp_path / "dB"
    a.mkdir(), b.mkdir()
    (a / "slide.svs").symlink_to(need(CMU))
    (b / "slide.tif").symlink_to(synth_slide)
    out = tmp_path / "out"
    argv = ["embed", str(a / "slide.svs"), str(b / "slide.tif"), "-o", str(out), *TINY]
    assert main([*argv, "--overwrite"]) == 0
    stores = sorted(out.glob("*.zarr"))
    assert len(stores) == 2
    sizes = {EmbeddingStore.open(s).signature["slide"]["size_bytes"] for s in stores}
    assert sizes == {CMU.stat().st_size, synth_slide.stat().st_size}
    assert main([*argv, "--overwrite"]) == 0  # again: both already embedded, nothing replaced
    assert capsys.readouterr().out.count("nothing to do") == 2
    assert sorted(out.glob("*.zarr")) == stores


def test_o_names_one_store_or_a_folder(synth_slide, tmp_path, capsys, no_model):
    out = tmp_path / "x.zarr"
    assert main(["embed", str(synth_slide), str(need(CMU)), "-o", str(out), *TINY]) == 1
    assert "names one store" in err_line(capsys) and not out.exists()


def test_o_store_path_writes_exactly_that_store(synth_slide, tmp_path):
    out = tmp_path / "mine.zarr"
    assert main(["embed", str(synth_slide), "-o", str(out), *TINY]) == 0
    assert EmbeddingStore.open(out).complete  # not mine.zarr/slide.zarr
    assert not list(out.glob("*.zarr"))


def test_without_o_stores_go_to_the_default_folder(synth_slide, tmp_path, monkeypatch, capsys):
    from tilescope.catalog import stores_for_slide

    monkeypatch.setenv("TILESCOPE_STORES", str(tmp_path / "stores"))
    assert main(["embed", str(synth_slide), *TINY]) == 0
    out = capsys.readouterr().out
    assert f"stores go to {tmp_path / 'stores'}" in out
    assert stores_for_slide(synth_slide, [tmp_path / "stores"])  # where napari looks


def test_overwrite_never_replaces_another_slides_store(embedded, synth_slide, tmp_path, capsys):
    _, store = embedded
    mine = copy_store(store, tmp_path / "cmu.zarr")
    argv = ["embed", str(synth_slide), "-o", str(mine), "--overwrite", *TINY]
    assert main(argv) == 1
    assert "another slide" in err_line(capsys)
    assert EmbeddingStore.open(mine).signature["slide"]["name"] == CMU.name


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["embed", "NOPE.svs", "-o", "{tmp}"], "no such file"),
        (["embed", str(TCGA), "-o", "{tmp}"], "--slide-mpp"),
        (["embed", str(CMU), "-o", "{tmp}", "--mpp", "1e9"], "less than one pixel"),
        (["embed", str(CMU), "-o", "{tmp}", "--tile", "100000"], "tile_px must be"),
        (["embed", str(CMU), "-o", "{tmp}", "--tile", "1"], "tile_px must be"),
    ],
)
def test_inputs_are_checked_before_the_model_loads(argv, needle, tmp_path, capsys, no_model):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*argv, "--model", "biomedclip"]) == 1
    line = err_line(capsys)
    assert needle in line and "nothing to do" not in line


def test_negative_workers_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["embed", "x.svs", "--workers", "-3"])
    assert exit_.value.code == 2 and "must be 0 or more" in capsys.readouterr().err  # 0: in-process


def test_a_slide_without_tiles_is_an_error_not_nothing_to_do(tmp_path, capsys):
    blank = SyntheticSlide(1024, 768, mpp=0.5, n_levels=1).write(tmp_path / "glass.tif")
    assert main(["embed", str(blank), "-o", str(tmp_path / "out"), *TINY]) == 1
    line = err_line(capsys)
    assert "no tiles to embed" in line and "--min-tissue" in line
    assert not list((tmp_path / "out").glob("*.zarr"))  # no empty store made


def test_info_and_embed_agree_on_an_implausible_pixel_size(tmp_path, capsys):
    spec = SyntheticSlide(
        512, 512, mpp=352.8, n_levels=1, blobs=(Blob(90000, 90000, 50000, 50000),)
    )
    path = spec.write(tmp_path / "dpi72.tif")
    assert main(["info", str(path)]) == 0
    assert "implausible (352.8 x 352.8 µm/px recorded)" in capsys.readouterr().out
    assert main(["embed", str(path), "-o", str(tmp_path / "o"), *TINY]) == 1
    assert "implausible (352.8 x 352.8 µm/px recorded)" in err_line(capsys)


# -- score ------------------------------------------------------------------------------------
SCORE = ["--class", "tumor=invasive carcinoma", "--class", "normal=benign tissue"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--save", ""], "--save ''"),
        (["--save", ".hidden"], "--save '.hidden'"),
        (["--class", "a:b=x"], "reads two ways"),
        (["--png", "h.txt", "--slide", str(CMU)], "name it ….png"),
    ],
)
def test_score_refuses_bad_input_before_any_work(embedded, extra, needle, capsys, no_model):
    _, store = embedded
    assert main(["score", str(store), *SCORE, *extra]) == 1
    assert needle in err_line(capsys)


def test_score_png_of_another_slide_is_refused(embedded, synth_slide, tmp_path, capsys, no_model):
    _, store = embedded
    png = tmp_path / "h.png"
    argv = ["score", str(store), *SCORE, "--png", str(png), "--slide", str(synth_slide)]
    assert main(argv) == 1
    assert "is not the slide this store was made from" in err_line(capsys)
    assert not png.exists()
    argv = [
        "search",
        str(store),
        "--region",
        "0,0,9,9",
        "--png",
        str(png),
        "--slide",
        str(synth_slide),
    ]
    assert main(argv) == 1 and "is not the slide" in err_line(capsys)


def partial_copy(store: Path, dest: Path, keep: int) -> Path:
    """A copy of `store` with only its first `keep` rows embedded (a partial store)."""
    copy_store(store, dest)
    g = zarr.open_group(str(dest), mode="r+")
    done = g["done"][:]
    done[keep:] = 0
    g["done"][:] = done
    sig = dict(g.attrs["tilescope"])
    sig["complete"] = False
    g.attrs["tilescope"] = sig
    return dest


def test_partial_stores_report_n_done_of_n(embedded, tmp_path, capsys):
    _, store = embedded
    half = partial_copy(store, tmp_path / "half.zarr", keep=30)
    n = EmbeddingStore.open(half).n_tiles
    assert main(["score", str(half), *SCORE, "--json", "--save", "partial"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["n_done"], data["n_tiles"], data["complete"]) == (30, n, False)
    assert data["n_not_embedded"] == n - 30
    assert data["partial"] is True and data["coverage"] == f"partial: 30 of {n} tiles"
    assert main(["score", str(store), *SCORE, "--json"]) == 0  # the whole store
    whole = json.loads(capsys.readouterr().out)
    assert whole["partial"] is False and whole["coverage"] == ""
    assert main(["score", str(half), *SCORE]) == 0
    out = capsys.readouterr().out
    assert f"[partial: 30 of {n} tiles]  (attention pooling" in out  # on the label's line
    assert f"pooling over 30 of {n} tiles ({n - 30} not embedded yet)" in out
    assert "the store is partial" in out
    meta = EmbeddingStore.open(half).read_scores("partial")[1]
    assert meta["store_state"]["n_done"] == 30 and meta["store_state"]["complete"] is False
    assert main(["export", str(half), "-o", str(tmp_path / "half-e.zarr")]) == 0
    assert f"30 of {n} tiles" in capsys.readouterr().out
    assert main(["search", str(half), "--region", "0,0,3000,3000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_done"] == 30


# -- search -----------------------------------------------------------------------------------
@pytest.mark.parametrize("box", ["100,100,-50,50", "100,100,50,0", "1,2,nan,4", "1,2,3"])
def test_search_refuses_bad_boxes(embedded, box, capsys):
    _, store = embedded
    assert main(["search", str(store), "--region", box]) == 1
    assert f"--region {box!r}" in err_line(capsys)
    assert main(["search", str(store), "--region", "0,0,3000,3000", "--unlike", box]) == 1
    assert f"--unlike {box!r}" in err_line(capsys)


def test_search_region_smaller_than_a_tile_and_unlike_inside_it(embedded, capsys):
    _, store = embedded
    st = EmbeddingStore.open(store)
    x, y = (int(v) for v in st.coords[10])
    tiny = f"{x + 3},{y + 3},5,5"  # far from the centre of tile 10, inside it
    assert main(["search", str(store), "--region", tiny, "--json", "-k", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["query"]["like"] == 1 and all(m["index"] != 10 for m in data["matches"])
    argv = ["search", str(store), "--region", f"{x},{y},200,200", "--unlike", f"{x},{y},224,224"]
    assert main(argv) == 1
    assert "inside the query regions too" in err_line(capsys)


# -- damaged stores, check, repair --------------------------------------------------------------
def _zero_chunk(p: Path) -> None:
    f = p / "embeddings" / "c" / "0" / "0"
    f.write_bytes(bytes(f.stat().st_size))


def _truncate_done(p: Path) -> None:
    f = p / "done" / "c" / "0"
    f.write_bytes(f.read_bytes()[:5])


def _random_chunk(p: Path) -> None:
    f = p / "embeddings" / "c" / "0" / "0"
    f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))


@pytest.mark.parametrize("damage", [_zero_chunk, _truncate_done, _random_chunk])
def test_damaged_store_every_command_says_so_and_embed_repairs(embedded, tmp_path, capsys, damage):
    _, store = embedded
    good = EmbeddingStore.open(store).embeddings
    bad = copy_store(store, tmp_path / "bad.zarr")
    damage(bad)
    for argv in (["score", str(bad), *SCORE, "--json"],
                 ["search", str(bad), "--region", "0,0,3000,3000", "--json"],
                 ["export", str(bad), "-o", str(tmp_path / "e.zarr")]):  # fmt: skip
        assert main(argv) == 1
        line = err_line(capsys)
        assert str(bad) in line and "damaged" in line
        assert "0.5" not in capsys.readouterr().out  # no made-up scores on stdout
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "repair: run `tilescope embed" in out
    assert main(["embed", str(CMU), "-o", str(bad), *TINY]) == 0
    assert "repaired" in capsys.readouterr().out
    assert main(["check", str(bad), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    np.testing.assert_allclose(EmbeddingStore.open(bad).embeddings, good, atol=1e-5)


def test_check_of_a_healthy_store(embedded, capsys):
    _, store = embedded
    assert main(["check", str(store)]) == 0
    out = capsys.readouterr().out
    assert ": OK: complete" in out and "UNTRAINED" in out


def test_a_path_that_is_not_a_store_suggests_no_missing_flag(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    for argv in (["score", str(folder), *SCORE], ["search", str(folder), "--region", "0,0,5,5"],
                 ["export", str(folder), "-o", str(tmp_path / "e.zarr")]):  # fmt: skip
        assert main(argv) == 1
        assert "overwrite" not in err_line(capsys)
    odd = tmp_path / "odd.zarr"
    odd.write_text("not a store")
    assert main(["embed", str(need(CMU)), "-o", str(odd), *TINY]) == 1
    assert "pass --overwrite to replace it" in err_line(capsys)


def test_export_anonymize_and_the_overwrite_flag(embedded, tmp_path, capsys):
    _, store = embedded
    out = tmp_path / "a.zarr"
    assert main(["export", str(store), "-o", str(out), "--anonymize"]) == 0
    assert CMU.stem not in (out / "zarr.json").read_text()
    assert main(["export", str(store), "-o", str(out)]) == 1
    assert "pass --overwrite to replace it" in err_line(capsys)


def test_mismatch_names_the_flag(embedded, capsys):
    out, _ = embedded
    assert main(["embed", str(CMU), "-o", str(out), *TINY, "--min-tissue", "0.3"]) == 1
    line = capsys.readouterr().err
    assert "grid.min_tissue" in line and "pass --overwrite to replace it" in line


def test_a_finished_store_on_a_read_only_file_system(embedded, tmp_path):
    """Item 15 on a real read-only mount (a private mount namespace; needs root)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root for a read-only bind mount")
    _, store = embedded
    folder = tmp_path / "ro"
    copy_store(store, folder / "cmu.zarr")
    before = sorted(str(p) for p in folder.rglob("*"))
    code = "import sys; from tilescope.cli import main; sys.exit(main(sys.argv[1:]))"
    script = (
        f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && "
        f"{sys.executable} -c '{code}' embed {CMU} -o {folder / 'cmu.zarr'} --model tiny-random"
    )
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    if "mount:" in proc.stderr and proc.returncode:
        pytest.skip(f"cannot make a read-only mount here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout
    assert sorted(str(p) for p in folder.rglob("*")) == before  # no lock file, nothing written


def test_a_folder_stands_for_the_slides_in_it(synth_slide, tmp_path, capsys):
    """`tilescope embed FOLDER -o DIR`: every slide file under FOLDER (sub-folders too, as TCGA
    lays a cohort out), not hidden ones or stores; an empty folder is a clear error."""
    from tilescope.slide import find_slides

    cohort = tmp_path / "cohort"
    (cohort / "uuid-1").mkdir(parents=True)
    (cohort / ".trash").mkdir()
    (cohort / "old.zarr").mkdir()
    (cohort / "uuid-1" / "b.tif").symlink_to(synth_slide)
    (cohort / "a.svs").symlink_to(need(CMU))
    (cohort / ".trash" / "c.svs").symlink_to(need(CMU))
    (cohort / "old.zarr" / "d.tif").symlink_to(synth_slide)
    (cohort / "notes.txt").write_text("not a slide")
    dicom = cohort / "dicom-slide"
    dicom.mkdir()
    for name in ("level-1.dcm", "level-0.dcm", "label.dcm"):  # one DICOM slide, many files
        (dicom / name).write_bytes(b"DICM")
    found = [p.relative_to(cohort).as_posix() for p in find_slides(cohort)]
    assert found == ["a.svs", "dicom-slide/label.dcm", "uuid-1/b.tif"]

    for f in dicom.iterdir():  # stub files: not slides OpenSlide could open
        f.unlink()
    out = tmp_path / "out"
    assert main(["embed", str(cohort), "-o", str(out), *TINY]) == 0
    assert f"{cohort}: 2 slide files" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.zarr")) == ["a.zarr", "b.zarr"]
    assert all(EmbeddingStore.open(p).complete for p in out.glob("*.zarr"))

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert main(["embed", str(empty), "-o", str(out), *TINY]) == 1
    line = err_line(capsys)
    assert str(empty) in line and "no slide files" in line
