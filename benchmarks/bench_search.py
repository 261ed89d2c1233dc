"""Benchmark region search: exact search through the cohort index at 1,000,000 patches against
the old per-query float32 path, and the approximate index at 10,000,000; prints JSON.

Embeddings are clustered synthetic ones (a mixture of Gaussians on the sphere, like tissue
classes; uniformly random vectors are the worst case for an approximate index and unlike real
embeddings). A query is the re-normalised mean of 16 rows of one cluster (a drawn region),
those rows excluded from the matches, as `tilescope search` does.

- ``baseline_seconds_per_query``: the old path, `similarity` + `top_k` over a float32 matrix
  already in memory (the old ``--against FOLDER`` also read every store from disk first).
- ``seconds_per_query``: exact search through the index (memory-mapped int8 scan + float16
  rescoring within the proven bound: the exact float16 top k), page cache warm.
- ``exact_agreement``: overlap of the index's top k with float32 exact search, and the largest
  similarity difference.
- ``index_seconds_per_query`` / ``index_recall_at_10``: the approximate index (FAISS IVF-SQ8,
  reranked exactly) at ``--ann-n`` rows, recall against exact search over the same index.

The index is written straight from generated rows (the part of `tilescope index` that reads
stores is left out: 10 M rows of stores would be 20 GB of float32 more on disk).

Run: ``python benchmarks/bench_search.py [--n 1000000] [--ann-n 10000000] [--dir /tmp/x]``;
with ``--dir`` the indexes are kept, and ``--reuse`` times the queries again on the
approximate index found there (a 10 M build takes over 20 minutes on 2 cores), skipping the
exact part with ``--n 0``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tilescope.index import CohortIndex
from tilescope.index._ann import n_probe
from tilescope.index._append import Hooks, append
from tilescope.index._layout import Manifest, create_group, write_manifest
from tilescope.index._update import Found, _ann_update
from tilescope.search import similarity, top_k

STORE_ROWS = 65_536  # patches per synthetic slide (one generated block each)
MODEL = {"weights_digest": "bench", "trained": True, "embed_dim": 512}


class Clusters:
    """A mixture of Gaussians on the unit sphere: `n_clusters` centres, Zipf-like sizes, each
    with its own spread (cosine to the centre about 0.7-0.9, as tissue classes)."""

    def __init__(self, dim: int, n_clusters: int = 500, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        c = rng.standard_normal((n_clusters, dim)).astype(np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.spread = rng.uniform(0.02, 0.045, n_clusters).astype(np.float32)
        w = 1.0 / np.arange(1, n_clusters + 1) ** 0.7
        self.weights = w / w.sum()
        self.dim, self.seed = dim, seed

    def rows(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``start:start+n`` (deterministic per block start) and their cluster labels."""
        rng = np.random.default_rng((self.seed, start))
        lab = rng.choice(len(self.centres), size=n, p=self.weights)
        x = self.centres[lab] + self.spread[lab, None] * rng.standard_normal(
            (n, self.dim), dtype=np.float32
        )
        return x / np.linalg.norm(x, axis=1, keepdims=True), lab


