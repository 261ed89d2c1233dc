"""End-to-end embedding throughput against the bare model forward, in the same run.

    python benchmarks/bench_embed.py [--size 3584] [--batch-size 16] [--skip-full]

For each model (the full-size BiomedCLIP architecture with random weights, and the tiny
model), times

- ``bare``: ``Encoder.encode_images`` on random uint8 batches of the same size and count as
  the slide's tissue tiles (model forward plus on-device normalisation, nothing else);
- ``end_to_end``: `tilescope.embed_slide` on a synthetic slide: tissue mask, grid, parallel
  tile reading, the same forward, and zarr writes, from the call to its return.

Prints one JSON object; the headline ``"ratio"`` is end-to-end / bare patches per second for
the full-size architecture (target >= 0.9: reading and writing hidden behind compute).
Random weights time the same as trained ones; no result here is an embedding anyone should use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tilescope.embed import embed_slide
from tilescope.models import build_biomedclip_architecture, load_encoder
from tilescope.store import EmbeddingStore
from tilescope.synthetic import SyntheticSlide


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bare_rate(encoder, n: int, batch_size: int) -> float:
    rng = np.random.default_rng(0)
    batches = [
        rng.integers(0, 256, (min(batch_size, n - i), 224, 224, 3), dtype=np.uint8)
        for i in range(0, n, batch_size)
    ]
    t = time.perf_counter()
    for b in batches:
        encoder.encode_images(b)
    return n / (time.perf_counter() - t)


def e2e_rate(encoder, slide: Path, batch_size: int, workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        result = embed_slide(
            slide, Path(tmp) / "bench.zarr", encoder=encoder, batch_size=batch_size,
            num_workers=workers,
        )  # fmt: skip
        seconds = time.perf_counter() - t
        assert result.complete and EmbeddingStore.open(result.store_path).done.all()
    return result.n_tiles / seconds, result.n_tiles


def measure(name: str, encoder, slide: Path, batch_size: int, workers: int) -> dict:
    encoder.encode_images(np.zeros((batch_size, 224, 224, 3), np.uint8))  # warm-up
    # bare, end-to-end, bare: the bare rate is the mean of the runs either side, so a drift in
    # machine load during the run does not favour either
    bare_before = bare_rate(encoder, 64, batch_size)
    e2e, n = e2e_rate(encoder, slide, batch_size, workers)
    bare_after = bare_rate(encoder, n, batch_size)
    bare = (bare_before + bare_after) / 2
    return {
        "model": name,
        "tiles": n,
        "bare_patches_per_s": round(bare, 2),
        "end_to_end_patches_per_s": round(e2e, 2),
        "bare_patches_per_s_before_after": [round(bare_before, 2), round(bare_after, 2)],
        "ratio": round(e2e / bare, 3),
        "peak_rss_mib_so_far": round(peak_rss_mib(), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4480, help="synthetic slide side in px")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-full", action="store_true", help="tiny model only (quick)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        spec = SyntheticSlide.with_random_blobs(args.size, args.size, mpp=0.5, n=8, seed=5)
        slide = spec.write(Path(tmp) / "bench.tif")
        runs = {"tiny": measure("tiny-random", load_encoder("tiny-random", device="cpu"),
                                slide, args.batch_size, args.workers)}  # fmt: skip
        if not args.skip_full:
            full = build_biomedclip_architecture(random_weights=True, device="cpu")
            runs["full"] = measure("BiomedCLIP architecture, random weights", full, slide,
                                   args.batch_size, args.workers)  # fmt: skip
    import torch

    headline = runs.get("full", runs["tiny"])
    print(json.dumps({
        "benchmark": "embed_slide end-to-end vs bare model forward",
        "ratio": headline["ratio"],
        "ratio_model": headline["model"],
        "runs": runs,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "argv": sys.argv[1:],
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
