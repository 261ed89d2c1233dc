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
(``tissue`` and ``"<score set>: <class>"`` probabilities; a value that is not a finite number
is left out, never written as null). Scores of an untrained model are measurements named
``"<score set>: <class> [UNTRAINED]"``. Features carry no ``id`` (QuPath reads an id as an
object UUID). Nothing from associated images (label, macro) is ever exported; the store holds
none.

QuPath objects (``objects="detections"`` or ``"annotations"``) and MIL-ready ``.h5`` files
are written by `tilescope.qupath` and `tilescope.mil` (see there) through the same checks and
atomic rename.

The output's suffix says its format (``.zarr``; ``.geojson`` or ``.json``; ``.h5``); other
suffixes are refused. Its parent folder is created. Outputs are written under a temporary
name and renamed into place when complete; an embedding store is never replaced, even with
``overwrite``.
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

from ._signature import jsonable
from .errors import StoreError
from .store import FORMAT_NAME, EmbeddingStore

__all__ = ["export_store"]

EXPORT_FORMAT = "tilescope-export"
#: Output suffix -> format, and the suffix a format's output gets.
FORMATS: dict[str, Literal["zarr", "geojson", "h5"]] = {
    ".zarr": "zarr",
    ".geojson": "geojson",
    ".json": "geojson",
    ".h5": "h5",  # MIL-ready features (tilescope.mil)
}
SUFFIXES = {"zarr": ".zarr", "geojson": ".geojson", "h5": ".h5"}
#: Appended to the measurement names of scores made with an untrained model.
UNTRAINED_TAG = " [UNTRAINED]"


