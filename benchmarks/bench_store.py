"""What the store's integrity checks cost: opening and reading a store with its checks against
plain zarr reads of the same arrays, measured in the same run.

Prints one JSON object: ``ratio`` = (``EmbeddingStore.open`` + reading all embeddings, with
the cheap checks and the per-read row check) / (plain zarr reads of the same five arrays);
goal <= 2 (the row check is one float32 pass over what was read). Also the seconds of the
full check (``tilescope check``) and of a writer's resume of a finished store (its full check
included).

    python benchmarks/bench_store.py [--tiles 100000] [--dim 512]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr


def _store(path: Path, n: int, d: int) -> None:
    from tilescope.store import EmbeddingStore

    cols = 400
    rc = np.stack([np.arange(n) // cols, np.arange(n) % cols], axis=1).astype(np.int32)
    sig = {
        "model": {"model_id": "bench", "weights_digest": "x", "trained": False, "embed_dim": d},
        "grid": {"target_mpp": 0.5, "tile_px": 224, "overlap_px": 0, "min_tissue": 0.25},
        "layout": {
            "downsample": 2.0,
            "tile_l0": 448.0,
            "stride_l0": 448.0,
            "origin": [0, 0],
            "grid_shape": [int(rc[-1, 0]) + 1, cols],
        },  # fmt: skip
        "slide": {"name": "bench.svs", "size_bytes": 1, "header_sha256": "0", "mpp": [0.25, 0.25]},
        "level0_mpp": [0.25, 0.25],
    }
    st = EmbeddingStore.create_or_resume(
        path, signature=sig, coords=rc[:, ::-1].astype(np.int64) * 448, grid_rc=rc,
        tissue=np.ones(n, np.float32), embed_dim=d,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    for a in range(0, n, 4096):
        e = rng.standard_normal((min(n, a + 4096) - a, d)).astype(np.float32)
        st.write(a, e / np.linalg.norm(e, axis=1, keepdims=True))
    st.finalize()
    st.close()


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    args = ap.parse_args()
    from tilescope.check import check_store
    from tilescope.store import EmbeddingStore

    tmp = Path(tempfile.mkdtemp(prefix="bench_store_"))
    try:
        path = tmp / "s.zarr"
        _store(path, args.tiles, args.dim)

        def plain() -> None:
            g = zarr.open_group(str(path), mode="r")
            for name in ("coords", "grid_rc", "tissue", "done", "embeddings"):
                np.asarray(g[name][:])

        def checked() -> None:
            EmbeddingStore.open(path).embeddings  # noqa: B018

        def resume() -> None:
            st = EmbeddingStore.resume_or_create(
                path, signature=EmbeddingStore.open(path).signature, embed_dim=args.dim,
                make_layout=lambda: None,
            )  # fmt: skip
            st.close()

        base, ours = _best(plain), _best(checked)
        print(
            json.dumps(
                {
                    "benchmark": "bench_store",
                    "tiles": args.tiles,
                    "dim": args.dim,
                    "plain_read_seconds": round(base, 4),
                    "open_and_read_seconds": round(ours, 4),
                    "ratio": round(ours / base, 3),
                    "full_check_seconds": round(_best(lambda: check_store(path)), 4),
                    "resume_finished_seconds": round(_best(resume), 4),
                    "load": os.getloadavg()[0],
                }
            )
        )
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
