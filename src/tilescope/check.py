"""The full integrity check of a store (``tilescope check STORE``).

Everything `EmbeddingStore.open` checks cheaply (see `tilescope._store_state`), and also:
every embeddings row marked done is read and must be a finite unit vector; every saved score
set must be readable with one row per tile; failed tiles should have their messages; and
hidden leftovers beside the store (temporaries of killed runs, an unfinished replacement) are
listed. Nothing is written: ``tilescope embed`` repairs what re-embedding can.

Examples
--------
>>> from tilescope.check import check_store   # doctest: +SKIP
>>> report = check_store("CMU-1-Small-Region.zarr")  # doctest: +SKIP
>>> report.ok, report.problems  # doctest: +SKIP
(True, [])
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr
from zarr.storage import LocalStore

from ._store_io import open_group
from ._store_state import DONE, FAILED, TODO, read_state, scan_embeddings
from .errors import StoreCorruptError, StoreError

__all__ = ["CheckReport", "check_store"]

_LEFTOVER = re.compile(r"\.[0-9a-f]{32}\.(tmp|old)$")


@dataclass
class CheckReport:
    """What `check_store` found. ``ok`` is True when nothing is damaged (a partial store is
    ok: it is a normal state); ``repairable`` when embedding the slide into the store again
    fixes every problem (the damaged rows are embedded again)."""

    path: str
    ok: bool
    repairable: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    n_tiles: int = 0
    n_done: int = 0
    n_failed: int = 0
    n_todo: int = 0
    rows_to_reembed: int = 0
    complete: bool = False
    slide: str = ""
    model: str = ""
    trained: bool = True
    score_sets: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_store(path: str | PathLike[str]) -> CheckReport:
    """Check every part of the store at `path` (reads all of it, one chunk at a time).

    Raises `StoreError` only if `path` does not exist; damage is reported, never raised.
    """
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: no such embedding store")
    try:
        _, sig, arrays = open_group(p, read_only=True, hint="it cannot be repaired")
    except StoreCorruptError as exc:
        return CheckReport(str(p), ok=False, repairable=False, problems=[str(exc)])
    state = read_state(p, arrays, sig)
    done = state.flags == DONE
    problems = state.problems + scan_embeddings(arrays["embeddings"], done)
    model = sig.get("model") or {}
    report = CheckReport(
        str(p),
        ok=not problems,
        repairable=all(pr.repairable for pr in problems),
        problems=[pr.describe() for pr in problems],
        n_tiles=int(sig["n_tiles"]),
        n_done=int(done.sum()),
        n_failed=int((state.flags == FAILED).sum()),
        n_todo=int((state.flags == TODO).sum()),
        complete=bool(sig.get("complete")),
        slide=str((sig.get("slide") or {}).get("name", "")),
        model=str(model.get("model_id", "")),
        trained=bool(model.get("trained", True)),
    )
    bad_rows = [pr.rows for pr in problems if pr.array in ("embeddings", "done")]
    report.rows_to_reembed = len(np.unique(np.concatenate(bad_rows))) if bad_rows else 0
    _check_scores(p, report)
    _check_failures(p, state.flags, report)
    _check_leftovers(p, report)
    return report


def _check_scores(p: Path, report: CheckReport) -> None:
    folder = p / "scores"
    if not (folder / "zarr.json").exists():
        return
    for child in sorted(folder.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        try:
            group = zarr.open_group(LocalStore(child, read_only=True), mode="r", zarr_format=3)
            if "tilescope_scores" not in group.attrs:
                report.notes.append(f"scores/{child.name}: unfinished save (no meta); ignored")
                continue
            for key, arr in group.arrays():
                values = np.asarray(cast(zarr.Array, arr)[:])
                if values.shape[:1] != (report.n_tiles,):
                    raise ValueError(f"{key} has {values.shape[0]} rows, not {report.n_tiles}")
        except Exception as exc:  # noqa: BLE001 - any damage of a score set is reported
            report.problems.append(f"scores/{child.name}: damaged ({exc}); save it again")
            report.ok = False
            continue
        report.score_sets.append(child.name)


def _check_failures(p: Path, flags: np.ndarray, report: CheckReport) -> None:
    try:
        group = zarr.open_group(LocalStore(p, read_only=True), mode="r", zarr_format=3)
        rows = cast(list[dict[str, Any]], group.attrs.get("tilescope_failures") or [])
        listed = {int(r["index"]) for r in rows}
    except Exception:  # noqa: BLE001 - the group itself was read above
        listed = set()
    silent = sorted(set(np.flatnonzero(flags == FAILED).tolist()) - listed)
    if silent:
        report.notes.append(
            f"{len(silent)} failed tiles have no message recorded (an earlier version was "
            "killed while recording them)"
        )


def _check_leftovers(p: Path, report: CheckReport) -> None:
    prefix = f".{p.name}."
    for sib in sorted(p.parent.iterdir()):
        if not sib.name.startswith(prefix):
            continue
        if sib.name == f"{prefix}replacing":
            report.notes.append(
                f"{sib.name}: an unfinished replacement (an embed with overwrite that did not "
                "finish); overwriting again resumes it"
            )
        elif _LEFTOVER.search(sib.name):
            report.notes.append(f"{sib.name}: left by a killed run; the next embed removes it")