def export_store(
    store_path: str | PathLike[str],
    out: str | PathLike[str],
    *,
    dtype: Literal["float16", "float32"] = "float16",
    fmt: Literal["zarr", "geojson", "h5"] | None = None,
    scores: Sequence[str] | None = None,
    overwrite: bool = False,
    objects: Literal["tiles", "detections", "annotations"] = "tiles",
    threshold: float = 0.5,
    mil_format: Literal["trident", "clam", "stamp"] = "trident",
) -> Path:
    """Export a complete store to `out` and return its path.

    Parameters
    ----------
    store_path
        An `EmbeddingStore` directory.
    out
        Output path: a ``.zarr`` directory or a ``.geojson`` (or ``.json``) file; its parent
        folder is created if needed.
    dtype
        Embedding dtype of a zarr export.
    fmt
        "zarr" or "geojson"; must agree with the suffix of `out` (the default follows it).
    scores
        Names of saved score sets to include; ``None`` includes all, ``[]`` none.
    overwrite
        Replace an existing export at `out` (a zarr group, or a file for GeoJSON). An
        embedding store, or a folder that is not a zarr group, is never replaced.
    objects
        GeoJSON only: "tiles" (one tile object per tile), "detections" (QuPath detections
        per embedded tile, classified by the score set when there is exactly one) or
        "annotations" (class regions of one score set at `threshold`); see `tilescope.qupath`.
    threshold
        Annotations: the value a tile needs to belong to a class's region.
    mil_format
        ``.h5`` only: "trident" (default, also read by CLAM's MIL loaders), "clam" or
        "stamp"; see `tilescope.mil`.

    Raises
    ------
    StoreError
        An unknown suffix, an incomplete store, or an output that exists and may not be
        replaced; nothing is written then.
    """
    dest = Path(out)
    by_suffix = FORMATS.get(dest.suffix.lower())
    if by_suffix is None:
        raise StoreError(
            f"{dest}: unknown export type {dest.suffix or '(no suffix)'!r}; name the output "
            "OUT.zarr (embeddings for other tools), OUT.geojson (QuPath) or OUT.h5 (MIL "
            "features)"
        )
    fmt = fmt or by_suffix
    if fmt != by_suffix:
        raise StoreError(f"{dest}: a {fmt} export needs the suffix {SUFFIXES[fmt]}")
    if objects != "tiles" and fmt != "geojson":
        raise StoreError(f"{dest}: QuPath {objects} are written as GeoJSON; name the output "
                         "OUT.geojson")  # fmt: skip
    if dtype not in ("float16", "float32"):
        raise StoreError(f"{dest}: dtype must be float16 or float32, not {dtype!r}")
    store = EmbeddingStore.open(store_path)
    if not store.complete:
        raise StoreError(
            f"{store.path}: the store is incomplete ({store.n_done}/{store.n_tiles} tiles); "
            "finish embedding (run the same command again) before exporting"
        )
    if dest.resolve() == store.path.resolve():
        raise StoreError(f"{dest}: is the store itself; choose another output path")
    exists = dest.exists() or dest.is_symlink()
    if exists and _is_embedding_store(dest):
        raise StoreError(
            f"{dest}: is an embedding store; refusing to replace it with an export, even "
            "with --overwrite; choose another output path"
        )
    if exists and not overwrite:
        raise StoreError(
            f"{dest}: already exists; choose another path, or pass --overwrite to replace it"
        )
    if exists and dest.is_dir() and (fmt != "zarr" or not _replaceable_folder(dest)):
        raise StoreError(f"{dest}: is a folder that is not a zarr export; refusing to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    names = store.score_names() if scores is None else list(scores)
    score_sets = {name: store.read_scores(name) for name in names}
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        if fmt == "zarr":
            _write_zarr(store, tmp, np.dtype(dtype), score_sets)
        elif fmt == "h5":
            from .mil import write_h5

            write_h5(store, tmp, mil_format)
        elif objects != "tiles":
            from .qupath import write_objects

            write_objects(store, tmp, score_sets, objects=objects, threshold=threshold)
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


def _is_embedding_store(path: Path) -> bool:
    """True if `path` is (or links to) a folder whose zarr.json says it is an embedding store."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    sig = meta.get("attributes", {}).get("tilescope") if isinstance(meta, dict) else None
    return isinstance(sig, dict) and sig.get("format") == FORMAT_NAME


def _replaceable_folder(path: Path) -> bool:
    """An empty folder, or a zarr group (an earlier export), may be replaced."""
    return (path / "zarr.json").exists() or not any(path.iterdir())


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
            sub.attrs["tilescope_scores"] = jsonable(meta)
    group.attrs["tilescope_export"] = jsonable(
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
    tag = "" if store.signature["model"].get("trained", True) else UNTRAINED_TAG
    columns = []  # (measurement name, (N,) values)
    for name, (arrays, meta) in score_sets.items():
        values = arrays.get("probs", next(iter(arrays.values()), None))
        classes = meta.get("classes", [])
        if values is not None and values.ndim == 2 and values.shape[1] == len(classes):
            columns += [(f"{name}: {c}{tag}", values[:, j]) for j, c in enumerate(classes)]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write('{"type": "FeatureCollection", "features": [')
        for i in range(store.n_tiles):
            x, y = (float(v) for v in store.coords[i])
            ring = [[x, y], [x + t, y], [x + t, y + t], [x, y + t], [x, y]]
            values = {"tissue": _num(store.tissue[i]), **{k: _num(v[i]) for k, v in columns}}
            measurements = {k: v for k, v in values.items() if v is not None}
            properties: dict[str, Any] = {
                "objectType": "tile",
                "index": i,
                "row": int(store.grid_rc[i, 0]),
                "col": int(store.grid_rc[i, 1]),
            }
            if "tissue" in measurements:
                properties["tissue"] = measurements["tissue"]
            properties["measurements"] = measurements
            feature = {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": properties,
            }
            fh.write(("," if i else "") + "\n" + json.dumps(feature, allow_nan=False))
        fh.write("\n]}\n")


def _num(v: Any) -> float | None:
    f = float(v)
    return f if np.isfinite(f) else None
