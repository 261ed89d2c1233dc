"""Export an embedding store for other tools: a plain zarr v3 group or GeoJSON tiles.

Only tiles with an embedding are exported: tiles that could not be read (``done`` = 2) and
tiles not embedded yet (a partial store, a normal state) are left out, so every exported row
is a real embedding; ``store_index`` maps the rows back to the store, and the provenance says
how many were left out and why.

Zarr export layout (any zarr v3 reader)::

    OUT.zarr/                    group; attribute "tilescope_export" = {format
                                 "tilescope-export", format_version 2, dtype, level0_mpp,
                                 tile_l0, tile_um, anonymized, rows (n_tiles of the store,
                                 n_exported, n_failed, n_not_embedded, complete), provenance
                                 (the store's full signature)}
      embeddings  (M, D) float16 or float32, L2-normalised (float16 rows: norm 1 +- 1e-3)
      coords      (M, 2) int64   level-0 pixel (x, y) of each tile's top-left corner
      coords_um   (M, 2) float64 the same corner in micrometres (x * mpp_x, y * mpp_y)
      grid_rc     (M, 2) int32   (row, col) in the tile grid
      tissue      (M,)   float32 tissue fraction
      store_index (M,)   int64   the tile's row in the store
      scores/<name>/             saved score sets, the same M rows (meta in "tilescope_scores")

GeoJSON export: a FeatureCollection with one Polygon per exported tile in level-0 pixel
coordinates (QuPath's convention: origin at the top-left of the full-resolution image, y down)
with properties ``objectType`` "tile", ``index`` (the store row), ``row``, ``col``, ``tissue``
and ``measurements`` (``tissue`` and ``"<score set>: <class>"`` probabilities; a value that is
not a finite number is left out, never written as null). Scores of an untrained model are
measurements named ``"<score set>: <class> [UNTRAINED]"``. Features carry no ``id`` (QuPath
reads an id as an object UUID).

Privacy: nothing from associated images (label, macro) is ever exported (the store holds
none). The provenance holds the slide's file name, which often carries an accession number, and
score sets may record file names too (a classifier's training slide, store and annotation
file): ``anonymize=True`` replaces the slide's file name, its stem, the store's name and the
paths of the store and its folder, wherever they occur in what is written (provenance, score
set names and metadata, QuPath object properties, HDF5 attributes), by
``slide-<12 hex of its header digest>`` (see `tilescope.anonymize`).

The output's suffix says its format (`FORMATS`); other suffixes are refused. Its parent
folder is created. Outputs are written under a temporary name and put in place when complete
(`tilescope._fsops.publish`: an existing export stays until the new one replaces it
atomically); an embedding store is never replaced, even with ``overwrite``. Temporaries of
killed exports are removed by the next export to the same path.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.storage import LocalStore

from . import _fsops
from ._signature import jsonable
from .anonymize import Anonymizer
from .errors import OVERWRITE_WORDS, OutputExistsError, StoreError
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
#: Temporaries of an export older than this (seconds) are leftovers of a killed run.
LEFTOVER_AGE = 600.0


@dataclass
class ExportRows:
    """What an export writer gets: the store, the rows to export (done rows, ascending), the
    score sets (full N rows each), the provenance and the row counts for the attributes."""

    store: EmbeddingStore
    rows: np.ndarray
    score_sets: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]]
    provenance: dict[str, Any]
    counts: dict[str, Any]

    def embedding_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(output start, embeddings) of the exported rows, one store chunk at a time."""
        st, out = self.store, 0
        for start in range(0, st.n_tiles, max(1, st.chunk_rows)):
            stop = min(st.n_tiles, start + st.chunk_rows)
            sel = self.rows[(self.rows >= start) & (self.rows < stop)]
            if len(sel):
                yield out, st.read_embeddings(start, stop)[sel - start]
                out += len(sel)


