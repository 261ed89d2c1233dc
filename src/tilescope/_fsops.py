"""Crash-safe file-system steps shared by stores, saved scores and exports.

Everything Tilescope replaces is first built complete under a hidden temporary name beside
its target, then put in place in one step:

- a file replaces a file with ``os.replace`` (atomic on POSIX and Windows);
- a folder replaces a folder with Linux's ``renameat2(RENAME_EXCHANGE)``, which swaps the two
  names atomically, so the target path always holds the old or the new version, never
  neither; the old version, now under the temporary name, is then deleted. Where the exchange
  is not available (other systems, some network file systems) the old folder is first renamed
  aside to ``.NAME.<hex>.old``; a run killed between the two renames leaves the target missing
  and the old copy aside, and `recover` puts the old copy back on the next run.

Hidden leftovers of killed runs (``.NAME.<hex>.tmp`` and ``.NAME.<hex>.old``) are removed by
`clean_leftovers`, which callers run under the lock that guards the target.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

__all__ = ["clean_leftovers", "exchange", "publish", "recover", "remove", "temp_path"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_HEX = r"[0-9a-f]{32}"


def temp_path(target: Path, kind: str = "tmp") -> Path:
    """A fresh hidden sibling of `target`: ``.NAME.<32 hex>.<kind>``."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.{kind}")


def _leftover(target: Path, kind: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(target.name)}\.{_HEX}\.{kind}$")


def remove(path: Path) -> None:
    """Delete a file, link or folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` atomically; False where the system cannot (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # pragma: no cover - an old C library
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this file system cannot exchange
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def publish(new: Path, target: Path) -> None:
    """Put the complete `new` (a hidden sibling) at `target`, replacing what is there.

    Files are replaced atomically. A folder over an existing one is exchanged atomically where
    the system allows it, else moved aside first (see the module docstring); the old version
    is deleted afterwards.
    """
    exists = target.exists() or target.is_symlink()
    folder = lambda q: q.is_dir() and not q.is_symlink()  # noqa: E731
    if not exists or not (folder(new) or folder(target)):
        os.replace(new, target)  # onto nothing, or a file over a file: atomic
        return
    if exchange(new, target):
        remove(new)  # the old version, now under the temporary name
        return
    old = temp_path(target, "old")
    os.replace(target, old)
    os.replace(new, target)  # a kill before this line: `recover` restores `old`
    remove(old)


def recover(target: Path) -> bool:
    """Undo a replacement killed between its two renames: if `target` is missing and an old
    copy is aside, put the newest copy back. True if something was restored."""
    if target.exists() or target.is_symlink() or not target.parent.is_dir():
        return False
    pattern = _leftover(target, "old")
    olds = [p for p in target.parent.iterdir() if pattern.match(p.name)]
    if not olds:
        return False
    newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
    os.replace(newest, target)
    return True


def clean_leftovers(
    target: Path, kinds: tuple[str, ...] = ("tmp", "old"), *, min_age: float = 0.0
) -> list[Path]:
    """Remove hidden temporaries of killed runs for `target` (after `recover`); returns them.

    Call this while holding the lock that guards `target` (a running writer's own temporary
    has the same form), or with `min_age` (seconds): only older temporaries are removed.
    """
    recover(target)
    if not target.parent.is_dir():
        return []
    patterns = [_leftover(target, k) for k in kinds]
    now = time.time()
    found = [
        p
        for p in target.parent.iterdir()
        if any(r.match(p.name) for r in patterns) and now - p.lstat().st_mtime >= min_age
    ]
    for p in found:
        remove(p)
    return found
