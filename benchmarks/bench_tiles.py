"""Benchmark tile streaming and tiling; prints one JSON object.

1. Tiles/s of `stream_tiles` (reader processes, block reads) against a plain single-threaded
   `Slide.read_region_mpp` loop over the same tiles of a synthetic 20x slide (at least
   30,000 x 30,000 px), and the peak RSS of this process (the readers' own memory is in
   bench_pipeline.py). Headline: ``"ratio"`` = streamer / plain. bench_pipeline.py measures
   the whole embedding pipeline the same way, on a 40x slide read with a 2x reduction.
2. Tissue detection + grid layout time on a 100,000 x 80,000 px slide
   (``"grid_seconds_100k"``).

Generated slides are cached in ``--cache-dir`` (default ``/tmp/tilescope-bench``) between runs.

Usage::

    python benchmarks/bench_tiles.py [--slide PATH] [--max-tiles N] [--workers 2] [--skip-100k]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from tilescope.grid import TileGrid
from tilescope.slide import Slide
from tilescope.synthetic import TILE, Blob, SyntheticSlide
from tilescope.tiles import stream_tiles
from tilescope.tissue import tissue_mask

TARGET_MPP = 0.5
TILE_PX = 224


# -- slides -------------------------------------------------------------------------------------
def synthetic_20x(cache: Path, size: int) -> Path:
    """A 20x (0.5 µm/px) synthetic slide of `size` x `size` px, written once and cached."""
    path = cache / f"synthetic_{size}px_mpp0.5_v1.tif"
    if not path.exists():
        spec = SyntheticSlide.with_random_blobs(size, size, mpp=0.5, n=8, seed=3, n_levels=4)
        tmp = path.with_suffix(".partial")
        spec.write(tmp)
        tmp.rename(path)
    return path


def big_blank_slide(cache: Path, width: int = 100_000, height: int = 80_000) -> Path:
    """A cheap 40x (0.25 µm/px) slide of `width` x `height` px with levels 1, 32 and 1024.

    Level 0 is made of two pre-compressed tiles (glass, or flat pink where the tile centre is
    in tissue), so writing it costs seconds; the coarse levels are rendered properly from the
    same blobs, so tissue detection sees real-looking content.
    """
    path = cache / f"blank_{width}x{height}_mpp0.25_v1.tif"
    if path.exists():
        return path
    import imagecodecs
    import tifffile

    spec = SyntheticSlide(
        width,
        height,
        mpp=0.25,
        blobs=(Blob(8000, 7000, 5000, 4000), Blob(17000, 12000, 4000, 5500)),
        n_levels=3,
        level_factor=32,
    )
    glass = np.full((TILE, TILE, 3), spec.background, np.uint8)
    pink = np.empty_like(glass)
    pink[:] = (200, 120, 170)
    encoded = {k: imagecodecs.zlib_encode(v) for k, v in (("glass", glass), ("pink", pink))}

    def level0() -> Any:
        for ty in range(0, height, TILE):
            cy = (ty + TILE / 2) * spec.mpp
            xs = (np.arange(0, width, TILE) + TILE / 2) * spec.mpp
            inside = spec.tissue_truth(xs, np.full_like(xs, cy))
            for t in inside:
                yield encoded["pink" if t else "glass"]

    tmp = path.with_suffix(".partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        common = dict(photometric="rgb", tile=(TILE, TILE), metadata=None)
        res = 1e4 / spec.mpp
        tw.write(
            level0(),
            shape=(height, width, 3),
            dtype=np.uint8,
            compression="zlib",
            resolution=(res, res),
            resolutionunit="CENTIMETER",
            subfiletype=0,
            **common,
        )
        for level in (1, 2):
            h, w = spec.level_shapes()[level]
            tw.write(
                spec._tiles(level),
                shape=(h, w, 3),
                dtype=np.uint8,
                compression="jpeg",
                subfiletype=1,
                **common,
            )
    tmp.rename(path)
    return path


# -- measuring ----------------------------------------------------------------------------------
class PeakRss:
    """Peak resident memory (MiB) of this process while the block runs (sampled)."""

    def __enter__(self) -> PeakRss:
        self.peak = self.start = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def _measure(run: Any) -> dict[str, float]:
    """Wall time, process CPU time and peak RSS of ``run()``, which returns a tile count."""
    with PeakRss() as mem:
        cpu0, t0 = time.process_time(), time.perf_counter()
        n = run()
        dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"tiles": n, "seconds": dt, "tiles_per_s": n / dt, "cores_used": cpu / dt,
            "peak_rss_mib": mem.peak, "rss_growth_mib": mem.peak - mem.start}  # fmt: skip


def bench_plain(path: Path, coords: np.ndarray) -> dict[str, float]:
    """The baseline: one thread, one `read_region_mpp` call per tile, in grid order."""

    def run() -> int:
        with Slide(path) as slide:
            for x, y in coords:
                slide.read_region_mpp((int(x), int(y)), (TILE_PX, TILE_PX), mpp=TARGET_MPP)
        return len(coords)

    return _measure(run)


def bench_stream(path: Path, layout: Any, idx: np.ndarray, args: Any) -> dict[str, float]:
    def run() -> int:
        n = 0
        for batch in stream_tiles(
            path,
            layout,
            target_mpp=TARGET_MPP,
            tile_px=TILE_PX,
            batch_size=args.batch_size,
            num_workers=args.workers,
            prefetch_batches=args.prefetch,
            indices=idx,
        ):
            n += len(batch)
        return n

    result = _measure(run)
    assert result["tiles"] == len(idx), (result["tiles"], len(idx))
    return result


def bench_open(path: Path) -> dict[str, Any]:
    """Opening the 100k slide as napari's reader does: metadata and lazy levels, no pixels."""
    from tilescope._napari._reader import read_slides

    rss0 = _rss_mib()
    t0 = time.perf_counter()
    data, _, _ = read_slides(str(path))[0]
    t1 = time.perf_counter()
    return {
        "open_seconds_100k": round(t1 - t0, 4),
        "open_rss_growth_mib_100k": round(_rss_mib() - rss0, 1),
        "open_levels_100k": [list(level.shape[:2]) for level in data],
    }


