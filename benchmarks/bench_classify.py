"""Benchmark the few-shot classifier: regions -> training tiles -> fit + region-wise CV ->
predict every tile of a 100,000-tile slide (512-d); prints JSON.

``seconds_train_predict`` (goal: under 1 s, what the napari widget needs to retrain as regions
are drawn) is the median wall time of `training_set` + `train` (with cross-validation) +
`predict`. ``ratio`` divides it by a bare baseline run in the same process: one scikit-learn
``LogisticRegression(class_weight="balanced")`` fit on the same training tiles plus
``predict_proba`` on all tiles (no region selection, no standardisation, no CV), so it shows
what the region logic and the cross-validation cost on top of the model itself.

Run: ``python benchmarks/bench_classify.py [--tiles 100000] [--dim 512] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry import box

from tilescope.classify import predict, train, training_set

TILE = 448.0


@dataclass
class MemoryStore:
    """The parts of an `EmbeddingStore` the classifier reads, held in memory (as the napari
    widgets keep an opened store's embeddings)."""

    embeddings: np.ndarray
    grid_rc: np.ndarray
    signature: dict[str, Any] = field(default_factory=dict)
    path: Path = Path("bench.zarr")
    slide_name: str = "bench.svs"
    level0_mpp: float = 0.25
    tile_l0: float = TILE

    def __post_init__(self) -> None:
        self.n_tiles = len(self.embeddings)
        self.done = np.ones(self.n_tiles, bool)
        self.coords = self.grid_rc[:, ::-1].astype(np.int64) * int(TILE)


def make_store(n: int, dim: int, classes: int = 3, seed: int = 0) -> MemoryStore:
    side = int(np.ceil(np.sqrt(n)))
    r, c = np.divmod(np.arange(n), side)
    rc = np.stack([r, c], axis=1).astype(np.int32)
    rng = np.random.default_rng(seed)
    truth = c * classes // side
    emb = rng.standard_normal((classes, dim))[truth] + 3 * rng.standard_normal((n, dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    sig = {
        "model": {"model_id": "bench", "weights_digest": "x", "embed_dim": dim, "trained": False},
        "grid": {"target_mpp": 0.5, "tile_px": 224, "overlap_px": 0},
        "layout": {"stride_l0": TILE, "tile_l0": TILE},
    }
    return MemoryStore(emb, rc, sig)


def regions(side: int, classes: int, per_class: int, size: int) -> dict[str, list[Any]]:
    """`per_class` square regions of `size` x `size` tiles inside each class's band."""
    out: dict[str, list[Any]] = {}
    band = side // classes
    for k in range(classes):
        out[f"class{k}"] = []
        for j in range(per_class):
            r0 = 5 + j * (size + 10)
            c0 = k * band + 5
            out[f"class{k}"].append(
                box(c0 * TILE, r0 * TILE, (c0 + size) * TILE, (r0 + size) * TILE)
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--regions", type=int, default=5, help="regions per class")
    ap.add_argument("--size", type=int, default=12, help="region side in tiles")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from sklearn.linear_model import LogisticRegression

    store = make_store(args.tiles, args.dim, args.classes)
    side = int(np.ceil(np.sqrt(args.tiles)))
    drawn = regions(side, args.classes, args.regions, args.size)
    ours, bare, n_train, cv = [], [], 0, None
    for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        data = training_set(store, drawn)
        clf = train(store, data)
        pred = predict(store, clf)
        ours.append(time.perf_counter() - t0)
        n_train, cv = len(data.indices), clf.cv
        x = store.embeddings[data.indices]
        t0 = time.perf_counter()
        lr = LogisticRegression(class_weight="balanced", max_iter=2000).fit(x, data.labels)
        lr.predict_proba(store.embeddings)
        bare.append(time.perf_counter() - t0)
        assert pred.n_predicted == args.tiles
    seconds, baseline = statistics.median(ours[1:]), statistics.median(bare[1:])
    print(
        json.dumps(
            {
                "benchmark": "few-shot classifier: regions -> fit + region-wise CV -> predict",
                "tiles": args.tiles,
                "dim": args.dim,
                "training_tiles": n_train,
                "classes": args.classes,
                "regions_per_class": args.regions,
                "cv_folds": cv.n_folds if cv else None,
                "cv_accuracy": round(cv.accuracy, 4) if cv else None,
                "seconds_train_predict": round(seconds, 4),
                "goal_seconds": 1.0,
                "baseline_seconds_bare_sklearn": round(baseline, 4),
                "ratio": round(seconds / baseline, 3),
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg()[0],
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
