"""The cohort index on disk: where it lives, its manifest, its arrays, the writer lock.

One index per model (the model's identity: weights digest, preprocessing, width), a zarr v3
group ``FOLDER/tilescope-index/index-<16 hex>.zarr``::

    attributes "tilescope_index"   the manifest (JSON, below): the commit point of every update
    embeddings  (R, D) float16     the embedding rows (L2-normalised, as in the stores)
    scan_i8     (R, D) int8        the same rows quantised for the fast scan: round(e * scale)
    scan_scale  (R,)   float32     1 / scale of each row (scale = 127 / max |e|)
    scan_err    (R,)   float32     || e - scan_i8 * scan_scale ||  (bounds the scan's error)
    scan_norm   (R,)   float32     || scan_i8 * scan_scale ||
    store_id    (R,)   int32       which entry of the manifest's "stores" the row comes from
    row         (R,)   int64       the row in that store
    coords      (R, 2) int64       level-0 (x, y) of the tile's top-left corner

Every array is uncompressed (zarr's ``bytes`` codec only), so each chunk file
(``NAME/c/<i>/0``) is the raw little-endian rows of ``chunk_rows`` x D, full size even at the
end: search memory-maps the chunk files as they are, no copy and no zarr on the read path.

The manifest lists the stores (path relative to FOLDER, slide name, generation, rows
``[start, stop)`` in the index, tile size) and ``n_rows``. Rows of a store removed or replaced
are *dead*: no store claims them; they stay until a compaction rewrites the index (when a
quarter of the rows are dead). Rows past ``n_rows`` (a killed update) are ignored and
overwritten by the next update. ``generation`` changes when the index is rewritten, so a
reader that opened the old files notices.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from .._signature import MODEL_IDENTITY_KEYS
from ..errors import IndexBusyError, IndexCorruptError

INDEX_DIRNAME = "tilescope-index"
FORMAT = "tilescope-index"
FORMAT_VERSION = 1
ATTR = "tilescope_index"
#: Rows per chunk: 64 MiB of float16 at D = 512; a handful of files per million rows.
CHUNK_ROWS = 65536
#: name -> (dtype, trailing shape as a function of D)
ARRAYS: dict[str, tuple[str, bool]] = {
    "embeddings": ("float16", True),
    "scan_i8": ("int8", True),
    "scan_scale": ("float32", False),
    "scan_err": ("float32", False),
    "scan_norm": ("float32", False),
    "store_id": ("int32", False),
    "row": ("int64", False),
    "coords": ("int64", False),
}


#: Fill values no written chunk can equal (zarr skips writing a chunk equal to its fill value,
#: and search memory-maps chunk files): every row has a finite unit vector and a nonzero
#: int8 peak, every id and row number is >= 0.
FILL: dict[str, Any] = {"float16": "NaN", "float32": "NaN", "int8": 0, "int32": -1, "int64": -1}


def model_identity(model: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a model's provenance that decide what its embeddings mean."""
    return {k: model.get(k) for k in MODEL_IDENTITY_KEYS if model.get(k) is not None}


def index_name(model: Mapping[str, Any]) -> str:
    """``index-<16 hex>.zarr``: one index per model identity."""
    text = json.dumps(model_identity(model), sort_keys=True, default=str)
    return f"index-{hashlib.sha256(text.encode()).hexdigest()[:16]}.zarr"


def index_dir(folder: Path) -> Path:
    return folder / INDEX_DIRNAME


