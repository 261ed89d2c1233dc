"""Export a complete embedding store for other tools: a plain zarr v3 group or GeoJSON tiles.

Zarr export layout (any zarr v3 reader)::

    OUT.zarr/                    group; attribute "tilescope_export" = {format
                                 "tilescope-export", format_version 1, dtype, level0_mpp,
                                 tile_l0, tile_um, provenance (the store's full signature)}
      embeddings  (N, D) float16 or float32, L2-normalised (float16 rows: norm 1 +- 1e-3)
      coords      (N, 2) int64   level-0 pixel (x, y) of each tile's top-left corner
      coords_um   (N, 2) float64 the same corner in micrometres (x * mpp_x, y * mpp_y)
      grid_rc     (N, 2) int32   (row, col) in the tile grid
      tissue      (N,)   float32 tissue fraction
      scores/<name>/             saved score sets as in the store (meta in "tilescope_scores")

GeoJSON export: a FeatureCollection with one Polygon per tile in level-0 pixel coordinates
(QuPath's convention: origin at the top-left of the full-resolution image, y down) with
properties ``objectType`` "tile", ``index``, ``row``, ``col``, ``tissue`` and ``measurements``
(``tissue`` and ``"<score set>: <class>"`` probabilities). Nothing from associated images
(label, macro) is ever exported; the store holds none.
Outputs are written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.storage import LocalStore

from .errors import StoreError
from .store import EmbeddingStore, _jsonable

__all__ = ["export_store"]

EXPORT_FORMAT = "tilescope-export"


def export_store(
    store_path: str | PathLike[str],
    out: str | PathLike[str],
    *,
    dtype: Literal["float16", "float32"] = "float16",
    fmt: Literal["zarr", "geojson"] | None = None,
    scores: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a complete store to `out` and return its path.

    Parameters
    ----------
    store_path
        An `EmbeddingStore` directory.
    out
        Output path: a ``.zarr`` directory or a ``.geojson`` file.
    dtype
        Embedding dtype of a zarr export.
    fmt
        "zarr" or "geojson"; by default from the suffix of `out` (``.geojson``/``.json`` ->
        GeoJSON, otherwise zarr).
    scores
        Names of saved score sets to include; ``None`` includes all, ``[]`` none.
    overwrite
        Replace an existing `out`.
    """
    store = EmbeddingStore.open(store_path)
    dest = Path(out)
    if fmt is None:
        fmt = "geojson" if dest.suffix.lower() in (".geojson", ".json") else "zarr"
    if fmt not in ("zarr", "geojson") or dtype not in ("float16", "float32"):
        raise StoreError(f"{dest}: fmt must be zarr or geojson and dtype float16 or float32")
    if not store.complete:
        raise StoreError(
            f"{store.path}: the store is incomplete ({store.n_done}/{store.n_tiles} tiles); "
            "finish embedding (run the same command again) before exporting"
        )
    if dest.resolve() == store.path.resolve():
        raise StoreError(f"{dest}: is the store itself; choose another output path")
    exists = dest.exists() or dest.is_symlink()
    if exists and not overwrite:
        raise StoreError(f"{dest}: already exists; choose another path or use overwrite=True")
    if exists and dest.is_dir() and dest.suffix != ".zarr" and not (dest / "zarr.json").exists():
        raise StoreError(f"{dest}: is a folder that is not a zarr store; refusing to replace it")
    names = store.score_names() if scores is None else list(scores)
    score_sets = {name: store.read_scores(name) for name in names}
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        if fmt == "zarr":
            _write_zarr(store, tmp, np.dtype(dtype), score_sets)
        else:
            _write_geojson(store, tmp, score_sets)
        old = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.old")
        if exists:
            os.replace(dest, old)  # keep the old output until the new one is in place
        try:
            os.replace(tmp, dest)
        except OSError:
            if exists:
                os.replace(old, dest)
            raise
        _remove_quietly(old)
    finally:
        _remove_quietly(tmp)
    return dest


def _remove_quietly(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _mpp_xy(store: EmbeddingStore) -> np.ndarray:
    mpp = store.signature.get("slide", {}).get("mpp")
    if isinstance(mpp, list) and len(mpp) == 2 and all(isinstance(v, (int, float)) for v in mpp):
        return np.asarray(mpp, dtype=np.float64)
    return np.full(2, store.level0_mpp)


def _write_zarr(
    store: EmbeddingStore, path: Path, dtype: np.dtype, score_sets: dict[str, Any]
) -> None:
    n, d, rows = store.n_tiles, store.embed_dim, max(1, min(store.chunk_rows, store.n_tiles))
    group = zarr.open_group(LocalStore(path), mode="w-", zarr_format=3)
    emb = group.create_array(
        "embeddings", shape=(n, d), dtype=dtype, chunks=(rows, d), compressors=None
    )
    for start in range(0, n, rows):  # bounded memory: one chunk at a time
        emb[start : start + rows] = store.read_embeddings(start, start + rows).astype(dtype)
    group.create_array("coords", data=store.coords, chunks=(rows, 2))
    group.create_array("coords_um", data=store.coords * _mpp_xy(store), chunks=(rows, 2))
    group.create_array("grid_rc", data=store.grid_rc, chunks=(rows, 2))
    group.create_array("tissue", data=store.tissue, chunks=(rows,))
    if score_sets:
        parent = group.create_group("scores")
        for name, (arrays, meta) in score_sets.items():
            sub = parent.create_group(name)
            for key, arr in arrays.items():
                sub.create_array(key, data=arr, chunks=(rows, *arr.shape[1:]))
            sub.attrs["tilescope_scores"] = _jsonable(meta)
    group.attrs["tilescope_export"] = _jsonable(
        {
            "format": EXPORT_FORMAT,
            "format_version": 1,
            "dtype": dtype.name,
            "level0_mpp": store.level0_mpp,
            "tile_l0": store.tile_l0,
            "tile_um": store.tile_l0 * store.level0_mpp,
            "provenance": store.signature,
        }
    )


def _write_geojson(store: EmbeddingStore, path: Path, score_sets: dict[str, Any]) -> None:
    t = store.tile_l0
    columns = []  # (measurement name, (N,) values)
    for name, (arrays, meta) in score_sets.items():
        values = arrays.get("probs", next(iter(arrays.values()), None))
        classes = meta.get("classes", [])
        if values is not None and values.ndim == 2 and values.shape[1] == len(classes):
            columns += [(f"{name}: {c}", values[:, j]) for j, c in enumerate(classes)]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        for i in range(store.n_tiles):
            x, y = (float(v) for v in store.coords[i])
            ring = [[x, y], [x + t, y], [x + t, y + t], [x, y + t], [x, y]]
            tissue = _num(store.tissue[i])
            measurements = {"tissue": tissue, **{k: _num(v[i]) for k, v in columns}}
            feature = {
                "type": "Feature",
                "id": str(i),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "index": i,
                    "row": int(store.grid_rc[i, 0]),
                    "col": int(store.grid_rc[i, 1]),
                    "tissue": tissue,
                    "measurements": measurements,
                },
            }
            fh.write(("," if i else "") + "\n" + json.dumps(feature, allow_nan=False))
        fh.write("\n]}\n")


def _num(v: Any) -> float | None:
    f = float(v)
    return f if np.isfinite(f) else None
