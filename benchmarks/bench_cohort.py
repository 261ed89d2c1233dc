"""Overhead of running a cohort on Dask against the plain serial loop, in the same run.

    python benchmarks/bench_cohort.py [--slides 4] [--size 1792] [--model full|tiny] [--repeat 2]

Both sides embed the same 4 synthetic slides from scratch, with the same model, batch size,
reader threads and torch threads (the machine's CPUs):

- ``serial``: in this process, load the model, then ``embed_slide`` slide after slide (what
  ``tilescope embed`` does without ``--cluster``);
- ``cohort``: `tilescope.cohort.embed_cohort` on a LocalCluster of ONE worker process,
  from the call to its return: the worker loads the model (the serial side's load is timed
  too), one task per slide, progress events, results, the summary CSV. Starting the cluster
  (once per cohort, whatever its size) is timed apart (``cluster_start_seconds``).

The headline ``"overhead_ratio"`` is cohort / serial seconds (goal <= 1.1);
``overhead_ratio_with_start`` adds the cluster's start. The model is BiomedCLIP's full-size
architecture with random weights (``--model full``, the default): what users run, so the
per-slide costs of Dask (a task, a few events, a result) are weighed against real compute;
with the tiny model on slides this small the same fixed costs would dominate a run of a few
seconds and say nothing about a cohort. The slides are small (``--size`` px square at
0.5 µm/px) to keep the run short. Rounds alternate serial and cohort (``--repeat``, the best
of each is kept), so a drift in machine load favours neither. The modules the worker is forked
with are imported here first, so neither side pays first imports the other does not. Prints
one JSON object, with the machine's load before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def make_slides(root: Path, n: int, size: int) -> list[Path]:
    from tilescope.synthetic import Blob, SyntheticSlide

    slides = []
    for i in range(n):
        r = size * 0.5 * 0.36  # µm: one large blob of tissue, a little different per slide
        blobs = (Blob(size * 0.25 + 10 * i, size * 0.25, r, r * (0.9 - 0.05 * i)),)
        spec = SyntheticSlide(size, size, mpp=0.5, blobs=blobs, n_levels=2)
        slides.append(spec.write(root / f"slide{i}.tif"))
    return slides


def factory(kind: str):
    import functools

    from tilescope.models import build_biomedclip_architecture, load_encoder

    if kind == "full":
        return build_biomedclip_architecture
    return functools.partial(load_encoder, "tiny-random")


def run_serial(kind: str, slides: list[Path], out: Path, batch: int, readers: int) -> dict:
    from tilescope.embed import embed_slide

    t = time.perf_counter()
    encoder = factory(kind)(device="cpu")
    loaded = time.perf_counter() - t
    tiles = 0
    for s in slides:
        r = embed_slide(s, out / f"{s.stem}.zarr", encoder=encoder, batch_size=batch,
                        num_workers=readers)  # fmt: skip
        assert r.complete
        tiles += r.n_tiles
    return {"seconds": time.perf_counter() - t, "model_load_seconds": loaded, "tiles": tiles}


def run_cohort(client, kind: str, slides: list[Path], out: Path, batch: int, readers: int,
               threads: int) -> dict:  # fmt: skip
    from tilescope.cohort import ModelSpec, embed_cohort

    spec = ModelSpec(factory=factory(kind), device="cpu")
    loaded: list[float] = []
    t = time.perf_counter()
    result = embed_cohort(
        client, [(s, out / f"{s.stem}.zarr") for s in slides], model=spec,
        embed_kwargs={"batch_size": batch, "num_workers": readers}, summary=out / "summary.csv",
        on_model=lambda info: loaded.append(time.perf_counter() - t), torch_threads=threads,
    )  # fmt: skip
    seconds = time.perf_counter() - t
    assert all(r.status == "embedded" for r in result.reports), result.reports
    return {"seconds": seconds, "model_load_seconds": loaded[0] if loaded else None,
            "tiles": sum(r.tiles or 0 for r in result.reports)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", type=int, default=1792, help="slide side in px at 0.5 µm/px")
    ap.add_argument("--model", choices=["full", "tiny"], default="full")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="tile reader threads")
    ap.add_argument("--repeat", type=int, default=2, help="rounds; the best of each side")
    args = ap.parse_args()

    import importlib

    from tilescope._torch_env import available_cpus
    from tilescope.cohort import connect
    from tilescope.cohort._cluster import FORKSERVER_PRELOAD

    # the worker is forked with these imported (the cluster's start pays for them): import
    # them here too, so that neither side's time holds first imports the other's does not
    for name in FORKSERVER_PRELOAD:
        importlib.import_module(name)

    threads = available_cpus()  # torch threads on both sides (the worker gets all: it is alone)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        root = Path(tmp)
        slides = make_slides(root, args.slides, args.size)
        t = time.perf_counter()
        with connect(local=1, dashboard=False) as conn:  # one task thread: one slide at a time
            start = time.perf_counter() - t
            serial, cohort = [], []
            for k in range(args.repeat):  # serial then cohort, fresh stores each time
                for side, runs in (("serial", serial), ("cohort", cohort)):
                    out = root / f"{side}{k}"
                    out.mkdir()
                    if side == "serial":
                        runs.append(run_serial(args.model, slides, out, args.batch_size,
                                               args.workers))  # fmt: skip
                    else:
                        runs.append(run_cohort(conn.client, args.model, slides, out,
                                               args.batch_size, args.workers, threads))  # fmt: skip
                    shutil.rmtree(out)
    best_s = min(serial, key=lambda r: r["seconds"])
    best_c = min(cohort, key=lambda r: r["seconds"])
    assert best_s["tiles"] == best_c["tiles"]
    print(json.dumps({
        "benchmark": "bench_cohort",
        "overhead_ratio": round(best_c["seconds"] / best_s["seconds"], 3),
        "overhead_ratio_with_start": round((best_c["seconds"] + start) / best_s["seconds"], 3),
        "serial_seconds": round(best_s["seconds"], 2),
        "cohort_seconds": round(best_c["seconds"], 2),
        "cluster_start_seconds": round(start, 2),
        "overhead_seconds_per_slide": round((best_c["seconds"] - best_s["seconds"])
                                            / args.slides, 2),
        "model_load_seconds": {"serial": round(best_s["model_load_seconds"], 2),
                               "cohort_worker": round(best_c["model_load_seconds"] or 0, 2)},
        "all_seconds": {"serial": [round(r["seconds"], 2) for r in serial],
                        "cohort": [round(r["seconds"], 2) for r in cohort]},
        "slides": args.slides, "tiles": best_s["tiles"], "slide_px": args.size,
        "model": "biomedclip-architecture-random" if args.model == "full" else "tiny-random",
        "batch_size": args.batch_size, "reader_threads": args.workers, "torch_threads": threads,
        "cluster": "LocalCluster, 1 worker process (forked from the fork server)",
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "cpus": os.cpu_count(), "python": platform.python_version(),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