def write_index(path: Path, clusters: Clusters, n: int, ann: str, say=print) -> float:
    """An index of `n` generated rows (slides of `STORE_ROWS`); returns seconds taken."""
    t0 = time.perf_counter()
    man = Manifest(model=MODEL, model_id="bench", embed_dim=clusters.dim)
    create_group(path, man)

    def blocks(a: int, b: int) -> Iterator[dict[str, np.ndarray]]:
        for s in range(a, b, 65536):
            m = min(65536, b - s)
            x, _ = clusters.rows(s, m)
            xy = np.stack([np.arange(m) * 224 % 100_000, np.arange(m) // 400 * 224], 1)
            yield {"embeddings": x.astype(np.float16), "row": np.arange(m, dtype=np.int64)
                   + (s - a), "coords": xy.astype(np.int64)}  # fmt: skip

    sources = []
    for i, a in enumerate(range(0, n, STORE_ROWS)):
        b = min(a + STORE_ROWS, n)
        st = SimpleNamespace(slide_name=f"slide{i:05d}", generation="g", n_tiles=b - a,
                             n_done=b - a, tile_l0=448.0, level0_mpp=0.25)  # fmt: skip
        sources.append((Found(f"slide{i:05d}.zarr", path, {}), st, blocks(a, b)))
    man.stores, _ = append(path, man, sources, Hooks())
    _ann_update(path, man, ann, 0, Hooks.of(say))
    write_manifest(path, man)
    return time.perf_counter() - t0


def queries(
    clusters: Clusters, n: int, count: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(query, region rows): the mean of 16 rows of one cluster among the first rows."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        start = int(rng.integers(0, max(n - 65536, 1)) // 65536 * 65536)
        x, lab = clusters.rows(start, min(65536, n - start))
        members = np.flatnonzero(lab == lab[int(rng.integers(0, len(lab)))])[:16]
        q = x[members].mean(0)
        out.append(((q / np.linalg.norm(q)).astype(np.float32), start + members))
    return out


def timed(fn, reps) -> tuple[list[float], list]:
    times, results = [], []
    for r in reps:
        t0 = time.perf_counter()
        results.append(fn(r))
        times.append(time.perf_counter() - t0)
    return times, results


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="rows for exact search")
    ap.add_argument("--ann-n", type=int, default=10_000_000, help="rows for the ANN (0: skip)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=9)
    ap.add_argument("--ann-queries", type=int, default=50)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="use the approximate index of --ann-n rows left in --dir by a run before",
    )
    args = ap.parse_args()
    if args.reuse and not args.dir:
        ap.error("--reuse needs --dir (the folder of the earlier run)")
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_search_"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"benchmark": "region search: cohort index vs float32 exact", "load_start": load()}
    try:
        clusters = Clusters(args.dim)
        if args.n:
            out.update(bench_exact(work, clusters, args))
            print(json.dumps(out), flush=True)
        if args.ann_n:
            out.update(bench_ann(work, clusters, args))
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    out.update({
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "load_end": load(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "numpy": np.__version__,
    })  # fmt: skip
    print(json.dumps(out, indent=2))


def bench_exact(work: Path, clusters: Clusters, args: argparse.Namespace) -> dict:
    """Exact search at ``--n`` rows: the old float32 path and the index."""
    emb = np.concatenate([clusters.rows(s, min(65536, args.n - s))[0]
                          for s in range(0, args.n, 65536)])  # fmt: skip
    qs = queries(clusters, args.n, args.queries + 1, seed=1)

    def old(qr):
        sim = similarity(emb, qr[0])
        return top_k(sim, args.k, exclude=qr[1])

    base_t, base_r = timed(old, qs)
    path = work / "exact.zarr"
    build_s = write_index(path, clusters, args.n, "off")
    ix = CohortIndex(path)

    def new(qr):
        ok = ix._live.copy()
        ok[qr[1]] = False
        return ix.search(qr[0], args.k, allowed=ok, mode="exact")

    new(qs[0])  # warm the page cache and the kernels
    idx_t, idx_r = timed(new, qs)
    overlap, gap = [], 0.0
    for b, m in zip(base_r[1:], idx_r[1:], strict=True):
        rows = {int(r) for r in b}
        got = [int(Path(x.store).stem[5:]) * STORE_ROWS + x.index for x in m]
        overlap.append(len(rows & set(got)) / args.k)
    for qr, m in zip(qs[1:], idx_r[1:], strict=True):
        sims32 = np.sort(similarity(emb, qr[0])[np.setdiff1d(np.arange(args.n), qr[1])])
        gap = max(gap, float(np.abs(np.array([x.similarity for x in m])
                                    - sims32[::-1][: args.k]).max()))  # fmt: skip
    sec, base = statistics.median(idx_t[1:]), statistics.median(base_t[1:])
    result = {
        "n_patches": args.n, "dim": args.dim, "k": args.k, "queries": args.queries,
        "seconds_per_query": round(sec, 4),
        "seconds_per_query_min": round(min(idx_t[1:]), 4),
        "baseline_seconds_per_query": round(base, 4),
        "baseline": "old path: similarity + top_k over float32 (N, D) in memory",
        "ratio": round(base / sec, 2),
        "exact_agreement": {"top_k_overlap_with_float32": round(float(np.mean(overlap)), 4),
                            "max_abs_similarity_difference": float(f"{gap:.2e}")},
        "index_build_seconds": round(build_s, 1),
        "index_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        "target_seconds": 0.1, "meets_target": sec < 0.1, "load_after_exact": load(),
    }  # fmt: skip
    shutil.rmtree(path)
    return result


def bench_ann(work: Path, clusters: Clusters, args: argparse.Namespace) -> dict:
    path = work / "ann.zarr"
    n = args.ann_n
    build_s: float | None = None
    if args.reuse:
        ix = CohortIndex(path)  # raises when there is none
        if ix.manifest.n_rows != n or ix.manifest.ann is None:
            raise SystemExit(
                f"--reuse: {path} holds {ix.manifest.n_rows:,} rows (ANN: "
                f"{ix.manifest.ann is not None}), not {n:,} with an ANN"
            )
    else:
        shutil.rmtree(path, ignore_errors=True)
        print(
            f"writing an index of {n:,} clustered rows with its approximate index ...", flush=True
        )
        build_s = write_index(path, clusters, n, "on")
        ix = CohortIndex(path)
    qs = queries(clusters, n, args.ann_queries, seed=2)
    t_exact, exact, t_ann, hits = [], [], [], 0
    for q, region in qs:
        ok = ix._live.copy()
        ok[region] = False
        t0 = time.perf_counter()
        want = {(m.store, m.index) for m in ix.search(q, 10, allowed=ok, mode="exact")}
        t_exact.append(time.perf_counter() - t0)
        exact.append(want)
    for _ in range(2):  # the second pass is timed: the lists it visits are in the page cache
        t_ann, hits = [], 0
        for (q, region), want in zip(qs, exact, strict=True):
            ok = ix._live.copy()
            ok[region] = False
            t0 = time.perf_counter()
            got = ix.search(q, 10, allowed=ok, mode="approx")
            t_ann.append(time.perf_counter() - t0)
            hits += len(want & {(m.store, m.index) for m in got})
    ann = ix.manifest.ann or {}
    return {
        "index_n_patches": n,
        "index_seconds_per_query": round(statistics.median(t_ann), 4),
        "index_recall_at_10": round(hits / (10 * len(qs)), 4),
        "index_exact_seconds_per_query": round(statistics.median(t_exact), 3),
        "index_kind": ann.get("kind"), "index_nlist": ann.get("nlist"),
        "index_nprobe": max(int(ann["nprobe"]), n_probe(int(ann["nlist"]))),  # as searched
        "index_ann_build_seconds": ann.get("seconds"),
        "index_total_build_seconds": None if build_s is None else round(build_s, 1),
        "index_reused": build_s is None,
        "index_bytes": sum(f.stat().st_size for f in path.parent.rglob("*") if f.is_file()),
        "load_after_ann": load(),
    }  # fmt: skip


if __name__ == "__main__":
    main()
