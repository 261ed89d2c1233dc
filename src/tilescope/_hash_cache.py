"""sha256 of large files, remembered by path, size, mtime and inode.

Loading BiomedCLIP hashes its 784 MB weights file (the digest is the model's identity in every
store); this cache makes the second load skip that read. An entry is used only while the file's
resolved path, byte size, modification time (ns) and inode are unchanged; anything else is
hashed again. The cache is one small JSON file (`cache_file`: ``$TILESCOPE_CACHE_DIR`` or
``~/.cache/tilescope``, ``hashes.json``), rewritten atomically (a temporary file renamed over
it), so a killed process leaves the old cache or the new one; a damaged cache is ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

CACHE_ENV = "TILESCOPE_CACHE_DIR"
#: Entries kept (most recent last); older ones are dropped.
MAX_ENTRIES = 256
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """``$TILESCOPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/tilescope`` or ``~/.cache/tilescope``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tilescope"


def cache_file() -> Path:
    return cache_dir() / "hashes.json"


def _stamp(path: Path) -> tuple[str, dict[str, int]]:
    st = os.stat(path)  # follows symlinks (hub cache snapshots link to blobs)
    real = str(Path(path).resolve())
    return real, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _read() -> dict[str, Any]:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(entries: dict[str, Any]) -> None:
    target = cache_file()
    with contextlib.suppress(OSError):  # a read-only cache only costs the hash next time
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hashes.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(entries, fh, indent=0)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def hash_file(path: Path) -> str:
    """sha256 of a file's bytes (no cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def sha256_cached(path: str | os.PathLike[str]) -> str:
    """sha256 of `path`, from the cache when the file is unchanged, else hashed and cached."""
    key, stamp = _stamp(Path(path))
    entry = _read().get(key)
    if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp:
        digest = entry.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    digest = hash_file(Path(path))
    if _stamp(Path(path))[1] != stamp:  # changed while it was read: do not remember it
        return digest
    with _LOCK:
        entries = _read()  # another process may have added entries meanwhile
        entries.pop(key, None)
        entries[key] = {**stamp, "sha256": digest}
        while len(entries) > MAX_ENTRIES:
            del entries[next(iter(entries))]
        _write(entries)
    return digest
