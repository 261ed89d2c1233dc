"""End-to-end embedding against the bare forward of the same encoder on the same batches.

    python benchmarks/bench_embed.py [--tiles 1000] [--batch-size 16] [--skip-full]
                                     [--backend auto|torch|openvino]

On the benchmark slide of bench_pipeline.py (synthetic, JPEG, pyramidal, 0.25 µm/px, tiles of
224 px at 0.5 µm/px), for the full-size BiomedCLIP architecture with random weights (and the
tiny model, for reference):

- ``end_to_end``: `iter_embed_slide` from the call to its return (tissue detection, the store,
  reader processes, the model, the writer thread) over the first `--tiles` tiles;
- ``bare``: `Encoder.encode_images` on exactly the batches the pipeline fed the model (recorded
  during the run), one after another, nothing else.

Prints one JSON object; the headline ``"ratio"`` is end-to-end / bare tiles per second for the
full-size architecture (goal >= 0.95: reading and writing hidden behind the model). Bare runs
before and after the end-to-end run are averaged, so drifting machine load favours neither.
Random weights time the same as trained ones. The machine is shared: quote ``load_avg_1m``.
`--backend` (default ``auto``, what `tilescope embed` picks: OpenVINO bf16 on a CPU with native
bf16, else torch) runs both models on that backend; the faster the model, the more of the
reading shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _slides import bench_slide  # noqa: E402
from bench_pipeline import TreeSampler  # noqa: E402

from tilescope.embed import iter_embed_slide  # noqa: E402
from tilescope.grid import TileGrid  # noqa: E402
from tilescope.models import build_biomedclip_architecture, load_encoder  # noqa: E402


class Recording:
    """The encoder, keeping a copy of every batch it is fed."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self.batches: list[np.ndarray] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def submit_images(self, images: np.ndarray) -> Any:
        self.batches.append(np.array(images))
        return self._encoder.submit_images(images)


def bare(encoder: Any, batches: list[np.ndarray]) -> float:
    t = time.perf_counter()
    for b in batches:
        encoder.encode_images(b)
    return sum(len(b) for b in batches) / (time.perf_counter() - t)


def end_to_end(encoder: Any, slide: Path, n: int, batch_size: int,
               workers: int | None) -> dict[str, Any]:  # fmt: skip
    rec = Recording(encoder)
    with tempfile.TemporaryDirectory() as tmp, TreeSampler() as mem:
        t0 = time.perf_counter()
        gen = iter_embed_slide(slide, Path(tmp) / "e.zarr", encoder=rec,  # type: ignore[arg-type]
                               grid=TileGrid(target_mpp=0.5, tile_px=224),
                               batch_size=batch_size, num_workers=workers,
                               order=np.arange(n))  # fmt: skip
        t_embed = t0
        try:
            while True:
                p = next(gen)
                if p.stage == "embedding" and p.indices is None and p.done == 0:
                    t_embed = time.perf_counter()
        except StopIteration as stop:
            result = stop.value
        t1 = time.perf_counter()
    assert result.embedded_now == n, result
    return {"tiles": n, "seconds": t1 - t0, "rate": n / (t1 - t0),
            "rate_embedding_stage": n / (t1 - t_embed), "peak_rss_mib": mem.peak,
            "batches": rec.batches}  # fmt: skip


def measure(name: str, encoder: Any, slide: Path, n: int, batch_size: int,
            workers: int | None) -> dict[str, Any]:  # fmt: skip
    warm = np.zeros((batch_size, 224, 224, 3), np.uint8)
    encoder.encode_images(warm)
    before = bare(encoder, [warm] * max(2, 64 // batch_size))
    e2e = end_to_end(encoder, slide, n, batch_size, workers)
    after = bare(encoder, e2e.pop("batches"))
    rate_bare = (before + after) / 2
    return {
        "model": name,
        "tiles": n,
        "bare_patches_per_s": round(rate_bare, 2),
        "bare_before_after": [round(before, 2), round(after, 2)],
        "end_to_end_patches_per_s": round(e2e["rate"], 2),
        "ratio": round(e2e["rate"] / rate_bare, 3),
        "ratio_embedding_stage": round(e2e["rate_embedding_stage"] / rate_bare, 3),
        "end_to_end_seconds": round(e2e["seconds"], 1),
        "peak_rss_mib": round(e2e["peak_rss_mib"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/tilescope-bench"))
    ap.add_argument("--tiles", type=int, default=1000)
    ap.add_argument("--tiny-tiles", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=None, help="reader processes (auto)")
    ap.add_argument("--skip-full", action="store_true", help="tiny model only (quick)")
    ap.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino"))
    args = ap.parse_args()

    slide = bench_slide(args.cache_dir)
    tiny = load_encoder("tiny-random", device="cpu", backend=args.backend)
    runs = {"tiny": measure("tiny-random", tiny, slide, args.tiny_tiles, args.batch_size,
                            args.workers)}  # fmt: skip
    if not args.skip_full:
        full = build_biomedclip_architecture(random_weights=True, device="cpu",
                                             backend=args.backend)  # fmt: skip
        runs["full"] = measure("BiomedCLIP architecture, random weights", full, slide,
                               args.tiles, args.batch_size, args.workers)  # fmt: skip
    import torch

    headline = runs.get("full", runs["tiny"])
    print(json.dumps({
        "benchmark": "iter_embed_slide end-to-end vs bare forward on the same batches",
        "ratio": headline["ratio"],
        "ratio_model": headline["model"],
        "backend": f"{full.backend} {full.compute_precision}" if not args.skip_full else None,
        "runs": runs,
        "batch_size": args.batch_size,
        "workers": args.workers if args.workers is not None else "auto (1 on the CPU)",
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "slide": slide.name,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