def bench_grid(path: Path) -> dict[str, Any]:
    with Slide(path) as slide:
        t0 = time.perf_counter()
        mask = tissue_mask(slide)
        t1 = time.perf_counter()
        layout = TileGrid(target_mpp=TARGET_MPP, tile_px=TILE_PX).layout(slide, mask)
        t2 = time.perf_counter()
        return {
            "grid_seconds_100k": t2 - t0,
            "grid_tissue_seconds_100k": t1 - t0,
            "grid_layout_seconds_100k": t2 - t1,
            "grid_slide_100k": f"{slide.dimensions[0]}x{slide.dimensions[1]} px at "
            f"{slide.mpp} µm/px, level downsamples {list(slide.level_downsamples)}",
            "grid_mask_shape_100k": list(mask.shape),
            "grid_cells_100k": layout.grid_shape[0] * layout.grid_shape[1],
            "grid_tiles_kept_100k": len(layout),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slide", type=Path, help="a 20x slide to stream (default: synthetic)")
    ap.add_argument("--size", type=int, default=30_720, help="synthetic slide side in px")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/tilescope-bench"))
    ap.add_argument("--max-tiles", type=int, default=0, help="0 (default): every tile")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved plain/stream rounds")
    ap.add_argument("--skip-100k", action="store_true", help="skip the 100k x 80k grid timing")
    args = ap.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)

    path = args.slide or synthetic_20x(args.cache_dir, args.size)
    with Slide(path) as slide:
        mask = tissue_mask(slide)
        layout = TileGrid(target_mpp=TARGET_MPP, tile_px=TILE_PX).layout(slide, mask)
        dims = slide.dimensions
    idx = np.arange(min(len(layout), args.max_tiles or len(layout)))
    warm_page_cache(Path(path))
    # Interleaved rounds: the machine is shared, so pair each plain run with a streamed run
    # made right after it, and report the median of the per-round ratios.
    rounds = []
    for _ in range(args.rounds):
        plain = bench_plain(Path(path), layout.coords[idx])
        stream = bench_stream(Path(path), layout, idx, args)
        rounds.append((stream["tiles_per_s"] / plain["tiles_per_s"], plain, stream))
    rounds.sort(key=lambda r: r[0])
    ratio, plain, stream = rounds[len(rounds) // 2]

    out: dict[str, Any] = {
        "ratio": round(ratio, 3),
        "ratio_per_round": [round(r[0], 3) for r in rounds],
        "stream_tiles_per_s": round(stream["tiles_per_s"], 1),
        "plain_tiles_per_s": round(plain["tiles_per_s"], 1),
        "stream_cores_used": round(stream["cores_used"], 2),
        "plain_cores_used": round(plain["cores_used"], 2),
        "stream_peak_rss_mib": round(max(r[2]["peak_rss_mib"] for r in rounds), 1),
        "stream_rss_growth_mib": round(max(r[2]["rss_growth_mib"] for r in rounds), 1),
        "plain_peak_rss_mib": round(max(r[1]["peak_rss_mib"] for r in rounds), 1),
        "plain_rss_growth_mib": round(max(r[1]["rss_growth_mib"] for r in rounds), 1),
        "tiles": len(idx),
        "tiles_in_layout": len(layout),
        "slide": str(path),
        "slide_px": list(dims),
        "target_mpp": TARGET_MPP,
        "tile_px": TILE_PX,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "prefetch_batches": args.prefetch,
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    if not args.skip_100k:
        big = big_blank_slide(args.cache_dir)
        out.update(bench_open(big))
        out.update(bench_grid(big))
        out["grid_seconds_100k"] = round(out["grid_seconds_100k"], 3)
        out["grid_tissue_seconds_100k"] = round(out["grid_tissue_seconds_100k"], 3)
        out["grid_layout_seconds_100k"] = round(out["grid_layout_seconds_100k"], 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
