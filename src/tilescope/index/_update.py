"""Building and updating a cohort index: find the stores, add new ones, drop removed or
replaced ones, compact, keep the approximate index in step. Crash-safe (see `update_model`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from .. import _fsops
from ..catalog import read_signature
from ..errors import IndexCorruptError, StoreError
from . import _ann
from ._layout import (
    INDEX_DIRNAME,
    Manifest,
    StoreEntry,
    check_array_meta,
    create_group,
    index_dir,
    index_name,
    model_identity,
    read_manifest,
    write_manifest,
)
from ._scan import MappedIndex, quantize_rows

Progress = Callable[[str], None]
#: Compact (rewrite aside) when more than this fraction of the rows would be dead.
COMPACT_FRACTION = 0.25
#: Rows read from a store at a time.
READ_ROWS = 65536


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
    stores: list[Found] = []
    others: list[Path] = []
    stack = [folder]
    while stack:
        here = stack.pop()
        try:
            entries = sorted(here.iterdir())
        except OSError:
            continue
        for e in entries:
            if e.name.startswith(".") or not e.is_dir() or (here == folder and e.name ==
                                                              INDEX_DIRNAME):  # fmt: skip
                continue
            sig = read_signature(e)
            if sig is not None:
                stores.append(Found(e.relative_to(folder).as_posix(), e, sig))
            elif e.suffix == ".zarr":
                others.append(e)
            else:
                stack.append(e)
    return sorted(stores, key=lambda f: f.rel), sorted(others)


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

    @property
    def changed(self) -> bool:
        return bool(self.added or self.dropped or self.rebuilt)


def _store_blocks(found: Found, model: dict[str, Any]) -> tuple[Any, Iterator[dict[str, Any]]]:
    """Open a store (checked) and yield its embedded rows in blocks, as index columns."""
    from ..store import EmbeddingStore

    st = EmbeddingStore.open(found.path)
    if not st.complete:
        raise StoreError(f"{found.path}: not complete")
    if model_identity(st.signature["model"]) != model or st.embed_dim != model.get(
        "embed_dim", st.embed_dim
    ):
        raise StoreError(f"{found.path}: made with another model")

    def blocks() -> Iterator[dict[str, Any]]:
        done = st.done
        for a in range(0, st.n_tiles, READ_ROWS):
            b = min(a + READ_ROWS, st.n_tiles)
            rows = np.flatnonzero(done[a:b])
            if not len(rows):
                continue
            emb = st.read_embeddings(a, b)[rows].astype(np.float16)
            yield {"embeddings": emb, "row": (rows + a).astype(np.int64),
                   "coords": st.coords[a + rows].astype(np.int64)}  # fmt: skip

    return st, blocks()


def _index_blocks(ix: MappedIndex, entry: StoreEntry) -> Iterator[dict[str, Any]]:
    """The rows of one store already in an index (for a compaction: no store read again)."""
    for a in range(entry.start, entry.stop, READ_ROWS):
        b = min(a + READ_ROWS, entry.stop)
        yield {"embeddings": _ann._rows_f32(ix, a, b).astype(np.float16),
               "row": ix.row[a:b].copy(), "coords": ix.coords[a:b].copy()}  # fmt: skip


class _Appender:
    """Writes rows at the end of the index arrays, whole chunks at a time."""

    def __init__(self, path: Path, start: int, chunk_rows: int) -> None:
        group = zarr.open_group(LocalStore(path), mode="r+", zarr_format=3,
                                use_consolidated=False)  # fmt: skip
        # every chunk gets its file, even one equal to the fill value (search maps the files)
        full: Any = {"write_empty_chunks": True}  # an ArrayConfigParams
        self.arrays = {k: a.with_config(full) for k, a in group.arrays()}
        self.pos, self.rows = start, chunk_rows
        self.buf: list[dict[str, np.ndarray]] = []
        self.n_buf = 0

    def add(self, cols: dict[str, np.ndarray], store_id: int) -> None:
        q8, scale, err, norm = quantize_rows(cols["embeddings"])
        n = len(q8)
        sid = np.full(n, store_id, np.int32)
        self.buf.append({**cols, "scan_i8": q8, "scan_scale": scale, "scan_err": err,
                         "scan_norm": norm, "store_id": sid})  # fmt: skip
        self.n_buf += n
        boundary = (self.pos // self.rows + 1) * self.rows
        if self.pos + self.n_buf >= boundary:
            self.flush(boundary - self.pos)

    def flush(self, upto: int | None = None) -> None:
        """Write all buffered rows, or those up to the last whole chunk past `upto`."""
        if not self.n_buf:
            return
        cols = {k: np.concatenate([b[k] for b in self.buf]) for k in self.buf[0]}
        n = self.n_buf if upto is None else upto + (self.n_buf - upto) // self.rows * self.rows
        end = self.pos + n
        for name, arr in self.arrays.items():
            if arr.shape[0] < end:
                arr.resize((end, *arr.shape[1:]))
            arr[self.pos : end] = cols[name][:n]
        self.pos = end
        rest = {k: v[n:] for k, v in cols.items()}
        self.buf = [rest] if len(rest["row"]) else []
        self.n_buf = len(rest["row"])


def _append(
    path: Path,
    man: Manifest,
    sources: list[tuple[Found | StoreEntry, Any, Iterator[dict[str, Any]]]],
    progress: Progress,
) -> list[StoreEntry]:
    """Append each source's rows at ``man.n_rows``; returns the new entries (not committed)."""
    app = _Appender(path, man.n_rows, man.chunk_rows)
    entries = []
    for i, (src, st, blocks) in enumerate(sources, 1):
        start = app.pos + app.n_buf
        sid = man.next_id
        man.next_id += 1
        for cols in blocks:
            app.add(cols, sid)
        stop = app.pos + app.n_buf
        if isinstance(src, StoreEntry):
            e = StoreEntry(**{**src.to_json(), "id": sid, "start": start, "stop": stop})
        else:
            e = StoreEntry(sid, src.rel, st.slide_name, st.generation, start, stop,
                           st.n_tiles, st.tile_l0, st.level0_mpp)  # fmt: skip
        entries.append(e)
        if i % 10 == 0 or i == len(sources):
            progress(f"  {i}/{len(sources)} stores, {stop:,} rows")
    app.flush()
    man.n_rows = app.pos
    return entries


