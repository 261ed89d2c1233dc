"""The reading ceiling of the embedding pipeline; prints one JSON object.

The whole pipeline (`iter_embed_slide`: reader processes, block reads, schedule, writer thread,
zarr store) with a *null encoder* that answers at once (a constant unit vector per tile: the
store refuses zeros, which are no embedding), against a plain single-threaded loop of
`Slide.read_region_mpp` (one `read_region` + resize per tile) over the same tiles.

Slide (`_slides.py`): synthetic, JPEG-compressed, pyramidal, 0.25 µm/px, read for 224 px tiles
at 0.5 µm/px (each tile a 448 px read reduced 2x), about 2,400 tissue tiles; and, for memory,
one with 4x the area.

Headlines: ``"ratio"`` (pipeline / plain tiles per second, median of interleaved rounds; goal
>= 2.0 on 2 cores), ``"tiles_per_s_per_core"``, and the peak RSS (this process and its reader
processes together, each measured in a fresh process) for both slides: it must not grow with
the slide. ``"legacy_tiles_per_s"`` is the loop as Tilescope did it before block reads (numpy
RGBA->RGB, Lanczos for the 2x) for reference. The machine is shared: quote ``load_avg_1m``.

    python benchmarks/bench_pipeline.py [--rounds 3] [--workers N] [--skip-4x] [--also-16x]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _slides import bench_slide  # noqa: E402

TARGET_MPP, TILE_PX = 0.5, 224


class NullEncoder:
    """Embeddings at once: the first basis vector for every tile (unit norm)."""

    embed_dim = 512
    trained = False
    label = "null"

    def __init__(self) -> None:
        self._rows = np.zeros((4096, self.embed_dim), np.float32)
        self._rows[:, 0] = 1.0

    def provenance(self) -> dict[str, Any]:
        return {"model_id": "null", "weights_digest": "0" * 64, "trained": False,
                "embed_dim": self.embed_dim, "image_size": TILE_PX, "mean": [0.0] * 3,
                "std": [1.0] * 3, "resize_mode": "squash", "interpolation": "bilinear",
                "logit_scale": 1.0, "compute_dtype": "float32"}  # fmt: skip

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        return self._rows[: len(images)]


class TreeSampler:
    """Peak RSS (MiB) of this process and its children (sampled from /proc every 50 ms), and
    their CPU seconds, while a block runs."""

    def __enter__(self) -> TreeSampler:
        import psutil

        self._me = psutil.Process()
        self.peak = 0.0
        self._pids = self._tree()
        self.cpu0 = self._cpu()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _tree(self) -> list[int]:
        return [self._me.pid, *(c.pid for c in self._me.children(recursive=True))]

    def _cpu(self) -> float:
        import psutil

        total = 0.0
        for pid in self._tree():
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except Exception:
                pass
        return total

    def _loop(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        k = 0
        while not self._stop.wait(0.05):
            k += 1
            if k % 20 == 0:  # new reader processes (cheap /proc reads in between)
                self._pids = self._tree()
            rss = 0
            for pid in self._pids:
                try:
                    with open(f"/proc/{pid}/statm") as fh:
                        rss += int(fh.read().split()[1]) * page
                except OSError:
                    pass
            self.peak = max(self.peak, rss / 2**20)

    def __exit__(self, *exc: object) -> None:
        self.cpu = self._cpu() - self.cpu0
        self._stop.set()
        self._thread.join()


def layout_of(path: Path) -> Any:
    from tilescope.grid import TileGrid
    from tilescope.slide import Slide
    from tilescope.tissue import tissue_mask

    with Slide(path) as slide:
        return TileGrid(target_mpp=TARGET_MPP, tile_px=TILE_PX).layout(slide, tissue_mask(slide))


def run_plain(path: Path, coords: np.ndarray) -> dict[str, float]:
    from tilescope.slide import Slide

    with TreeSampler() as s, Slide(path) as slide:
        t0 = time.perf_counter()
        for x, y in coords:
            slide.read_region_mpp((int(x), int(y)), (TILE_PX, TILE_PX), mpp=TARGET_MPP)
        dt = time.perf_counter() - t0
    return {"seconds": dt, "tiles_per_s": len(coords) / dt, "cpu_s": s.cpu}


def run_legacy(path: Path, coords: np.ndarray) -> dict[str, float]:
    """The pre-block per-tile read: RGBA -> numpy, RGB copy, Lanczos (reducing_gap 3)."""
    import openslide
    from PIL import Image

    osr = openslide.OpenSlide(str(path))
    t0 = time.perf_counter()
    for x, y in coords:
        rgba = np.asarray(osr.read_region((int(x), int(y)), 0, (2 * TILE_PX, 2 * TILE_PX)))
        rgb = np.ascontiguousarray(rgba[..., :3])
        Image.fromarray(rgb).resize((TILE_PX, TILE_PX), Image.Resampling.LANCZOS,
                                    reducing_gap=3.0)  # fmt: skip
    dt = time.perf_counter() - t0
    osr.close()
    return {"seconds": dt, "tiles_per_s": len(coords) / dt}


def run_pipeline(path: Path, workers: int, batch_size: int,
                 store: Path | None = None) -> dict[str, float]:  # fmt: skip
    """`iter_embed_slide` into `store` (a fresh one if None); times the embedding stage (after
    tissue detection and the store are made, or the store is resumed)."""
    from tilescope.embed import iter_embed_slide
    from tilescope.grid import TileGrid

    with tempfile.TemporaryDirectory() as tmp, TreeSampler() as s:
        gen = iter_embed_slide(path, store or Path(tmp) / "s.zarr",
                               encoder=NullEncoder(),  # type: ignore[arg-type]
                               grid=TileGrid(target_mpp=TARGET_MPP, tile_px=TILE_PX),
                               batch_size=batch_size, num_workers=workers)  # fmt: skip
        t0 = t_all = time.perf_counter()
        n = n0 = 0
        try:
            while True:
                p = next(gen)
                if p.stage == "embedding" and p.indices is None and p.failed == 0 and n == 0:
                    t0, n0 = time.perf_counter(), p.done  # the store is there: reading starts
                n = p.done
        except StopIteration as stop:
            result = stop.value
        dt = time.perf_counter() - t0
        assert result.complete and result.embedded_now == n - n0, result
    return {"seconds": dt, "tiles_per_s": (n - n0) / dt, "tiles": n - n0, "cpu_s": s.cpu,
            "seconds_with_tissue_and_store": time.perf_counter() - t_all,
            "peak_rss_mib": s.peak}  # fmt: skip


def make_store(path: Path, store: Path) -> None:
    """Tissue detection and an empty store (embedding is cancelled before the first batch)."""
    from tilescope.embed import iter_embed_slide
    from tilescope.grid import TileGrid

    gen = iter_embed_slide(path, store, encoder=NullEncoder(),  # type: ignore[arg-type]
                           grid=TileGrid(target_mpp=TARGET_MPP, tile_px=TILE_PX))  # fmt: skip
    for p in gen:
        if p.stage == "embedding":
            break
    gen.close()


def child_rss(path: Path, workers: int, batch_size: int) -> dict[str, Any]:
    """Peak RSS (this process and its readers) of the whole run (tissue detection included),
    and of the embedding alone (resuming a store made by another process), each in a fresh
    process."""
    here = str(Path(__file__).parent)
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import bench_pipeline as b; "
            "from pathlib import Path; a = sys.argv; "
            "print(json.dumps(b.run_pipeline(Path(a[2]), int(a[3]), int(a[4]), "
            "Path(a[5]) if len(a) > 5 else None)))")  # fmt: skip
    make = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bench_pipeline as b; "
        "from pathlib import Path; b.make_store(Path(sys.argv[2]), Path(sys.argv[3]))"
    )

    def run(*extra: str) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-c", code, here, str(path), str(workers),
                              str(batch_size), *extra], check=True, capture_output=True,
                             text=True).stdout  # fmt: skip
        return dict(json.loads(out.strip().splitlines()[-1]))

    whole = run()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "r.zarr"
        subprocess.run([sys.executable, "-c", make, here, str(path), str(store)], check=True,
                       capture_output=True)  # fmt: skip
        embedding = run(str(store))
    return {"whole": whole, "embedding": embedding}


def main() -> None:
    from tilescope.tiles import default_workers

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/tilescope-bench"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip-4x", action="store_true", help="skip the 4x slide (memory)")
    ap.add_argument("--also-16x", action="store_true", help="peak RSS on a 16x slide too")
    args = ap.parse_args()

    path = bench_slide(args.cache_dir)
    layout = layout_of(path)
    coords = layout.coords
    with open(path, "rb") as fh:  # page cache warm for both sides
        while fh.read(1 << 24):
            pass
    legacy = run_legacy(path, coords[:300])
    rounds = []
    for _ in range(args.rounds):  # interleaved: the machine is shared
        plain = run_plain(path, coords)
        pipe = run_pipeline(path, args.workers, args.batch_size)
        rounds.append((pipe["tiles_per_s"] / plain["tiles_per_s"], plain, pipe))
    rounds.sort(key=lambda r: r[0])
    ratio, plain, pipe = rounds[len(rounds) // 2]
    cores = default_workers()
    out: dict[str, Any] = {
        "benchmark": "pipeline (null encoder) vs plain single-threaded read_region_mpp loop",
        "ratio": round(ratio, 3),
        "ratio_per_round": [round(r[0], 3) for r in rounds],
        "tiles_per_s_per_core": round(pipe["tiles_per_s"] / cores, 1),
        "pipeline_tiles_per_s": round(pipe["tiles_per_s"], 1),
        "plain_tiles_per_s": round(plain["tiles_per_s"], 1),
        "legacy_tiles_per_s": round(legacy["tiles_per_s"], 1),
        "pipeline_tiles_per_cpu_s": round(pipe["tiles"] / max(pipe["cpu_s"], 1e-9), 1),
        "plain_tiles_per_cpu_s": round(len(coords) / max(plain["cpu_s"], 1e-9), 1),
        "tiles": len(coords),
        "slide": path.name,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "cores": cores,
    }
    if not args.skip_4x:
        small = child_rss(path, args.workers, args.batch_size)
        big_path = bench_slide(args.cache_dir, scale=2)
        big = child_rss(big_path, args.workers, args.batch_size)
        out.update({
            # the embedding (readers, model, writer, store), resuming a store made elsewhere
            "peak_rss_mib": round(small["embedding"]["peak_rss_mib"], 1),
            "peak_rss_mib_4x": round(big["embedding"]["peak_rss_mib"], 1),
            # the whole run: tissue detection reads a low-resolution level, in proportion
            # to the slide's area
            "peak_rss_mib_with_tissue": round(small["whole"]["peak_rss_mib"], 1),
            "peak_rss_mib_with_tissue_4x": round(big["whole"]["peak_rss_mib"], 1),
            "tiles_4x": big["whole"]["tiles"],
            "pipeline_tiles_per_s_4x": round(big["embedding"]["tiles_per_s"], 1),
        })  # fmt: skip
        if args.also_16x:
            huge = child_rss(bench_slide(args.cache_dir, scale=4), args.workers, args.batch_size)
            out.update({"peak_rss_mib_16x": round(huge["embedding"]["peak_rss_mib"], 1),
                        "peak_rss_mib_with_tissue_16x": round(huge["whole"]["peak_rss_mib"], 1),
                        "tiles_16x": huge["whole"]["tiles"]})  # fmt: skip
    out.update({"load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
                "python": platform.python_version()})  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
