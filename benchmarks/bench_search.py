"""Benchmark region search over 1,000,000 random 512-d unit embeddings; prints JSON.

``seconds_per_query`` is the median wall time of `similarity` + `top_k` (k=100) over several
queries. ``ratio`` is how many times faster that is than a naive baseline run in the same
process: a Python loop of float64 per-row dot products, timed on a subset and extrapolated.

Run: ``python benchmarks/bench_search.py [--n 1000000] [--dim 512] [--queries 9]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from tilescope.search import build_query, similarity, top_k


def make_embeddings(n: int, dim: int, seed: int = 0, block: int = 100_000) -> np.ndarray:
    """Random L2-normalised float32 rows, generated block by block to bound peak memory."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        x = rng.standard_normal((min(block, n - start), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + len(x)] = x
    return out


def naive_seconds(emb: np.ndarray, query: np.ndarray, subset: int) -> float:
    """Seconds for a float64 per-row loop over all rows, extrapolated from `subset` rows."""
    q = query.astype(np.float64)
    rows = emb[:subset].astype(np.float64)
    t0 = time.perf_counter()
    sims = [float(np.dot(row, q)) for row in rows]
    order = sorted(range(len(sims)), key=lambda i: -sims[i])[:100]
    elapsed = time.perf_counter() - t0
    assert order  # keep the work
    return elapsed * len(emb) / subset


def float64_matmul_seconds(emb: np.ndarray, query: np.ndarray, subset: int) -> float:
    """Seconds for a float64 matrix product over all rows, extrapolated from `subset` rows."""
    rows, q = emb[:subset].astype(np.float64), query.astype(np.float64)
    t0 = time.perf_counter()
    np.argsort(-(rows @ q))[:100]
    return (time.perf_counter() - t0) * len(emb) / subset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=9)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--subset", type=int, default=20_000, help="rows timed for the baseline")
    args = ap.parse_args()

    emb = make_embeddings(args.n, args.dim)
    rng = np.random.default_rng(1)
    times = []
    for _ in range(args.queries + 1):
        region = rng.choice(args.n, size=16, replace=False)
        query = build_query(emb, region, negative_idx=rng.choice(args.n, 4), neg_weight=0.5)
        t0 = time.perf_counter()
        best = top_k(similarity(emb, query), args.k)
        times.append(time.perf_counter() - t0)
        assert len(best) == args.k
    seconds = statistics.median(times[1:])  # the first run warms caches and BLAS threads
    naive = naive_seconds(emb, query, min(args.subset, args.n))
    f64 = float64_matmul_seconds(emb, query, min(100_000, args.n))
    print(
        json.dumps(
            {
                "benchmark": "region search: exact cosine + top-k",
                "n_patches": args.n,
                "dim": args.dim,
                "k": args.k,
                "queries": args.queries,
                "seconds_per_query": round(seconds, 4),
                "seconds_per_query_min": round(min(times[1:]), 4),
                "naive_seconds_per_query": round(naive, 3),
                "naive_baseline": "python loop of float64 row dot products + sort, "
                f"timed on {min(args.subset, args.n)} rows and extrapolated",
                "ratio": round(naive / seconds, 1),
                "float64_matmul_argsort_seconds_per_query": round(f64, 3),
                "ratio_vs_float64_matmul_argsort": round(f64 / seconds, 1),
                "target_seconds": 0.1,
                "meets_target": seconds < 0.1,
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
                "numpy": np.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
