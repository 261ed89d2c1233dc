"""Cohorts: slides embedded on a 2-worker Dask LocalCluster, a worker killed mid-run, a slide
that always fails, resume; and a folder of stores scored at once (`tilescope score DIR`).

One cluster (two worker processes) serves the module, and one cohort run on it covers most
cluster tests (each worker loads the model once per run, and that is most of the time here).
"""

from __future__ import annotations

import csv
import functools
import json
import multiprocessing
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tilescope._torch_env import available_cpus
from tilescope.cli import main
from tilescope.cohort import (
    SUMMARY_NAME,
    ModelSpec,
    connect,
    embed_cohort,
    parse_local,
    score_stores,
    worker_device,
)
from tilescope.cohort._progress import ProgressBook
from tilescope.embed import embed_slide
from tilescope.errors import TilescopeError
from tilescope.grid import TileGrid
from tilescope.models import load_encoder, load_encoder_for_store
from tilescope.score import PromptSet, score_store
from tilescope.store import EmbeddingStore
from tilescope.synthetic import Blob, SyntheticSlide

GOOD = ("s0", "s1", "s2", "s3")  # s1: its worker is killed; s2: partial; s3: complete
# s4: kills every worker that runs it (a slide that crashes its decoder); blank: no tissue
BATCH = 4
EMBED = {"grid": TileGrid(), "batch_size": BATCH}
#: What the workers load: the serial reference's model and backend (`tiny_encoder`: torch fp32;
#: ``auto`` would be OpenVINO bf16 on a CPU with native bf16), so stores can be compared exactly.
MODEL = ModelSpec(name="tiny-random", device="cpu", load_kwargs={"backend": "torch"})
CLASSES = ["tumor=invasive carcinoma|malignant epithelium", "normal=benign tissue"]


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    """Five small tissue slides (20 tiles each), and one of glass only (fails)."""
    root = tmp_path_factory.mktemp("cohort_slides")
    out = {}
    for i, name in enumerate((*GOOD, "s4")):
        blobs = (Blob(300 + 15 * i, 280, 200, 180 - 10 * i), Blob(750, 520 - 15 * i, 170, 200))
        spec = SyntheticSlide(2048, 1536, mpp=0.5, blobs=blobs, n_levels=2)
        out[name] = spec.write(root / f"{name}.tif")
    out["blank"] = SyntheticSlide(1024, 768, mpp=0.5, n_levels=2).write(root / "blank.tif")
    return out


