"""Where stores live, and which store holds which slide.

A store belongs to a slide by the slide's *file identity* recorded in its signature (byte size
and the sha256 of the first MiB), never by file name alone: two slides called ``slide.svs`` in
different folders get different stores, and a renamed slide still finds its own.

Stores go to the default folder (`default_store_dir`: ``$TILESCOPE_STORES``, else
``~/tilescope/stores``) unless the user names another; the CLI and the napari widgets use the
same folder, so a slide embedded by one is found by the other.

Nothing here opens a slide with OpenSlide or a store with zarr: reading a ``zarr.json`` and the
first MiB of a file is all it costs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

__all__ = [
    "HEADER_BYTES",
    "STORE_DIR_ENV",
    "default_store_dir",
    "file_identity",
    "find_stores",
    "read_signature",
    "same_slide",
    "store_path_for",
    "stores_for_slide",
]

#: Environment variable naming the default folder of stores.
STORE_DIR_ENV = "TILESCOPE_STORES"
#: The slide's header digest covers this many leading bytes.
HEADER_BYTES = 1 << 20
#: The format name in a store signature (``attrs["tilescope"]["format"]``).
_FORMAT_NAME = "tilescope-embeddings"


def default_store_dir() -> Path:
    """``$TILESCOPE_STORES``, else ``~/tilescope/stores`` (read at every call)."""
    env = os.environ.get(STORE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / "tilescope" / "stores"


def file_identity(path: str | PathLike[str]) -> dict[str, Any]:
    """``{"size_bytes", "header_sha256"}`` of a file: what ties a store to its slide."""
    p = Path(path)
    with open(p, "rb") as fh:
        header = hashlib.sha256(fh.read(HEADER_BYTES)).hexdigest()
    return {"size_bytes": p.stat().st_size, "header_sha256": header}


def same_slide(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """True if two slide identities (a signature's ``slide`` entry, or `file_identity`) are
    the same file content: equal byte size and header digest."""
    keys = ("size_bytes", "header_sha256")
    return all(a.get(k) is not None and a.get(k) == b.get(k) for k in keys)


def read_signature(path: str | PathLike[str]) -> dict[str, Any] | None:
    """The embeddings signature of the store at `path` (its ``zarr.json`` attributes), or
    ``None`` if `path` is not a Tilescope embedding store. Never raises."""
    try:
        meta = json.loads((Path(path) / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    sig = attrs.get("tilescope") if isinstance(attrs, dict) else None
    if isinstance(sig, dict) and sig.get("format") == _FORMAT_NAME:
        return sig
    return None


def find_stores(folder: str | PathLike[str], *, recursive: bool = False) -> list[Path]:
    """Embedding stores in `folder` (``*.zarr`` folders with a signature), sorted by path.

    With `recursive`, stores in sub-folders too (never inside a store).
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    return [path for path, _ in walk_stores(root, recursive=recursive)[0]]


def walk_stores(
    root: Path, *, recursive: bool = True, skip: Iterable[str] = ()
) -> tuple[list[tuple[Path, dict[str, Any]]], list[Path]]:
    """The stores under `root` with their signatures, and the ``*.zarr`` folders that are not
    stores (exports), both sorted by path. Hidden folders, folders named in `skip` and the
    inside of any ``*.zarr`` folder are not searched; unreadable folders are passed over."""
    skipped = set(skip)
    stores: list[tuple[Path, dict[str, Any]]] = []
    others: list[Path] = []
    stack = [root]
    while stack:
        here = stack.pop()
        try:
            entries = sorted(here.iterdir())
        except OSError:
            continue
        for entry in entries:
            if not entry.is_dir() or entry.name.startswith(".") or entry.name in skipped:
                continue
            sig = read_signature(entry)
            if sig is not None:
                stores.append((entry, sig))
            elif entry.suffix == ".zarr":
                others.append(entry)
            elif recursive:
                stack.append(entry)
    return sorted(stores, key=lambda s: s[0]), sorted(others)


def stores_for_slide(
    slide_path: str | PathLike[str],
    folders: Iterable[str | PathLike[str]],
    *,
    identity: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Stores in `folders` made from this slide's file, complete ones first, newest first.

    `identity` (from `file_identity`) saves reading the slide's header again.
    """
    ident = identity or file_identity(slide_path)
    hits: list[tuple[bool, str, Path]] = []
    seen: set[Path] = set()
    for folder in folders:
        for store in find_stores(folder):
            key = store.resolve()
            sig = read_signature(store)
            if key in seen or sig is None or not same_slide(sig.get("slide", {}), ident):
                continue
            seen.add(key)
            hits.append((bool(sig.get("complete")), str(sig.get("created", "")), store))
    hits.sort(key=lambda h: (not h[0], _neg(h[1])))
    return [h[2] for h in hits]


def _neg(text: str) -> list[int]:
    """A sort key that orders ISO timestamps newest first."""
    return [-ord(c) for c in text]


def store_path_for(
    slide_path: str | PathLike[str],
    out_dir: str | PathLike[str],
    *,
    identity: Mapping[str, Any] | None = None,
    taken: Iterable[str | PathLike[str]] = (),
) -> Path:
    """The store of a slide in `out_dir`: ``<stem>.zarr``, unless that name is another slide's.

    ``OUT/<stem>.zarr`` when it is free or already holds this slide (any settings); else the
    store of this slide under another name, if the folder has one; else
    ``OUT/<stem>-<first 8 hex of the header digest>.zarr``. So two slides with one file stem
    never share a store, and the same slide always finds the store it had. `taken` lists paths
    already given to other slides in this run (so two new slides with one stem do not both get
    ``<stem>.zarr`` before either exists).
    """
    slide = Path(slide_path)
    out = Path(out_dir)
    plain = out / f"{slide.stem}.zarr"
    if identity is None and not slide.is_file():
        return plain  # opening the slide will say what is wrong with the path
    ident = identity or file_identity(slide)
    claimed = {Path(t).resolve() for t in taken}
    if plain.resolve() not in claimed:
        sig = read_signature(plain)
        if sig is not None and same_slide(sig.get("slide", {}), ident):
            return plain
        if sig is None and not _occupied(plain):
            for store in stores_for_slide(slide, [out], identity=ident):
                if store.resolve() not in claimed:
                    return store
            return plain
    for store in stores_for_slide(slide, [out], identity=ident):
        if store.resolve() not in claimed:
            return store
    return out / f"{slide.stem}-{str(ident['header_sha256'])[:8]}.zarr"


def _occupied(path: Path) -> bool:
    """Something that is not an embedding store is at `path` (a file, a non-empty folder)."""
    if path.is_dir() and not path.is_symlink():
        try:
            return any(path.iterdir())
        except OSError:
            return True
    return path.exists() or path.is_symlink()
