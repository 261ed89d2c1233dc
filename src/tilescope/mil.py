"""MIL-ready feature files: one HDF5 file per slide in the layout TRIDENT, CLAM or STAMP read.

Checked against the projects' own code (see the README's "MIL export" for the details):

- **TRIDENT** (``trident/wsi_objects/WSI.py: extract_patch_features``, ``IO.py:
  save_h5 / read_coords``): datasets ``features`` (N, D) and ``coords`` (N, 2) level-0 pixel
  top-left corners (int64); ``coords.attrs`` ``patch_size`` (px at the target
  magnification), ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
  ``overlap``, ``name``, ``level0_width``, ``level0_height``; ``features.attrs`` ``name``.
  Its slide encoders (TITAN, GigaPath, ...) read ``coords.attrs["patch_size_level0"]``.
  Magnification follows TRIDENT's ``mpp = 10 / magnification``.
- **CLAM** (``extract_features_fp.py``, ``dataset_modules/dataset_generic.py``): its feature
  folder holds ``h5_files/<slide_id>.h5`` (``features``, ``coords``) and
  ``pt_files/<slide_id>.pt``, the features alone as ``torch.save(torch.from_numpy(features))``
  (a float32 tensor (N, D)). ``Generic_MIL_Dataset`` reads the ``.pt`` by default
  (``torch.load(os.path.join(data_dir, 'pt_files', f'{slide_id}.pt'))``) and the ``.h5`` with
  ``load_from_h5(True)``. ``--format clam`` writes both (`clam_pt_path`: the ``.pt`` goes to
  ``pt_files/`` beside the ``h5_files/`` folder the ``.h5`` is in, else to ``pt_files/``
  beside the ``.h5``), and the ``coords`` attributes of CLAM's patching step (``patch_size``
  in level-0 px at ``patch_level`` 0, ``downsample``, ``level_dim``,
  ``downsampled_level_dim``, ``name``) so CLAM's own patch readers (``Whole_Slide_Bag_FP``)
  re-read the same tissue. A folder of stores is exported as CLAM's feature folder:
  ``OUT/h5_files/`` and ``OUT/pt_files/``.
- **STAMP** (``stamp/modeling/data.py: get_coords``): datasets ``feats`` (N, D) and ``coords``
  (N, 2) in micrometres, file attributes ``unit`` = "um", ``tile_size_um``, ``tile_size_px``,
  ``feat_type`` = "tile", ``extractor``.

Every file also carries ``attrs["tilescope_export"]``: JSON with the store's full
provenance (model and weights digest, grid, slide identity), the format, and how many tiles
were left out. Only embedded tiles are written: tiles that failed to read (``done`` = 2) are
left out, and an unfinished store is refused. Features are float32 as stored
(L2-normalised).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._signature import jsonable
from .errors import StoreError

__all__ = [
    "MIL_FORMATS", "CohortExport", "clam_pt_path", "export_h5_cohort", "magnification",
    "write_h5", "write_pt",
]  # fmt: skip

MILFormat = Literal["trident", "clam", "stamp"]
MIL_FORMATS: tuple[str, ...] = ("trident", "clam", "stamp")
EXPORT_FORMAT = "tilescope-mil"


def magnification(mpp: float) -> float:
    """Objective magnification of a pixel size, in TRIDENT's convention ``mpp = 10 / mag``
    (0.5 µm/px is 20x), rounded to 3 decimals (0.499 µm/px gives 20.04)."""
    return round(10.0 / float(mpp), 3)


def _slide_dims(store: Any) -> tuple[int, int]:
    dims = store.signature.get("slide", {}).get("dimensions") or [0, 0]
    return int(dims[0]), int(dims[1])


def _mpp_xy(store: Any) -> tuple[float, float]:
    mpp = store.signature.get("level0_mpp")
    if isinstance(mpp, list) and len(mpp) == 2:
        return float(mpp[0]), float(mpp[1])
    return float(store.level0_mpp), float(store.level0_mpp)


def write_h5(
    store: Any,
    path: str | PathLike[str],
    fmt: str = "trident",
    *,
    provenance: dict[str, Any] | None = None,
) -> int:
    """Write the embedded tiles of a complete `EmbeddingStore` to a new HDF5 file at `path`.

    Returns the number of tiles written. `fmt` is "trident" (default; CLAM's MIL loaders read
    it too), "clam" or "stamp" (see the module docstring). `provenance` replaces the store's
    signature in the file's attributes (`export_store` passes an anonymised one when asked).
    The caller picks the path (`tilescope.export.export_store` writes a temporary file and
    renames it into place).

    Raises
    ------
    StoreError
        Unknown format, or a store with no embedded tile.
    """
    import h5py

    if fmt not in MIL_FORMATS:
        raise StoreError(f"unknown h5 layout {fmt!r}: use {', '.join(MIL_FORMATS)}")
    sig = store.signature
    grid = sig["grid"]
    rows = np.flatnonzero(store.done)
    if not len(rows):
        raise StoreError(f"{store.path}: no embedded tiles to export")
    n, d = len(rows), int(store.embed_dim)
    named = (sig if provenance is None else provenance).get("slide", {})
    stem = Path(str(named.get("name", store.path.stem))).stem
    mpp_x, mpp_y = _mpp_xy(store)
    width, height = _slide_dims(store)
    coords = np.asarray(store.coords, dtype=np.int64)[rows]
    tile_px = int(grid["tile_px"])
    overlap_px = int(grid.get("overlap_px", 0))
    tile_l0 = float(store.tile_l0)
    with h5py.File(path, "w-") as f:
        feats = f.create_dataset("feats" if fmt == "stamp" else "features", (n, d), "float32")
        chunk = int(store.chunk_rows)
        written = 0
        for start in range(0, store.n_tiles, chunk):  # bounded memory: one store chunk at once
            keep = rows[(rows >= start) & (rows < start + chunk)]
            if len(keep):
                block = store.read_embeddings(start, start + chunk)[keep - start]
                feats[written : written + len(keep)] = block.astype(np.float32)
                written += len(keep)
        if fmt == "stamp":
            f.create_dataset("coords", data=coords * np.array([mpp_x, mpp_y]))
            f.attrs.update({
                "unit": "um", "tile_size_um": tile_l0 * mpp_x, "tile_size_px": tile_px,
                "feat_type": "tile", "extractor": str(sig["model"].get("model_id", "")),
            })  # fmt: skip
        else:
            c = f.create_dataset("coords", data=coords)
            c.attrs.update({
                "patch_size": tile_px,
                "patch_size_level0": int(round(tile_l0)),
                "level0_magnification": magnification(mpp_x),
                "target_magnification": magnification(float(grid["target_mpp"])),
                "overlap": overlap_px,
                "name": stem,
                "level0_width": width,
                "level0_height": height,
                "level0_mpp": mpp_x,
                "target_mpp": float(grid["target_mpp"]),
            })  # fmt: skip
            if fmt == "clam":  # CLAM's patching attributes: patch_size in level-0 px at level 0
                c.attrs.update({
                    "patch_size": int(round(tile_l0)), "patch_level": 0,
                    "downsample": np.array([1.0, 1.0]),
                    "level_dim": np.array([width, height]),
                    "downsampled_level_dim": np.array([width, height]),
                })  # fmt: skip
            feats.attrs["name"] = stem
        left_out = int(store.n_tiles - n)
        f.attrs["tilescope_export"] = json.dumps(
            jsonable({
                "format": EXPORT_FORMAT, "format_version": 1, "layout": fmt,
                "n_tiles": n, "n_failed": int(getattr(store, "n_failed", 0)),
                "n_left_out": left_out, "tile_l0": tile_l0,
                "provenance": sig if provenance is None else provenance,
            })
        )  # fmt: skip
    return n


def clam_pt_path(h5_path: str | PathLike[str]) -> Path:
    """Where CLAM's loader looks for the ``.pt`` of ``h5_path``: ``DIR/pt_files/<id>.pt`` for
    ``DIR/h5_files/<id>.h5`` (CLAM's feature folder DIR), else ``pt_files/<id>.pt`` beside it."""
    h5 = Path(h5_path)
    root = h5.parent.parent if h5.parent.name == "h5_files" else h5.parent
    return root / "pt_files" / f"{h5.stem}.pt"


def write_pt(store: Any, path: str | PathLike[str]) -> int:
    """Write the embedded tiles' features of `store` to `path` as CLAM's ``pt_files`` hold
    them: ``torch.save`` of a float32 tensor (N, D), rows in the order of the ``.h5``'s
    ``features`` (failed tiles left out). Returns N."""
    import torch

    rows = np.flatnonzero(store.done)
    feats = np.empty((len(rows), int(store.embed_dim)), dtype=np.float32)
    chunk, written = int(store.chunk_rows), 0
    for start in range(0, store.n_tiles, chunk):
        keep = rows[(rows >= start) & (rows < start + chunk)]
        if len(keep):
            feats[written : written + len(keep)] = store.read_embeddings(start, start + chunk)[
                keep - start
            ]
            written += len(keep)
    with open(path, "wb") as fh:  # a file object: the archive inside is named "archive", not
        torch.save(torch.from_numpy(feats), fh)  # after the file (which may name the slide)
    return len(rows)


@dataclass
class CohortExport:
    """What `export_h5_cohort` did: files written, and stores skipped with the reason."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def export_h5_cohort(
    folder: str | PathLike[str],
    out_dir: str | PathLike[str],
    *,
    fmt: str = "trident",
    overwrite: bool = False,
    recursive: bool = False,
    anonymize: bool = False,
) -> CohortExport:
    """Export every store in `folder` to ``out_dir/<slide name>.h5`` (one file per slide);
    with ``fmt="clam"``, CLAM's feature folder: ``out_dir/h5_files/<slide name>.h5`` and
    ``out_dir/pt_files/<slide name>.pt`` (`out_dir` may itself be named ``h5_files``).

    File names are the slide's file name without its suffix (the ``slide_id`` CLAM and
    TRIDENT expect); two stores of slides with one name get the store's name instead. With
    `anonymize`, files are named by the slide's alias (``slide-<12 hex>``, then ``-2``, ...
    for two stores of one slide file) and hold no slide name (`tilescope.anonymize`). A
    store that cannot be exported (unfinished, unreadable, an existing file without
    `overwrite`) is skipped and reported; the others are still written.

    Raises
    ------
    StoreError
        `folder` holds no embedding store, or `out_dir` is a file.
    """
    from .catalog import find_stores
    from .export import export_store

    src, dest = Path(folder), Path(out_dir)
    stores = find_stores(src, recursive=recursive)
    if not stores:
        raise StoreError(f"{src}: no Tilescope embedding stores (*.zarr) in this folder")
    if dest.exists() and not dest.is_dir():
        raise StoreError(f"{dest}: is a file; name a folder for one .h5 file per slide")
    if fmt == "clam" and dest.name != "h5_files":
        dest = dest / "h5_files"
    names = [_slide_stem(p, anonymize) for p in stores]
    result = CohortExport()
    for k, (store_path, stem) in enumerate(zip(stores, names, strict=True)):
        seen = names[:k].count(stem)  # stores of this slide name (or file) before this one
        if names.count(stem) == 1 or (anonymize and not seen):
            name = stem
        else:
            name = f"{stem}-{seen + 1}" if anonymize else store_path.stem
        try:
            out = export_store(store_path, dest / f"{name}.h5", mil_format=fmt,  # type: ignore[arg-type]
                               overwrite=overwrite, anonymize=anonymize)  # fmt: skip
        except (StoreError, OSError) as exc:
            result.skipped.append((store_path, str(exc)))
        else:
            result.written.append(out)
    return result


def _slide_stem(store_path: Path, anonymize: bool = False) -> str:
    from .anonymize import slide_alias
    from .catalog import read_signature

    sig = read_signature(store_path) or {}
    if anonymize:
        return slide_alias(sig)
    return Path(str(sig.get("slide", {}).get("name") or store_path.stem)).stem
