"""Anonymised exports: no slide path, file name or stem in anything an export writes.

A slide's file name often carries an accession number, and so do the names derived from it:
the store's name (``DIR/<slide name>.zarr``), the folder the slide and its store sit in, the
names of annotation files made for it, and whatever a user typed that contains them (a score
set called ``S12-3456-tumour``). An `Anonymizer` replaces every occurrence of these
(case-insensitive, longest first) by the slide's alias, ``slide-<12 hex of the slide file's
header digest>``, in every string it is given: dictionary keys and values, lists, names.
The exporters pass everything they write through it (provenance, score-set names and their
metadata, QuPath object properties, HDF5 attributes, file names of a folder export).

The alias is the same for the same slide file (its header digest), so anonymised exports of one
slide can still be matched with each other, never with the file name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Anonymizer", "slide_alias"]

#: Shorter strings are not treated as identifying (a store called ``s.zarr``).
MIN_SECRET = 3


def slide_alias(signature: Mapping[str, Any]) -> str:
    """``slide-<12 hex>``: of the slide's header digest (else of its file name)."""
    slide = signature.get("slide") or {}
    digest = str(slide.get("header_sha256") or "")
    if not digest:
        digest = hashlib.sha256(str(slide.get("name", "")).encode()).hexdigest()
    return f"slide-{digest[:12]}"


def _stems(name: str) -> list[str]:
    """A file name and its stems: ``a.ome.tiff`` -> a.ome.tiff, a.ome, a."""
    out = [name]
    while Path(out[-1]).suffix and Path(out[-1]).stem:
        out.append(Path(out[-1]).stem)
    return out


class Anonymizer:
    """Replaces identifying strings (`secrets`) by `alias` in strings and nested JSON values."""

    def __init__(self, alias: str, secrets: Iterable[str]) -> None:
        self.alias = alias
        found = {s for s in secrets if s and len(s) >= MIN_SECRET and s.lower() not in alias}
        self.secrets = tuple(sorted(found, key=len, reverse=True))
        self._pattern = (
            re.compile("|".join(re.escape(s) for s in self.secrets), re.IGNORECASE)
            if self.secrets
            else None
        )

    @classmethod
    def for_store(cls, store: Any) -> Anonymizer:
        """The slide of `store` (an `EmbeddingStore`): its file name and stems, the store's
        name and stems, and the paths of the store and of the folder it sits in (where its
        slide usually is)."""
        sig = store.signature
        secrets = _stems(str((sig.get("slide") or {}).get("name") or ""))
        for path in {Path(store.path).absolute(), Path(store.path).resolve()}:
            secrets += [*_stems(path.name), str(path)]
            if path.parent != Path(path.anchor):
                secrets.append(str(path.parent))
        return cls(slide_alias(sig), secrets)

    def text(self, s: str) -> str:
        """`s` with every secret replaced by the alias."""
        return self._pattern.sub(self.alias, s) if self._pattern is not None else s

    def value(self, obj: Any) -> Any:
        """A copy of a JSON-like value (dicts, lists, strings) with every string scrubbed."""
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, Mapping):
            return {self.text(str(k)): self.value(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.value(v) for v in obj]
        return obj

    def leaks(self, s: str) -> list[str]:
        """The secrets found in `s` (for checks and tests)."""
        low = s.lower()
        return [x for x in self.secrets if x.lower() in low]
