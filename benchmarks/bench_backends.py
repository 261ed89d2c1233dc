"""CPU image-tower backends against eager torch fp32, on real H&E tiles; prints one JSON object.

Model: BiomedCLIP's full-size architecture (ViT-B/16, 512-d) with random weights
(`build_biomedclip_architecture`). Tiles: the 32 CRC-VAL-HE-7K patches and 32 tissue tiles of
CMU-1-Small-Region at 0.5 µm/px (../shared/data; TILESCOPE_SHARED_DATA to move it).

Every candidate embeds the same batches; rounds are interleaved (torch, candidates, then the
reverse order) and each figure is the median over rounds, so a load change on a shared machine
hits all candidates alike. ``"speedup"`` = best CPU backend / eager torch fp32 (tiles per second,
medians of the per-round ratios); goal >= 2.0 with ``"min_cosine"`` >= 0.999 against torch fp32.

Candidates: OpenVINO at the precision Tilescope picks on this CPU (bf16 where OpenVINO reports
BF16, else fp32), with the THROUGHPUT (Tilescope's default) and LATENCY hints; ``--int8`` adds
an NNCF post-training int8 model calibrated on 31 other CMU tiles (needs ``pip install nncf``;
never a default: it is reported apart from ``"speedup"``). Also printed: the CPU's OpenVINO
capabilities, the precision used, the conversion time (cold cache) and the start-up time from
the cache, the load average before and after. On a machine with CUDA, ``"cuda"`` gives the
encoder's own rate there (bf16, channels_last, asynchronous copies, two batches in flight).

    python benchmarks/bench_backends.py [--rounds 5] [--batch 16] [--int8]
                                        [--cuda-batch 256] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SHARED = Path(
    os.environ.get("TILESCOPE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def crc_patches() -> np.ndarray:
    from PIL import Image

    files = sorted((SHARED / "patches" / "crc_val_he_7k").glob("*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def cmu_tiles(n: int, skip: int = 0) -> np.ndarray:
    """`n` tissue tiles (224 px at 0.5 µm/px) of CMU-1-Small-Region, after the first `skip`."""
    from tilescope.grid import TileGrid
    from tilescope.slide import Slide
    from tilescope.tissue import tissue_mask

    with Slide(SHARED / "slides" / "CMU-1-Small-Region.svs") as slide:
        layout = TileGrid().layout(slide, tissue_mask(slide))
        order = np.argsort(-layout.tissue, kind="stable")[skip : skip + n]
        return np.stack(
            [slide.read_region_mpp(tuple(layout.coords[i]), (224, 224), mpp=0.5) for i in order]
        )


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1)))


def int8_backend(encoder: Any, calibration: np.ndarray) -> Any:
    """An OpenVINO int8 model (NNCF post-training quantization) behind the backend's submit."""
    from tilescope import _openvino

    ov = _openvino.require_openvino()
    xml, _ = _openvino.converted_graph(encoder)
    core = ov.Core()
    model = core.read_model(str(xml))
    t0 = time.perf_counter()
    with _openvino._no_telemetry():  # NNCF's telemetry too
        import nncf

        data = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
        quantized = nncf.quantize(
            model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration)
        )
    seconds = time.perf_counter() - t0
    compiled = core.compile_model(quantized, "CPU", _openvino.compile_config("fp32"))
    return compiled, seconds


