"""Complete embedding stores with chosen embeddings, for the QuPath, classifier and MIL tests.

`grid_store` lays tiles on a regular grid (224 px tiles at 0.5 µm/px, no overlap: 448 level-0
px at the default 0.25 µm/px; other slide µm/px give tiles of a fractional level-0 size, as
real slides do), origin (100, 50), and writes the embeddings you give it, so a test knows
exactly which tile holds what.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tilescope.store import EmbeddingStore

TILE = 448.0
ORIGIN = (100, 50)
MPP = 0.25


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def grid_signature(
    rows: int, cols: int, dim: int, mpp: float = MPP, slide: str = "slide.svs", **model: Any
) -> dict[str, Any]:
    tile_l0 = 224 * 0.5 / mpp
    return {
        "model": {"model_id": "fake/model", "weights_digest": "abc123", "trained": False,
                  "embed_dim": dim, **model},
        "grid": {"target_mpp": 0.5, "tile_px": 224, "overlap_px": 0, "min_tissue": 0.25},
        "layout": {"downsample": 0.5 / mpp, "tile_l0": tile_l0, "stride_l0": tile_l0,
                   "origin": list(ORIGIN), "grid_shape": [rows, cols]},
        "slide": {"name": slide, "size_bytes": 123, "dimensions": [
                  int(cols * tile_l0 + 200), int(rows * tile_l0 + 100)], "mpp": [mpp, mpp],
                  "header_sha256": "f00"},
        "level0_mpp": [mpp, mpp],
    }  # fmt: skip


def grid_store(
    path: Path,
    embeddings: np.ndarray,
    rc: np.ndarray,
    *,
    shape: tuple[int, int] | None = None,
    done: np.ndarray | None = None,
    failed: np.ndarray | None = None,
    mpp: float = MPP,
    slide: str = "slide.svs",
    complete: bool = True,
    **model: Any,
) -> EmbeddingStore:
    """A complete store at `path` with tile i at grid (row, col) ``rc[i]``.

    `done` (bool, default all) marks rows written; rows not done must be `failed` (the store
    completes with them recorded as failed, as a tile that could not be read). With
    ``complete=False`` the rows not done are left to do (an interrupted store).
    """
    emb = unit_rows(embeddings)
    rc = np.asarray(rc, dtype=np.int32)
    rows, cols = shape or (int(rc[:, 0].max()) + 1, int(rc[:, 1].max()) + 1)
    coords = np.array(ORIGIN) + np.rint(rc[:, ::-1] * (224 * 0.5 / mpp)).astype(np.int64)
    n = len(emb)
    done = np.ones(n, bool) if done is None else np.asarray(done, bool)
    st = EmbeddingStore.create_or_resume(
        path,
        signature=grid_signature(rows, cols, emb.shape[1], mpp, slide, **model),
        coords=coords,
        grid_rc=rc,
        tissue=np.ones(n, np.float32),
        embed_dim=emb.shape[1],
    )
    with st:
        idx = np.flatnonzero(done)
        st.write_rows(idx, emb[idx])
        bad = np.flatnonzero(~done if failed is None else failed)
        if len(bad) and complete:
            st.record_failures((int(i), "synthetic read error") for i in bad)
        if complete:
            st.finalize()
    return EmbeddingStore.open(path)


def full_grid(rows: int, cols: int) -> np.ndarray:
    """(rows * cols, 2) (row, col) of every cell, row-major."""
    r, c = np.mgrid[0:rows, 0:cols]
    return np.stack([r.ravel(), c.ravel()], axis=1)


def cell_box(r0: int, c0: int, r1: int, c1: int, tile: float = TILE) -> list[list[float]]:
    """A rectangle (closed ring, level-0 px) covering grid cells rows r0..r1, cols c0..c1."""
    x0, y0 = ORIGIN[0] + c0 * tile + 1, ORIGIN[1] + r0 * tile + 1
    x1, y1 = ORIGIN[0] + (c1 + 1) * tile - 1, ORIGIN[1] + (r1 + 1) * tile - 1
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
