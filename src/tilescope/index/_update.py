"""Building and updating a cohort index: find the stores, add new ones, drop removed or
replaced ones, compact, keep the approximate index in step. Crash-safe (see `update_model`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _fsops
from ..catalog import walk_stores
from ..errors import IndexCorruptError
from . import _ann
from ._append import Hooks, Source, append, index_blocks, open_sources
from ._layout import (
    INDEX_DIRNAME,
    Manifest,
    StoreEntry,
    check_array_meta,
    create_group,
    index_dir,
    index_name,
    read_manifest,
    write_manifest,
)
from ._scan import MappedIndex

Progress = Callable[[str], None]
#: Compact (rewrite aside) when more than this fraction of the rows would be dead.
COMPACT_FRACTION = 0.25


@dataclass(frozen=True)
class Found:
    """A store found under the folder: its path relative to the folder, and its signature."""

    rel: str
    path: Path
    sig: dict[str, Any]

    @property
    def complete(self) -> bool:
        return bool(self.sig.get("complete"))

    @property
    def generation(self) -> str:
        return str(self.sig.get("generation", ""))


def discover(folder: Path) -> tuple[list[Found], list[Path]]:
    """Embedding stores under `folder` (sub-folders too; not inside a store, not the index
    folder, not hidden ones), and the ``*.zarr`` folders that are not stores (exports)."""
    found, others = walk_stores(folder, skip=(INDEX_DIRNAME,))
    stores = [Found(path.relative_to(folder).as_posix(), path, sig) for path, sig in found]
    return sorted(stores, key=lambda f: f.rel), others


@dataclass
class Report:
    """What an update did (or found to do)."""

    path: Path
    model_id: str
    added: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (store, why)
    rebuilt: bool = False
    n_rows: int = 0
    n_live: int = 0
    n_stores: int = 0
    ann: str | None = None
    seconds: float = 0.0
    #: stopped on request (`should_stop`): the stores in `added` were committed, the rest not
    cancelled: bool = False
    n_todo: int = 0  # stores this update had to add (read or copied)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.dropped or self.rebuilt)


def update_model(
    folder: Path,
    model: dict[str, Any],
    model_id: str,
    stores: list[Found],
    *,
    rebuild: bool = False,
    ann: str = "auto",
    chunk_rows: int | None = None,
    min_ann_rows: int = _ann.ANN_MIN_ROWS,
    progress: Progress | None = None,
    on_rows: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    lock_timeout: float = 0,
) -> Report:
    """Bring the index of one model in `folder` up to date with `stores` (its complete stores).

    New stores' rows are appended and the manifest, written last and atomically, commits
    them; a killed run leaves the previous manifest, which ignores rows past its ``n_rows``.
    Stores removed or replaced (another generation) have their rows dropped from the
    manifest. When more than `COMPACT_FRACTION` of the rows would be dead, or on `rebuild`,
    or for a new index, the whole index is written aside and swapped in (`_fsops.publish`).
    `ann`: "auto" (an approximate index from `min_ann_rows` live rows), "on" or "off".

    `progress` hears what is done, `on_rows` gets (rows written, rows to write) after every
    block of rows. `should_stop` is polled between blocks: when it returns True the update
    commits the stores written whole so far (a new index is published with them; a rewrite of
    an existing index is published only if it holds every store the old one kept, else the
    old index stays), skips the approximate index, and returns with ``cancelled`` set.
    """
    from ._layout import CHUNK_ROWS, IndexLock

    hooks = Hooks.of(progress, on_rows, should_stop)
    say = hooks.say
    t0 = time.perf_counter()
    path = index_dir(folder) / index_name(model)
    report = Report(path, model_id)
    with IndexLock(path, timeout=lock_timeout):
        _fsops.clean_leftovers(path)
        old: Manifest | None = None
        if path.exists() and not rebuild:
            try:
                old = read_manifest(path)
                check_array_meta(path, old)
            except IndexCorruptError as exc:
                say(f"the index is damaged ({exc}); rebuilding it")
                old = None
        if old is not None:
            _remove_stray_ann(path, old)
        want = {f.rel: f for f in stores}
        keep = [e for e in (old.stores if old else [])
                if e.path in want and want[e.path].generation == e.generation]  # fmt: skip
        kept = {e.path for e in keep}
        report.dropped = [e.path for e in (old.stores if old else []) if e.path not in kept]
        todo = [f for f in stores if f.rel not in kept]
        report.n_todo = len(todo)
        rows = chunk_rows or (old.chunk_rows if old else CHUNK_ROWS)
        dead = (old.n_rows - sum(e.stop - e.start for e in keep)) if old else 0
        whole = old is None or rebuild or dead > COMPACT_FRACTION * max(old.n_rows, 1)
        if old is not None and not todo and not report.dropped:
            _fill(report, old)
            if not _want_ann(old, ann, min_ann_rows):
                report.seconds = time.perf_counter() - t0
                return report
        if whole:
            _rewrite(path, model, model_id, keep, old, todo, want, rows, report, hooks,
                     ann=ann, min_rows=min_ann_rows)  # fmt: skip
        elif todo or report.dropped:
            assert old is not None
            sources = open_sources(todo, model, report, hooks)
            say(f"{path.name}: adding {len(sources)} stores, dropping {len(report.dropped)}")
            new, report.cancelled = append(path, old, sources, hooks)
            report.added = [e.path for e in new]
            old.stores = keep + new
            _ann_update(path, old, ann, min_ann_rows, hooks)
            write_manifest(path, old)
        else:
            assert old is not None
            _ann_update(path, old, ann, min_ann_rows, hooks)
            write_manifest(path, old)
        if path.exists():
            man = read_manifest(path)
            _remove_stray_ann(path, man)
            _fill(report, man)
    report.seconds = time.perf_counter() - t0
    return report


def _fill(report: Report, man: Manifest) -> None:
    report.n_rows, report.n_live, report.n_stores = man.n_rows, man.n_live, len(man.stores)
    report.ann = (man.ann or {}).get("file")


def _want_ann(man: Manifest, ann: str, min_rows: int) -> bool:
    """True if the approximate index must be built or brought up to date."""
    wanted = ann == "on" or (ann == "auto" and man.n_live >= min_rows)
    if not wanted:
        return man.ann is not None and ann == "off"  # drop it
    return man.ann is None or int(man.ann.get("n_rows", 0)) < man.n_rows


def _rewrite(
    path: Path, model: dict[str, Any], model_id: str, keep: list[StoreEntry],
    old: Manifest | None, todo: list[Found], want: dict[str, Found], rows: int,
    report: Report, hooks: Hooks, *, ann: str, min_rows: int,
) -> None:  # fmt: skip
    """Write the whole index aside (kept rows copied from the old index) and swap it in."""
    say = hooks.say
    tmp = _fsops.temp_path(path)
    d = int(model.get("embed_dim") or 0)
    sources: list[Source] = []
    ix = None
    if old is not None and keep:
        try:
            ix = MappedIndex(path, old)
        except IndexCorruptError as exc:  # read those stores again instead
            say(f"the index is damaged ({exc}); reading its stores again")
            todo = [want[e.path] for e in keep] + todo
    if ix is not None:
        d = ix.d
        sources += [(e, None, index_blocks(ix, e)) for e in keep]
    opened = open_sources(todo, model, report, hooks)
    if not d and opened:
        d = int(opened[0][1].embed_dim)
    if not d:  # nothing readable to index
        return
    man = Manifest(model=model, model_id=model_id, embed_dim=d, chunk_rows=rows)
    say(f"{path.name}: writing {'a new index' if old is None else 'the index again'} "
        f"({len(sources)} stores kept, {len(opened)} to read)")  # fmt: skip
    try:
        create_group(tmp, man)
        entries, report.cancelled = append(tmp, man, sources + opened, hooks)
        report.added = [e.path for e in entries[len(sources) :]]
        if report.cancelled and (len(entries) < len(sources) or not entries):
            report.added, report.dropped = [], []  # fewer stores than the old index kept:
            return  # the old one stays as it was
        man.stores = entries
        report.rebuilt = old is not None
        _ann_update(tmp, man, ann, min_rows, hooks, target=path)
        write_manifest(tmp, man)
        _fsops.publish(tmp, path)
    finally:
        if tmp.exists():
            _fsops.remove(tmp)


def _ann_update(
    path: Path, man: Manifest, ann: str, min_rows: int, hooks: Hooks, target: Path | None = None
) -> None:
    """Build, extend or drop the approximate index so that it covers ``man``'s rows (those of
    the group at `path`, to be published at `target`). Not after a stop request: the rows it
    does not cover are searched exactly until the next update."""
    say = hooks.say
    target = target or path
    if not _want_ann(man, ann, min_rows) or hooks.stop():
        return
    if ann == "off" or (ann == "auto" and man.n_live < min_rows):
        man.ann = None
        return
    ix = MappedIndex(path, man)
    live = man.live_mask()
    covered = int((man.ann or {}).get("n_rows", 0))
    t = time.perf_counter()
    if man.ann is None or covered > man.n_rows:
        say(f"{path.name}: building the approximate index over {man.n_live:,} rows")
        index = _ann.build(ix, live)
    else:
        say(f"{path.name}: adding {man.n_rows - covered:,} rows to the approximate index")
        index = _ann.read(target, man.ann["file"])
        _ann.add(index, ix, covered, man.n_rows, live)
    name = _ann.write(index, target)
    man.ann = {"file": name, "kind": "faiss IVF-SQ8, inner product", "n_rows": man.n_rows,
               "nlist": int(index.nlist), "nprobe": _ann.n_probe(index.nlist),
               "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip


def _remove_stray_ann(path: Path, man: Manifest | None) -> None:
    """Approximate-index files of this index that the manifest does not name (replaced ones,
    a killed run's). A reader that opened one keeps its mapping."""
    keep = ((man.ann if man else None) or {}).get("file")
    for p in path.parent.glob(f"{path.stem}.ann-*.faiss"):
        if p.name != keep:
            p.unlink(missing_ok=True)
    for p in path.parent.glob(f".{path.stem}.ann-*.faiss.tmp"):
        p.unlink(missing_ok=True)