@pytest.fixture(scope="module")
def serial(slides, tiny_encoder, tmp_path_factory) -> dict[str, Path]:
    """The reference: each good slide embedded in this process, one after another."""
    root = tmp_path_factory.mktemp("serial")
    out = {}
    for name in GOOD:
        out[name] = root / f"{name}.zarr"
        assert embed_slide(slides[name], out[name], encoder=tiny_encoder, **EMBED).complete
    return out


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of two worker processes; no worker (nor a worker's tile reader)
    outlives it. Python's resource tracker and fork server, and the tile readers of this
    process, shared by the whole test process, stay by design."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    with connect(local=2, dashboard=False, threads_per_worker=1) as conn:
        yield conn
    leftover = [
        p
        for p in me.children(recursive=True)
        if p.pid not in before
        and not re.search("resource_tracker|forkserver", " ".join(p.cmdline()))
        # this process's own tile readers (an in-process embed of a test) stay by design
        and not (p.ppid() == me.pid and "tilescope._readers" in " ".join(p.cmdline()))
    ]
    gone, alive = psutil.wait_procs(leftover, timeout=20)
    assert not alive, f"worker processes outlived the cluster: {alive}"


def _die(marker: str, kills: dict, p) -> None:
    """Test hook (runs on the worker): kill this worker process when slide ``name`` has
    embedded two batches, the first ``kills[name]`` times (marker files count them, whichever
    worker runs it)."""
    if p.slide not in kills or p.stage != "embedding" or p.done < 2 * BATCH:
        return
    for k in range(kills[p.slide]):
        try:
            os.close(os.open(f"{marker}-{p.slide}-{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        os._exit(17)  # as abrupt as a lost node: no cleanup, no flush


@pytest.fixture(scope="module")
def run(cluster, slides, serial, tiny_encoder, tmp_path_factory):
    """One cohort run: s0 new, s1 killed mid-run, s2 partial, s3 finished, s4 kills its
    workers, blank fails."""
    out = tmp_path_factory.mktemp("cohort_out")
    shutil.copytree(serial["s3"], out / "s3.zarr")
    calls = iter(range(1000))
    part = embed_slide(slides["s2"], out / "s2.zarr", encoder=tiny_encoder,
                       should_stop=lambda: next(calls) >= 3, **EMBED)  # fmt: skip
    assert 0 < part.embedded_now < part.n_tiles
    marker = out / "killed"
    reports, models = [], []
    jobs = [(slides[n], out / f"{n}.zarr") for n in (*GOOD, "s4", "blank")]
    result = embed_cohort(
        cluster.client, jobs, model=MODEL, embed_kwargs=EMBED,
        summary=out / SUMMARY_NAME, on_slide=reports.append, on_model=models.append,
        on_batch=functools.partial(_die, str(marker), {"s1.tif": 1, "s4.tif": 9}),
    )  # fmt: skip
    by_name = {Path(r.slide).stem: r for r in result.reports}
    return {"out": out, "result": result, "by": by_name, "partial_done": part.embedded_now,
            "reports": reports, "models": models, "marker": marker}  # fmt: skip


def _same_store(a: Path, b: Path) -> None:
    sa, sb = EmbeddingStore.open(a), EmbeddingStore.open(b)
    assert sa.complete and sb.complete
    for name in ("coords", "grid_rc", "tissue", "done"):
        np.testing.assert_array_equal(getattr(sa, name), getattr(sb, name), err_msg=name)
    np.testing.assert_array_equal(sa.embeddings, sb.embeddings)  # exactly, not approximately


# -- a cohort on a 2-worker LocalCluster --------------------------------------------------------
def test_every_store_completes_and_equals_the_serial_one(run, serial):
    assert Path(f"{run['marker']}-s1.tif-0").exists(), "the test hook never killed a worker"
    for name in GOOD:
        _same_store(run["out"] / f"{name}.zarr", serial[name])
        assert run["by"][name].ok


def test_the_slide_whose_worker_died_ran_again(run):
    r = run["by"]["s1"]
    assert r.status == "embedded" and r.attempts == 2 and r.tiles and r.embedded_now > 0


def test_finished_stores_are_skipped_and_partial_ones_resumed(run):
    s2, s3 = run["by"]["s2"], run["by"]["s3"]
    assert s3.status == "complete" and s3.embedded_now == 0
    assert s2.status == "embedded" and s2.embedded_now == s2.tiles - run["partial_done"]


def test_a_slide_that_always_fails_is_reported_and_the_others_complete(run):
    r = run["by"]["blank"]
    assert r.status == "failed" and r.attempts == 2 and "no tiles to embed" in r.error
    assert {Path(x.slide).stem for x in run["result"].failed} == {"blank", "s4"}
    names = [Path(x.slide).stem for x in run["reports"]]
    assert sorted(names) == sorted([*GOOD, "s4", "blank"])  # each reported once, as it ended
    assert run["models"][0]["trained"] is False and run["models"][0]["daemonic"] is False


def test_a_slide_whose_workers_die_twice_is_given_up(run):
    r = run["by"]["s4"]
    assert r.status == "failed" and r.attempts == 2 and "given up after 2" in r.error
    assert Path(f"{run['marker']}-s4.tif-1").exists()  # two workers died running it
    assert not Path(f"{run['marker']}-s4.tif-2").exists()  # no third: given up before any work
    assert not list(run["out"].glob(".*.attempt-*"))  # the attempt files are cleaned up


def test_summary_csv_has_a_row_per_slide(run):
    with open(run["out"] / SUMMARY_NAME, newline="") as fh:
        rows = {Path(r["slide"]).stem: r for r in csv.DictReader(fh)}
    assert set(rows) == {*GOOD, "s4", "blank"}
    assert list(rows["s0"])[:8] == ["slide", "store", "tiles", "embedded_now", "failed_tiles",
                                    "seconds", "status", "error"]  # fmt: skip
    s0 = EmbeddingStore.open(run["out"] / "s0.zarr")
    assert rows["s0"]["status"] == "embedded" and int(rows["s0"]["tiles"]) == s0.n_tiles
    assert rows["s0"]["store"] == str(run["out"] / "s0.zarr")
    assert rows["s3"]["status"] == "complete" and rows["s3"]["embedded_now"] == "0"
    assert rows["blank"]["status"] == "failed" and "no tiles" in rows["blank"]["error"]
    assert rows["s1"]["attempts"] == "2" and float(rows["s1"]["seconds"]) > 0


def _slow(p) -> None:
    time.sleep(0.5)  # on the worker: a batch takes a while, as on a real slide


def test_interrupted_run_keeps_rows_and_the_same_call_resumes(cluster, slides, serial, tmp_path):
    """Ctrl-C: tasks are cancelled, running slides stop after their batch, flush their rows
    and let go of their store; the summary says so; the same call again finishes the job."""
    jobs = [(slides[n], tmp_path / f"{n}.zarr") for n in ("s0", "s1")]

    def interrupt(p) -> None:
        if p.patches_embedded > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_cohort(cluster.client, jobs, model=MODEL,
                     embed_kwargs=EMBED, summary=tmp_path / SUMMARY_NAME, progress=interrupt,
                     on_batch=_slow)  # fmt: skip
    with open(tmp_path / SUMMARY_NAME, newline="") as fh:
        assert {r["status"] for r in csv.DictReader(fh)} <= {"interrupted", "not started"}
    again = embed_cohort(cluster.client, jobs, model=MODEL,
                         embed_kwargs=EMBED)  # fmt: skip
    assert [r.status for r in again.reports] == ["embedded", "embedded"]
    assert sum(r.embedded_now for r in again.reports) < sum(r.tiles or 0 for r in again.reports)
    for r, name in zip(again.reports, ("s0", "s1"), strict=True):  # as the serial stores
        assert r.attempts == 1
        _same_store(Path(r.store), serial[name])


def test_cli_joins_a_cluster_by_scheduler_file(cluster, slides, tmp_path, capsys):
    """`embed --scheduler-file`: stores decided on the client (two slides named s0.tif get
    two stores), progress, the dashboard line and the summary; a second run does nothing."""
    other = tmp_path / "other"
    other.mkdir()
    twin = SyntheticSlide(1536, 1024, mpp=0.5, blobs=(Blob(300, 250, 250, 200),), n_levels=2)
    twin_path = twin.write(other / "s0.tif")
    sched = tmp_path / "scheduler.json"
    sched.write_text(json.dumps({"address": cluster.client.scheduler.address}))
    out = tmp_path / "out"
    argv = ["embed", str(slides["s0"]), str(twin_path), "-o", str(out), "--model", "tiny-random",
            "--scheduler-file", str(sched), "--device", "cpu", "--batch-size", "8"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr()
    assert "cohort: 2 slides on the Dask scheduler at tcp://" in text.out
    assert "dashboard:" in text.out and "UNTRAINED" in text.out
    # the two workers of this host share its CPUs, whichever backend auto picked
    n = max(1, available_cpus() // 2)
    tower = rf"image tower: (torch fp32|openvino (bf16|fp32)) on cpu, {n} threads? \(worker"
    assert re.search(tower, text.out), text.out
    assert "2/2 slides" in text.err and "patches/s" in text.err
    stores = sorted(p.name for p in out.glob("*.zarr"))
    assert len(stores) == 2 and "s0.zarr" in stores and stores[0].startswith("s0-")
    assert all(EmbeddingStore.open(out / s).complete for s in stores)
    with open(out / SUMMARY_NAME, newline="") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["embedded", "embedded"]


def test_cli_refuses_a_bad_cluster_spec(slides, capsys):
    assert main(["embed", str(slides["s0"]), "--cluster", "remote:3"]) == 1
    assert "local:N" in capsys.readouterr().err


# -- pieces -------------------------------------------------------------------------------------
def test_parse_local():
    assert parse_local("local") is None and parse_local("local:3") == 3
    for bad in ("local:0", "local:x", "loc", "tcp://h:1"):
        with pytest.raises(TilescopeError, match="local:N"):
            parse_local(bad)


def test_one_gpu_per_worker():
    assert worker_device(None, 0, 0) is None  # no GPU: pick_device decides
    assert worker_device("cuda", "SLURMCluster-3", 1) == "cuda"  # Slurm gave the job one GPU
    assert [worker_device(None, i, 2) for i in range(4)] == ["cuda:0", "cuda:1"] * 2
    assert worker_device("auto", "SLURMCluster-3-1", 4) == "cuda:1"
    assert worker_device("cpu", 3, 4) == "cpu" and worker_device("cuda:2", 0, 4) == "cuda:2"


def test_a_cancelled_task_is_seen_by_the_worker_plugin():
    """Dask reports a running task that the client let go of as executing -> released (its
    state becomes "cancelled"); a finished or failed one is not a cancelled one."""
    from tilescope.cohort._worker import CohortWorker

    plugin = CohortWorker(ModelSpec(name="tiny-random"))
    plugin.transition("done", "executing", "memory")
    plugin.transition("raised", "executing", "error")
    plugin.transition("let-go", "executing", "released")
    assert plugin.cancelled == {"let-go"}


def _read_in_daemon(q, path, layout) -> None:
    from tilescope.tiles import stream_tiles

    batches = stream_tiles(path, layout, target_mpp=0.5, tile_px=224, num_workers=1)
    q.put(np.concatenate([b.images for b in batches]))


def test_daemonic_worker_processes_start_reader_processes(slides):
    """Dask starts workers as daemonic processes unless told otherwise; multiprocessing may not
    start children there, but the readers are plain subprocesses: they run, and read what an
    in-process read gives."""
    from tilescope.grid import TileGrid
    from tilescope.slide import Slide
    from tilescope.tiles import stream_tiles
    from tilescope.tissue import tissue_mask

    path = slides["s0"]
    with Slide(path) as s:
        layout = TileGrid().layout(s, tissue_mask(s))
    want = np.concatenate(
        [b.images for b in stream_tiles(path, layout, target_mpp=0.5, tile_px=224, num_workers=0)]
    )
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_read_in_daemon, args=(q, path, layout), daemon=True)
    p.start()
    got = q.get(timeout=120)
    p.join(10)
    np.testing.assert_array_equal(got, want)


def test_progress_rate_and_eta():
    now = [0.0]
    book = ProgressBook(3, clock=lambda: now[0])
    book.event({"slide": 0, "attempt": "a", "stage": "start"})
    book.event({"slide": 0, "attempt": "a", "stage": "embedding", "done": 0, "total": 100,
                "embedded": 0})  # fmt: skip
    assert book.snapshot(1, 2).eta is None  # no rate yet
    now[0] = 10.0
    book.event({"slide": 0, "attempt": "a", "stage": "embedding", "done": 50, "total": 100,
                "embedded": 50})  # fmt: skip
    p = book.snapshot(1, 2)
    assert p.rate == pytest.approx(5.0) and p.patches_embedded == 50
    # 50 left of slide 0, and two slides not started, counted as 100 each: 250 / 5 per s
    assert p.eta == pytest.approx(50.0)
    book.event({"slide": 0, "attempt": "b", "stage": "start"})  # its worker died: again
    book.event({"slide": 0, "attempt": "b", "stage": "embedding", "done": 40, "total": 100,
                "embedded": 10})  # fmt: skip
    assert book.embedded() == 60 and book.starts[0] == 2
    book.finish(0, True, 100)
    assert book.snapshot(0, 2).slides_done == 1


# -- scoring a folder of stores -----------------------------------------------------------------
@pytest.fixture(scope="module")
def snapshot_model(repo_files, tmp_path_factory):
    """The tiny weights in a local BiomedCLIP-layout folder: another model id and digest."""
    from model_fixtures import BERT_REPO, BIOMEDCLIP_REPO

    folder = tmp_path_factory.mktemp("snap") / "biomedclip"
    folder.mkdir()
    for src in repo_files[BIOMEDCLIP_REPO].iterdir():
        os.symlink(src, folder / src.name)
    os.symlink(repo_files[BERT_REPO], folder / "text")
    return load_encoder(str(folder), device="cpu")


@pytest.fixture(scope="module")
def store_dir(serial, slides, snapshot_model, tiny_encoder, tmp_path_factory):
    """s0, s3 complete (tiny-random); s1 partial; s2 made by another model; an empty store."""
    root = tmp_path_factory.mktemp("stores")
    for name in ("s0", "s3"):
        shutil.copytree(serial[name], root / f"{name}.zarr")
    calls = iter(range(1000))
    embed_slide(slides["s1"], root / "s1.zarr", encoder=tiny_encoder,
                should_stop=lambda: next(calls) >= 3, **EMBED)  # fmt: skip
    embed_slide(slides["s2"], root / "s2.zarr", encoder=snapshot_model, **EMBED)
    calls0 = iter(range(1000))
    embed_slide(slides["s0"], root / "sub" / "empty.zarr", encoder=tiny_encoder,
                should_stop=lambda: next(calls0) >= 1, **EMBED)  # fmt: skip
    return root


def test_score_dir_writes_labels_and_top_tiles(store_dir, snapshot_model, tiny_encoder, tmp_path,
                                               capsys):  # fmt: skip
    labels = tmp_path / "labels.csv"
    argv = ["score", str(store_dir), *sum((["--class", c] for c in CLASSES), []), "--csv",
            str(labels), "--top", "3", "--pooling", "attention"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "PARTIAL" in out and "2 models" in out and "UNTRAINED" in out
    with open(labels, newline="") as fh:
        rows = {Path(r["store"]).name: r for r in csv.DictReader(fh)}
    assert set(rows) == {"s0.zarr", "s1.zarr", "s2.zarr", "s3.zarr", "empty.zarr"}
    assert rows["s1.zarr"]["state"] == "partial" and rows["s0.zarr"]["state"] == "complete"
    assert rows["empty.zarr"]["state"] == "empty" and rows["empty.zarr"]["label"] == ""
    assert rows["s2.zarr"]["model"].startswith("local-dir:")
    prompts = PromptSet.parse(CLASSES)
    for name, enc in (("s0", tiny_encoder), ("s1", tiny_encoder), ("s2", snapshot_model)):
        store = EmbeddingStore.open(store_dir / f"{name}.zarr")
        scores, pooled = score_store(store, prompts, enc.encode_text, enc.logit_scale)
        row = rows[f"{name}.zarr"]
        assert row["label"] == pooled.label and int(row["n_done"]) == store.n_done
        for c in ("tumor", "normal"):
            assert float(row[f"score_{c}"]) == pytest.approx(pooled.scores[c], rel=1e-5)
        if name == "s0":  # top tiles: the three highest cosines of each class, in order
            with open(tmp_path / "labels_top_tiles.csv", newline="") as fh:
                tiles = [t for t in csv.DictReader(fh) if Path(t["store"]).name == "s0.zarr"]
            assert [t["class"] for t in tiles] == ["tumor"] * 3 + ["normal"] * 3
            for c, cls in enumerate(("tumor", "normal")):
                want = np.argsort(-scores.cosine[:, c], kind="stable")[:3]
                got = [t for t in tiles if t["class"] == cls]
                assert [int(t["row"]) for t in got] == list(want)
                assert [int(t["x"]) for t in got] == list(store.coords[want, 0])
                assert [t["rank"] for t in got] == ["1", "2", "3"]


def test_score_stores_reports_a_model_it_cannot_load(store_dir):
    def load(model):
        if model["model_id"] != "tiny-random":
            raise TilescopeError("weights not found")
        return load_encoder_for_store(dict(model), device="cpu")

    res = {r.store.name: r for r in score_stores(
        sorted(store_dir.glob("*.zarr")), PromptSet.parse(CLASSES), load, top=0)}  # fmt: skip
    assert res["s2.zarr"].state == "error" and "weights not found" in res["s2.zarr"].error
    assert res["s0.zarr"].state == "complete" and res["s0.zarr"].top == []


def test_score_dir_refuses_one_model_for_stores_of_two(store_dir, capsys):
    argv = ["score", str(store_dir), "--class", "a=b", "--class", "c=d", "--model", "tiny-random"]
    assert main(argv) == 1
    assert "2 models" in capsys.readouterr().err