def export_store(
    store_path: str | PathLike[str],
    out: str | PathLike[str],
    *,
    dtype: Literal["float16", "float32"] = "float16",
    fmt: Literal["zarr", "geojson", "h5"] | None = None,
    scores: Sequence[str] | None = None,
    overwrite: bool = False,
    anonymize: bool = False,
    objects: Literal["tiles", "detections", "annotations"] = "tiles",
    threshold: float = 0.5,
    mil_format: Literal["trident", "clam", "stamp"] = "trident",
) -> Path:
    """Export a store's embedded tiles to `out` and return its path.

    Parameters
    ----------
    store_path
        An `EmbeddingStore` directory; a partial store is exported too (its embedded tiles).
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
    anonymize
        Write no slide path, file name or stem anywhere: they are replaced by
        ``slide-<12 hex>`` (`tilescope.anonymize`). The name of `out` is the caller's choice.
    objects
        GeoJSON only: "tiles" (one tile object per tile), "detections" (QuPath detections
        per embedded tile, classified by the score set when there is exactly one) or
        "annotations" (class regions of one score set at `threshold`); see `tilescope.qupath`.
    threshold
        Annotations: the value a tile needs to belong to a class's region.
    mil_format
        ``.h5`` only: "trident" (default, also read by CLAM's MIL loaders with
        ``load_from_h5``), "clam" (also writes CLAM's ``pt_files/<slide_id>.pt``, see
        `tilescope.mil.clam_pt_path`) or "stamp"; see `tilescope.mil`.

    Raises
    ------
    StoreError
        An unknown suffix, a damaged store, or an output that exists and may not be replaced
        (`OutputExistsError`); nothing is written then.
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
    if dest.resolve() == store.path.resolve():
        raise StoreError(f"{dest}: is the store itself; choose another output path")
    _fsops.clean_leftovers(dest, min_age=LEFTOVER_AGE)  # of killed exports, not running ones
    exists = dest.exists() or dest.is_symlink()
    if exists and _is_embedding_store(dest):
        raise StoreError(
            f"{dest}: is an embedding store; refusing to replace it with an export, even "
            "with overwrite; choose another output path"
        )
    if exists and not overwrite:
        raise OutputExistsError(
            f"{dest}: already exists; choose another path, or {OVERWRITE_WORDS}"
        )
    if exists and dest.is_dir() and (fmt != "zarr" or not _replaceable_folder(dest)):
        raise StoreError(f"{dest}: is a folder that is not a zarr export; refusing to replace it")
    pt_dest = None
    if fmt == "h5" and mil_format == "clam":  # CLAM's loader reads pt_files/<slide_id>.pt
        from .mil import clam_pt_path

        pt_dest = clam_pt_path(dest)
        _fsops.clean_leftovers(pt_dest, min_age=LEFTOVER_AGE)
        if (pt_dest.exists() or pt_dest.is_symlink()) and not overwrite:
            raise OutputExistsError(
                f"{pt_dest}: already exists (the .pt that goes with {dest.name}); choose "
                f"another path, or {OVERWRITE_WORDS}"
            )
    if fmt == "h5" and not store.complete:  # a MIL bag stands for the whole slide
        raise StoreError(
            f"{store.path}: the store is incomplete ({store.state_text()}); a MIL feature file "
            "must hold the whole slide: finish embedding (run the same command again) first"
        )
    names = store.score_names() if scores is None else list(scores)
    anon = Anonymizer.for_store(store) if anonymize else None
    stored_sets = {name: store.read_scores(name) for name in names}
    score_sets = stored_sets
    if anon is not None:
        score_sets = {anon.text(k): (a, anon.value(m)) for k, (a, m) in stored_sets.items()}
    selection = ExportRows(
        store=store,
        rows=np.flatnonzero(store.done).astype(np.int64),
        score_sets=score_sets,
        provenance=_provenance(store, anon),
        counts={
            "n_tiles": store.n_tiles,
            "n_exported": store.n_done,
            "n_failed": store.n_failed,
            "n_not_embedded": store.n_todo,
            "complete": store.complete,
            "left_out": "tiles that could not be read (failed) or are not embedded yet",
        },
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fsops.temp_path(dest)
    pt_tmp = None
    try:
        if fmt == "h5":
            from .mil import write_h5, write_pt

            write_h5(store, tmp, mil_format, provenance=selection.provenance)
            if pt_dest is not None:
                pt_dest.parent.mkdir(parents=True, exist_ok=True)
                pt_tmp = _fsops.temp_path(pt_dest)
                write_pt(store, pt_tmp)
                _fsops.publish(pt_tmp, pt_dest)
        elif fmt == "geojson" and objects != "tiles":
            from .qupath import write_objects

            write_objects(store, tmp, stored_sets, objects=objects, threshold=threshold,
                          scrub=anon.value if anon else None)  # fmt: skip
        else:
            WRITERS[fmt](selection, tmp, dtype=np.dtype(dtype), anonymized=anonymize)
        _fsops.publish(tmp, dest)  # an old export stays until the new one takes its place
    except OSError as exc:
        raise StoreError(
            f"{dest}: could not write the export ({exc.strerror or exc}); check the free disk "
            "space and the folder's permissions"
        ) from exc
    finally:
        _fsops.remove(tmp)
        if pt_tmp is not None:
            _fsops.remove(pt_tmp)
    return dest


def _provenance(store: EmbeddingStore, anon: Anonymizer | None) -> dict[str, Any]:
    sig = store.signature
    if anon is None:
        return sig
    sig["slide"] = {**(sig.get("slide") or {}), "name": anon.alias}
    return dict(anon.value(sig))


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


def _mpp_xy(store: EmbeddingStore) -> np.ndarray:
    mpp = store.signature.get("slide", {}).get("mpp")
    if isinstance(mpp, list) and len(mpp) == 2 and all(isinstance(v, (int, float)) for v in mpp):
        return np.asarray(mpp, dtype=np.float64)
    return np.full(2, store.level0_mpp)


def _write_zarr(sel: ExportRows, path: Path, *, dtype: np.dtype, anonymized: bool) -> None:
    store, idx = sel.store, sel.rows
    m, d = len(idx), store.embed_dim
    rows = max(1, min(store.chunk_rows, m))
    group = zarr.open_group(LocalStore(path), mode="w-", zarr_format=3)
    emb = group.create_array(
        "embeddings", shape=(m, d), dtype=dtype, chunks=(rows, d), compressors=None
    )
    for start, block in sel.embedding_blocks():  # bounded memory: one chunk at a time
        emb[start : start + len(block)] = block.astype(dtype)
    group.create_array("coords", data=store.coords[idx], chunks=(rows, 2))
    group.create_array("coords_um", data=store.coords[idx] * _mpp_xy(store), chunks=(rows, 2))
    group.create_array("grid_rc", data=store.grid_rc[idx], chunks=(rows, 2))
    group.create_array("tissue", data=store.tissue[idx], chunks=(rows,))
    group.create_array("store_index", data=idx, chunks=(rows,))
    if sel.score_sets:
        parent = group.create_group("scores")
        for name, (arrays, meta) in sel.score_sets.items():
            sub = parent.create_group(name)
            for key, arr in arrays.items():
                sub.create_array(key, data=arr[idx], chunks=(rows, *arr.shape[1:]))
            sub.attrs["tilescope_scores"] = jsonable(meta)
    group.attrs["tilescope_export"] = jsonable(
        {
            "format": EXPORT_FORMAT,
            "format_version": 2,
            "dtype": dtype.name,
            "level0_mpp": store.level0_mpp,
            "tile_l0": store.tile_l0,
            "tile_um": store.tile_l0 * store.level0_mpp,
            "anonymized": anonymized,
            "rows": sel.counts,
            "provenance": sel.provenance,
        }
    )


def _write_geojson(sel: ExportRows, path: Path, **_: Any) -> None:
    store, score_sets = sel.store, sel.score_sets
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
        for written, i in enumerate(int(v) for v in sel.rows):
            x, y = (float(v) for v in store.coords[i])
            ring = [[x, y], [x + t, y], [x + t, y + t], [x, y + t], [x, y]]
            found = {"tissue": _num(store.tissue[i]), **{k: _num(v[i]) for k, v in columns}}
            measurements = {k: v for k, v in found.items() if v is not None}
            properties: dict[str, Any] = {
                "objectType": "tile",
                "index": i,  # the store row
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
            fh.write(("," if written else "") + "\n" + json.dumps(feature, allow_nan=False))
        fh.write("\n]}\n")


#: Format -> writer(selection, temporary path, *, dtype, anonymized). Another module may add
#: its own (e.g. MIL-ready ``.h5``) with a suffix in `FORMATS`: it gets the same rows.
WRITERS: dict[str, Callable[..., None]] = {"zarr": _write_zarr, "geojson": _write_geojson}


def _num(v: Any) -> float | None:
    f = float(v)
    return f if np.isfinite(f) else None