def _open_sources(
    todo: list[Found], model: dict[str, Any], report: Report
) -> list[tuple[Found | StoreEntry, Any, Iterator[dict[str, Any]]]]:
    out: list[tuple[Found | StoreEntry, Any, Iterator[dict[str, Any]]]] = []
    for f in todo:
        try:
            st, blocks = _store_blocks(f, model)
        except (StoreError, OSError) as exc:
            report.skipped.append((f.rel, str(exc)))
            continue
        out.append((f, st, blocks))
        report.added.append(f.rel)
    return out


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
    lock_timeout: float = 0,
) -> Report:
    """Bring the index of one model in `folder` up to date with `stores` (its complete stores).

    New stores' rows are appended and the manifest, written last and atomically, commits
    them; a killed run leaves the previous manifest, which ignores rows past its ``n_rows``.
    Stores removed or replaced (another generation) have their rows dropped from the
    manifest. When more than `COMPACT_FRACTION` of the rows would be dead, or on `rebuild`,
    or for a new index, the whole index is written aside and swapped in (`_fsops.publish`).
    `ann`: "auto" (an approximate index from `min_ann_rows` live rows), "on" or "off".
    """
    from ._layout import CHUNK_ROWS, IndexLock

    say = progress or (lambda _m: None)
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
        rows = chunk_rows or (old.chunk_rows if old else CHUNK_ROWS)
        dead = (old.n_rows - sum(e.stop - e.start for e in keep)) if old else 0
        whole = old is None or rebuild or dead > COMPACT_FRACTION * max(old.n_rows, 1)
        if old is not None and not todo and not report.dropped:
            _fill(report, old)
            if not _want_ann(old, ann, min_ann_rows):
                report.seconds = time.perf_counter() - t0
                return report
        if whole:
            _rewrite(path, model, model_id, keep, old, todo, want, rows, report, say,
                     ann=ann, min_rows=min_ann_rows)  # fmt: skip
        elif todo or report.dropped:
            assert old is not None
            sources = _open_sources(todo, model, report)
            say(f"{path.name}: adding {len(sources)} stores, dropping {len(report.dropped)}")
            new = _append(path, old, sources, say)
            old.stores = keep + new
            _ann_update(path, old, ann, min_ann_rows, say)
            write_manifest(path, old)
        else:
            assert old is not None
            _ann_update(path, old, ann, min_ann_rows, say)
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
    report: Report, say: Progress, *, ann: str, min_rows: int,
) -> None:  # fmt: skip
    """Write the whole index aside (kept rows copied from the old index) and swap it in."""
    tmp = _fsops.temp_path(path)
    d = int(model.get("embed_dim") or 0)
    sources: list[tuple[Found | StoreEntry, Any, Iterator[dict[str, Any]]]] = []
    ix = None
    if old is not None and keep:
        try:
            ix = MappedIndex(path, old)
        except IndexCorruptError as exc:  # read those stores again instead
            say(f"the index is damaged ({exc}); reading its stores again")
            todo = [want[e.path] for e in keep] + todo
    if ix is not None:
        d = ix.d
        sources += [(e, None, _index_blocks(ix, e)) for e in keep]
    opened = _open_sources(todo, model, report)
    if not d and opened:
        d = int(opened[0][1].embed_dim)
    if not d:  # nothing readable to index
        return
    man = Manifest(model=model, model_id=model_id, embed_dim=d, chunk_rows=rows)
    say(f"{path.name}: writing {'a new index' if old is None else 'the index again'} "
        f"({len(sources)} stores kept, {len(opened)} to read)")  # fmt: skip
    report.rebuilt = old is not None
    try:
        create_group(tmp, man)
        man.stores = _append(tmp, man, sources + opened, say)
        _ann_update(tmp, man, ann, min_rows, say, target=path)
        write_manifest(tmp, man)
        _fsops.publish(tmp, path)
    finally:
        if tmp.exists():
            _fsops.remove(tmp)


def _ann_update(
    path: Path, man: Manifest, ann: str, min_rows: int, say: Progress, target: Path | None = None
) -> None:
    """Build, extend or drop the approximate index so that it covers ``man``'s rows (those of
    the group at `path`, to be published at `target`)."""
    target = target or path
    if not _want_ann(man, ann, min_rows):
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
               "nlist": int(index.nlist), "nprobe": _ann.NPROBE,
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
