"""The store's provenance signature: what it holds, how two signatures are compared.

See `tilescope.store` for where the signature lives (``attrs["tilescope"]``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .errors import StoreError

FORMAT_NAME = "tilescope-embeddings"
FORMAT_VERSION = 1
#: Model provenance keys that must match to resume a store or search across stores.
# Not model_id: the same weights loaded from the hub or from a local folder are the same model.
MODEL_IDENTITY_KEYS = (
    "weights_digest", "trained", "embed_dim", "image_size", "mean", "std", "resize_mode",
    "interpolation",
)  # fmt: skip
SIGNATURE_PARTS = ("model", "grid", "layout", "slide", "level0_mpp")
_IGNORED_KEYS = (
    "created", "completed", "complete", "chunk_rows", "tilescope_version", "n_failed",
)  # fmt: skip


def signature_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two signatures, over identity-relevant keys only.

    Ignored: created/completed times, ``complete``, ``chunk_rows``, the tilescope patch
    version, and model provenance keys outside `MODEL_IDENTITY_KEYS`.
    """
    a, b = _identity(old), _identity(new)
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if va != vb:  # JSON values on both sides: floats round-trip exactly
            out.append(f"{key}: store has {va!r}, requested {vb!r}")
    return out


def _identity(sig: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = obj

    model = sig.get("model", {})
    walk("", {k: v for k, v in sig.items() if k not in _IGNORED_KEYS and k != "model"})
    walk("model", {k: model.get(k) for k in MODEL_IDENTITY_KEYS})
    flat["tilescope_version"] = ".".join(str(sig.get("tilescope_version", "")).split(".")[:2])
    return flat


def full_signature(
    p: Path, signature: Mapping[str, Any], *, n: int, embed_dim: int, chunk_rows: int
) -> dict[str, Any]:
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
        n_tiles=n,
        chunk_rows=max(1, min(chunk_rows, n)),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        complete=False,
    )
    return sig


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
