"""The store's provenance signature: what it holds, how two signatures are compared.

See `tilescope.store` for where the signature lives (``attrs["tilescope"]``).

Two signatures are compared in three tiers:

- *identity*: what decides which tiles exist and what their embeddings mean (the model's
  weights and preprocessing, the grid, the layout, the slide's file identity and pixel size,
  the tissue parameters, the embedding width). A difference refuses a resume.
- *notices*: provenance that may differ without changing what the store means (the encoder's
  backend and compute precision, the reader's resampling filter, the slide's file name, the
  edge rule of an older version). A difference is reported, never refused.
- everything else (times, counters, the generation id, local paths) is not compared.

Parts that a store made by an older version does not record (for example the tissue
parameters, recorded since format 2) are notices too: a store is never refused for what it
could not know.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .errors import StoreError

FORMAT_NAME = "tilescope-embeddings"
#: 2: generation id, tissue parameters, fill values that show missing chunks (done 255,
#: coords and grid_rc -1, tissue NaN). Stores of format 1 are still read and resumed.
FORMAT_VERSION = 2
#: Model provenance keys that must match to resume a store or search across stores.
# Not model_id: the same weights loaded from the hub or from a local folder are the same model.
MODEL_IDENTITY_KEYS = (
    "weights_digest", "trained", "embed_dim", "image_size", "mean", "std", "resize_mode",
    "interpolation",
)  # fmt: skip
#: Model provenance keys reported (not refused) when they differ.
MODEL_NOTICE_KEYS = ("backend", "compute_precision", "compute_dtype")
SIGNATURE_PARTS = ("model", "grid", "layout", "slide", "level0_mpp")
#: Top-level keys never compared.
_IGNORED_KEYS = (
    "created", "completed", "complete", "chunk_rows", "tilescope_version", "n_failed",
    "n_tiles", "generation", "format", "format_version", "model",
)  # fmt: skip
#: Flattened keys (outside "model") that are notices, not identity.
_NOTICE_KEYS = ("slide.name", "slide.mpp_source", "grid.edge_policy")
_NOTICE_PREFIXES = ("reader.",)
_NOTICE_WORDS = ("resampl", "filter")


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        flat[prefix] = obj
    return flat


def _is_notice(key: str) -> bool:
    return (
        key in _NOTICE_KEYS
        or key.startswith(_NOTICE_PREFIXES)
        or (key.startswith("grid.") and any(w in key for w in _NOTICE_WORDS))
    )


def _compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    a = _flatten({k: v for k, v in old.items() if k not in _IGNORED_KEYS})
    b = _flatten({k: v for k, v in new.items() if k not in _IGNORED_KEYS})
    diffs: list[str] = []
    notices: list[str] = []
    for key in sorted(set(a) | set(b)):
        if key not in a:
            notices.append(f"{key}: not recorded in the store (made by an older version)")
        elif key not in b:
            notices.append(f"{key}: recorded in the store ({a[key]!r}), not in this run")
        elif a[key] != b[key]:  # JSON values on both sides: floats round-trip exactly
            line = f"{key}: store has {a[key]!r}, requested {b[key]!r}"
            (notices if _is_notice(key) else diffs).append(line)
    ma, mb = old.get("model") or {}, new.get("model") or {}
    for key in MODEL_IDENTITY_KEYS:
        va, vb = ma.get(key, "<missing>"), mb.get(key, "<missing>")
        if va != vb:
            diffs.append(f"model.{key}: store has {va!r}, requested {vb!r}")
    for key in MODEL_NOTICE_KEYS:
        if key in ma and key in mb and ma[key] != mb[key]:
            notices.append(f"model.{key}: store has {ma[key]!r}, this run {mb[key]!r}")
    va, vb = (".".join(str(s.get("tilescope_version", "")).split(".")[:2]) for s in (old, new))
    if va != vb:
        diffs.append(f"tilescope_version: store has {va!r}, requested {vb!r}")
    return sorted(diffs), notices


def signature_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable identity differences between two signatures (see the module docstring).

    Not compared: created/completed times, ``complete``, counters, ``chunk_rows``, the
    generation id, the tilescope patch version, and model provenance keys outside
    `MODEL_IDENTITY_KEYS`; notices (`signature_notices`) are left out too.
    """
    return _compare(old, new)[0]


def signature_notices(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Differences that are reported but do not refuse a resume (see the module docstring)."""
    return _compare(old, new)[1]


def same_slide_file(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """True if two signatures were made from the same slide file content (size + header)."""
    a, b = old.get("slide") or {}, new.get("slide") or {}
    keys = ("size_bytes", "header_sha256")
    return all(a.get(k) == b.get(k) for k in keys)


def requested_signature(
    p: Path, signature: Mapping[str, Any], *, embed_dim: int, chunk_rows: int
) -> dict[str, Any]:
    """The signature a new store at `p` would get, without the tile count (added at creation).

    Raises `StoreError` if a required part is missing.
    """
    missing = [k for k in SIGNATURE_PARTS if k not in signature]
    model = signature.get("model", {})
    if missing or "model_id" not in model:
        raise StoreError(
            f"{p}: signature lacks {missing or ['model.model_id']}; see the store layout"
        )
    if model.get("embed_dim", embed_dim) != embed_dim:
        raise StoreError(f"{p}: model embed_dim {model['embed_dim']} != embed_dim {embed_dim}")
    sig = jsonable(dict(signature))
    sig.update(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        tilescope_version=__version__,
        embed_dim=embed_dim,
        chunk_rows=chunk_rows,
        complete=False,
    )
    return sig


def new_store_signature(requested: Mapping[str, Any], *, n: int) -> dict[str, Any]:
    """`requested` completed for a store of `n` tiles: tile count, time, a fresh generation."""
    sig = dict(requested)
    sig.update(
        n_tiles=n,
        chunk_rows=max(1, min(int(sig.get("chunk_rows", 1)), n)),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        generation=uuid.uuid4().hex,
        complete=False,
    )
    return sig


def full_signature(
    p: Path, signature: Mapping[str, Any], *, n: int, embed_dim: int, chunk_rows: int
) -> dict[str, Any]:
    """`requested_signature` and `new_store_signature` in one step."""
    req = requested_signature(p, signature, embed_dim=embed_dim, chunk_rows=chunk_rows)
    return new_store_signature(req, n=n)


def jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, tuples and Paths."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, PathLike):
        return str(obj)
    return obj