def cuda_throughput(batch: int, batches: int, compile: bool) -> dict[str, Any]:
    """Tiles/s of the CUDA path on pinned uint8 batches, two batches in flight (no GPU: skipped).

    This is the encoder alone (what the readers must feed); bench_pipeline / bench_embed measure
    the readers and the whole pipeline.
    """
    import torch

    from tilescope.models import build_biomedclip_architecture

    enc = build_biomedclip_architecture(device="cuda", backend="torch", compile=compile)
    rng = np.random.default_rng(0)
    host = [
        torch.from_numpy(rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)).pin_memory()
        for _ in range(4)
    ]
    for b in host[:2]:  # warm-up: cudnn autotune, compilation
        enc.submit_images(b).result()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pending = [enc.submit_images(host[0])]
    for k in range(1, batches):
        pending.append(enc.submit_images(host[k % len(host)]))
        pending.pop(0).result()
    pending.pop(0).result()
    seconds = time.perf_counter() - t0
    return {
        "device": torch.cuda.get_device_name(),
        "batch": batch,
        "compile": compile,
        "precision": enc.compute_precision,
        "tiles_per_s": round(batch * batches / seconds, 1),
        "goal_tiles_per_s": 5000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--int8", action="store_true", help="also NNCF int8 (opt-in; needs nncf)")
    parser.add_argument("--cuda-batch", type=int, default=256, help="batch of the CUDA figure")
    parser.add_argument("--compile", action="store_true", help="CUDA figure with torch.compile")
    args = parser.parse_args()

    import torch

    from tilescope import _openvino
    from tilescope._openvino import OpenVINOImages
    from tilescope.models import build_biomedclip_architecture

    load_start = load_avg()
    tiles = np.concatenate([crc_patches(), cmu_tiles(32)])
    batches = [tiles[i : i + args.batch] for i in range(0, len(tiles), args.batch)]
    capabilities = _openvino.cpu_capabilities()
    precision = _openvino.choose_precision(capabilities)

    enc = build_biomedclip_architecture(device="cpu", backend="torch")
    candidates: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ[_openvino.CACHE_ENV] = cache  # a cold cache: measure the conversion
        t0 = time.perf_counter()
        first = OpenVINOImages(enc, hint="LATENCY")
        first_start = time.perf_counter() - t0
        first_convert = float(first.convert_seconds or 0.0)
        del first
        t0 = time.perf_counter()
        latency = OpenVINOImages(enc, hint="LATENCY")  # from the cache: read + compile
        cached_start = time.perf_counter() - t0
        candidates[f"openvino_{precision}_latency"] = latency
        candidates[f"openvino_{precision}_throughput"] = OpenVINOImages(enc, hint="THROUGHPUT")
        int8_seconds = None
        if args.int8:
            compiled, int8_seconds = int8_backend(enc, cmu_tiles(64, skip=32))
            candidates["openvino_int8_nncf"] = compiled

    def run(name: str) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        if name == "torch_fp32":
            out = [enc.encode_images(b) for b in batches]
        elif name == "openvino_int8_nncf":
            out = [candidates[name]({0: b})[0] for b in batches]
        else:
            pending = [candidates[name].submit(torch.from_numpy(b)) for b in batches[:1]]
            out = []
            for b in batches[1:]:  # submit batch k+1 before taking batch k's result
                pending.append(candidates[name].submit(torch.from_numpy(b)))
                out.append(pending.pop(0).result())
            out.append(pending.pop(0).result())
        return time.perf_counter() - t0, np.concatenate(out)

    names = ["torch_fp32", *candidates]
    for name in names:  # warm-up (first-call allocations, oneDNN kernels)
        run(name)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            dt, outputs[name] = run(name)
            seconds[name].append(dt)
    ref = outputs["torch_fp32"]
    results = {}
    for name in candidates:
        ratios = [t / c for t, c in zip(seconds["torch_fp32"], seconds[name], strict=True)]
        results[name] = {
            "speedup": round(statistics.median(ratios), 3),
            "tiles_per_s": round(len(tiles) / statistics.median(seconds[name]), 2),
            "min_cosine": round(min_cosine(outputs[name], ref), 6),
        }
    best = max(results, key=lambda n: results[n]["speedup"])
    exact = {n: r for n, r in results.items() if "int8" not in n}  # the lossless candidates
    best_exact = max(exact, key=lambda n: exact[n]["speedup"])
    report = {
        "benchmark": "bench_backends",
        "model": "BiomedCLIP architecture ViT-B/16 (random weights)",
        "tiles": {"crc_val_he_7k": 32, "cmu_small_region": 32, "batch": args.batch},
        "speedup": results[best_exact]["speedup"],
        "min_cosine": results[best_exact]["min_cosine"],
        "best_backend": best_exact,
        "goal": {"speedup": 2.0, "min_cosine": 0.999},
        "torch_fp32_tiles_per_s": round(len(tiles) / statistics.median(seconds["torch_fp32"]), 2),
        "candidates": results,
        "best_including_opt_in": best,
        "precision_used": precision,
        "cpu_capabilities": capabilities,
        "cpu": platform.processor() or platform.machine(),
        "cores_available": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "openvino_version": _openvino.require_openvino().__version__,
        "convert_seconds": round(first_convert, 2),
        "first_start_seconds": round(first_start, 2),
        "cached_start_seconds": round(cached_start, 2),
        "int8_quantize_seconds": None if int8_seconds is None else round(int8_seconds, 1),
        "rounds": args.rounds,
        "cuda": cuda_throughput(args.cuda_batch, 40, args.compile)
        if torch.cuda.is_available()
        else "no CUDA device: the GPU path was not measured",
        "load_avg_start": load_start,
        "load_avg_end": load_avg(),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
