"""The image tower on the CPU with glibc's allocator as it comes, and as Tilescope sets it.

    python benchmarks/bench_allocator.py [--model full|tiny] [--batches 6] [--rounds 2]

`tilescope._torch_env.reuse_large_allocations` (called when an encoder is built for the
CPU) raises glibc's mmap and trim thresholds, so that a forward pass's activations (tens of
MB each) are reused from the heap instead of being mapped, faulted in page by page and
unmapped again every batch. The setting is process-wide, so each side runs in a fresh
interpreter of its own:

- ``glibc``: the encoder built with the setting kept off (glibc's defaults);
- ``dask_worker``: the same, under the ``MALLOC_TRIM_THRESHOLD_=65536`` a Dask nanny gives
  its workers (which also turns glibc's adaptive threshold off);
- ``tuned``: the encoder as Tilescope builds it.

Each times `--batches` batches of 16 tiles after one warm-up batch, and counts minor page
faults and system CPU time. Rounds alternate the sides (the best of each is kept), so a drift
in machine load favours none. The headline ``"speedup"`` is glibc seconds / tuned seconds per
batch (same model, same input, same run). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
from tilescope import _torch_env
if sys.argv[1] != "tuned":
    _torch_env._tuned = False  # as if already decided: the encoder leaves glibc alone
from tilescope.models import build_biomedclip_architecture, load_encoder
enc = (build_biomedclip_architecture(device="cpu") if sys.argv[2] == "full"
       else load_encoder("tiny-random", device="cpu"))
x = np.random.default_rng(0).integers(0, 255, (16, 224, 224, 3), dtype=np.uint8)
enc.encode_images(x)
r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(int(sys.argv[3])):
    enc.encode_images(x)
sec, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
n = int(sys.argv[3])
print(json.dumps({"seconds_per_batch": sec / n,
                  "minor_faults_per_batch": (r1.ru_minflt - r0.ru_minflt) / n,
                  "system_seconds_per_batch": (r1.ru_stime - r0.ru_stime) / n,
                  "user_seconds_per_batch": (r1.ru_utime - r0.ru_utime) / n,
                  "peak_rss_mib": r1.ru_maxrss / 1024, "tuned": bool(_torch_env._tuned)}))
"""


def run(side: str, model: str, batches: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if side == "dask_worker":
        env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    proc = subprocess.run([sys.executable, "-c", CHILD, side, model, str(batches)],
                          capture_output=True, text=True, env=env, check=False)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"{side}: the child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["full", "tiny"], default="full")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    sides = ("glibc", "dask_worker", "tuned")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for side in sides:
            results[side].append(run(side, args.model, args.batches))
    best = {s: min(r, key=lambda d: d["seconds_per_batch"]) for s, r in results.items()}
    per_batch = {s: best[s]["seconds_per_batch"] for s in sides}
    assert best["tuned"]["tuned"] and not best["glibc"]["tuned"], best

    def rounded(d: dict) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}

    print(json.dumps({
        "benchmark": "bench_allocator",
        "speedup": round(per_batch["glibc"] / per_batch["tuned"], 3),
        "speedup_on_a_dask_worker": round(per_batch["dask_worker"] / per_batch["tuned"], 3),
        "tiles_per_second": {s: round(16 / per_batch[s], 2) for s in sides},
        "best": {s: rounded(best[s]) for s in sides},
        "all_seconds_per_batch": {s: [round(r["seconds_per_batch"], 3) for r in results[s]]
                                  for s in sides},
        "model": "biomedclip-architecture-random" if args.model == "full" else "tiny-random",
        "batch_size": 16, "batches": args.batches, "rounds": args.rounds,
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "cpus": os.cpu_count(),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