def is_index(path: Path) -> bool:
    """True for a cohort index folder (``FOLDER/tilescope-index``) or an index group in it:
    never a store, nor a folder of stores. Reads one small JSON at most; never raises."""
    p = Path(path)
    if p.name == INDEX_DIRNAME and p.is_dir():
        return True
    try:
        meta = json.loads((p / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and ATTR in (meta.get("attributes") or {})


@dataclass
class StoreEntry:
    """One store in the index: where its rows are and what it was when indexed."""

    id: int  # stable: the rows' store_id (positions in the list change as stores go)
    path: str  # relative to the folder, as found there (a symlink stays a symlink)
    slide_name: str
    generation: str
    start: int
    stop: int
    n_tiles: int
    tile_l0: float
    level0_mpp: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Manifest:
    """What the index holds; written last, atomically, by every update."""

    model: dict[str, Any]
    model_id: str
    embed_dim: int
    chunk_rows: int = CHUNK_ROWS
    n_rows: int = 0
    stores: list[StoreEntry] = field(default_factory=list)
    next_id: int = 0
    generation: str = field(default_factory=lambda: uuid.uuid4().hex)
    updated: str = ""
    ann: dict[str, Any] | None = None

    @property
    def n_live(self) -> int:
        return sum(s.stop - s.start for s in self.stores)

    @property
    def n_dead(self) -> int:
        return self.n_rows - self.n_live

    def live_mask(self) -> np.ndarray:
        live = np.zeros(self.n_rows, dtype=bool)
        for s in self.stores:
            live[s.start : s.stop] = True
        return live

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "model_id": self.model_id,
            "embed_dim": self.embed_dim,
            "chunk_rows": self.chunk_rows,
            "n_rows": self.n_rows,
            "n_live": self.n_live,
            "stores": [s.to_json() for s in self.stores],
            "next_id": self.next_id,
            "generation": self.generation,
            "updated": self.updated,
            "ann": self.ann,
            "dtype": "float16",
            "scan": "int8, one scale per row; exact ranking by float16 rescoring within a "
            "proven error bound",
        }

    @classmethod
    def from_json(cls, path: Path, meta: Any) -> Manifest:
        if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
            raise IndexCorruptError(
                f"{path}: not a Tilescope index (no manifest); run `tilescope index` on its "
                "folder to rebuild it"
            )
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise IndexCorruptError(f"{path}: index format {meta.get('format_version')} is "
                                    "newer than this tilescope; upgrade tilescope")  # fmt: skip
        try:
            stores = [StoreEntry(**s) for s in meta["stores"]]
            return cls(
                model=dict(meta["model"]), model_id=str(meta["model_id"]),
                embed_dim=int(meta["embed_dim"]), chunk_rows=int(meta["chunk_rows"]),
                n_rows=int(meta["n_rows"]), stores=stores, next_id=int(meta["next_id"]),
                generation=str(meta["generation"]),
                updated=str(meta.get("updated", "")), ann=meta.get("ann"),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexCorruptError(
                f"{path}: damaged index manifest ({exc}); run `tilescope index --rebuild` on "
                "its folder"
            ) from None


def read_manifest(path: Path) -> Manifest:
    """The manifest of the index at `path` (its ``zarr.json``), checked."""
    try:
        meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise IndexCorruptError(f"{path}: cannot read the index ({exc}); run `tilescope "
                                "index` on its folder to rebuild it") from None  # fmt: skip
    return Manifest.from_json(path, (meta.get("attributes") or {}).get(ATTR))


def create_group(path: Path, manifest: Manifest) -> None:
    """A new, empty index group at `path` (arrays with 0 rows, uncompressed)."""
    group = zarr.open_group(LocalStore(path), mode="w", zarr_format=3)
    d, rows = manifest.embed_dim, manifest.chunk_rows
    for name, (dtype, wide) in ARRAYS.items():
        shape: tuple[int, ...] = (0, d) if wide else (0,)
        if name == "coords":
            shape = (0, 2)
        chunks = (rows, *shape[1:])
        group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=None,
                           fill_value=FILL[dtype])  # fmt: skip
    write_manifest(path, manifest)


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Commit: the group's ``zarr.json`` is replaced atomically (zarr writes aside, renames)."""
    from datetime import datetime, timezone

    manifest.updated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    group = zarr.open_group(LocalStore(path), mode="r+", zarr_format=3, use_consolidated=False)
    group.attrs[ATTR] = manifest.to_json()


def chunk_file(path: Path, name: str, chunk: int) -> Path:
    """The file of chunk `chunk` of array `name` (zarr v3 default chunk keys)."""
    wide = ARRAYS[name][1] or name == "coords"
    return path / name / "c" / str(chunk) / ("0" if wide else "")


def check_array_meta(path: Path, manifest: Manifest) -> None:
    """Refuse arrays whose layout is not the raw one search memory-maps."""
    for name, (dtype, wide) in ARRAYS.items():
        try:
            meta = json.loads((path / name / "zarr.json").read_text(encoding="utf-8"))
            codecs = [c.get("name") for c in meta.get("codecs", [])]
            chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
            ok = (
                meta["data_type"] == dtype
                and codecs == ["bytes"]
                and chunks[0] == manifest.chunk_rows
                and meta.get("chunk_key_encoding", {}).get("configuration", {}).get(
                    "separator", "/") == "/"
                and int(meta["shape"][0]) >= manifest.n_rows
                and (not wide or chunks[1] == manifest.embed_dim)
            )  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise IndexCorruptError(
                f"{path}: array {name} cannot be read ({exc}); run `tilescope index "
                "--rebuild` on its folder"
            ) from None
        if not ok:
            raise IndexCorruptError(f"{path}: array {name} is not in the index layout; run "
                                    "`tilescope index --rebuild` on its folder")  # fmt: skip


class IndexLock:
    """One writer per index (`filelock`, dropped by the OS when a writer dies)."""

    def __init__(self, path: Path, *, timeout: float = 0) -> None:
        from filelock import FileLock, Timeout

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path.with_name(f".{path.name}.lock")
        self._lock: Any = FileLock(self.path, timeout=timeout, thread_local=False)
        try:
            self._lock.acquire()
        except Timeout:
            raise IndexBusyError(
                f"{path}: another tilescope run is updating this index right now; wait for "
                "it to finish (or stop it) and run again"
            ) from None

    def release(self) -> None:
        if self._lock is not None and self._lock.is_locked:
            self._lock.release(force=True)
        self._lock = None

    def __enter__(self) -> IndexLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
