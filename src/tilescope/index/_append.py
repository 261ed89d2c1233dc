"""Writing rows into an index: the sources (stores, or an old index's rows), the appender, and
the hooks an update reports through and is stopped by."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from ..errors import StoreError
from . import _ann
from ._layout import Manifest, StoreEntry, model_identity
from ._scan import MappedIndex, quantize_rows

if TYPE_CHECKING:
    from ._update import Found, Report

Progress = Callable[[str], None]
RowsProgress = Callable[[int, int], None]
#: Rows read from a store at a time (a Cancel is seen between two blocks).
READ_ROWS = 65536
#: One source of rows: a store found in the folder (and the store opened) or an entry of the
#: old index (rows copied from it), and its rows as blocks of index columns.
Source = tuple["Found | StoreEntry", Any, Iterator[dict[str, Any]]]


def _quiet(*_args: Any) -> None:
    return None


def _never() -> bool:
    return False


@dataclass(frozen=True)
class Hooks:
    """How an update reports and is stopped: `say` (messages), `rows` (rows written so far
    in this update, rows it writes) and `stop` (polled between blocks of rows)."""

    say: Progress = _quiet
    rows: RowsProgress = _quiet
    stop: Callable[[], bool] = _never

    @classmethod
    def of(
        cls,
        progress: Progress | None = None,
        on_rows: RowsProgress | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Hooks:
        return cls(progress or _quiet, on_rows or _quiet, should_stop or _never)


def store_blocks(found: Found, model: dict[str, Any]) -> tuple[Any, Iterator[dict[str, Any]]]:
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


def index_blocks(ix: MappedIndex, entry: StoreEntry) -> Iterator[dict[str, Any]]:
    """The rows of one store already in an index (for a compaction: no store read again)."""
    for a in range(entry.start, entry.stop, READ_ROWS):
        b = min(a + READ_ROWS, entry.stop)
        yield {"embeddings": _ann._rows_f32(ix, a, b).astype(np.float16),
               "row": ix.row[a:b].copy(), "coords": ix.coords[a:b].copy()}  # fmt: skip


def open_sources(
    todo: list[Found], model: dict[str, Any], report: Report, hooks: Hooks | None = None
) -> list[Source]:
    """The stores to add, opened and checked; those that cannot be read go to
    ``report.skipped`` with the reason. A stop request ends the opening (`append` then
    writes nothing)."""
    out: list[Source] = []
    for f in todo:
        if hooks is not None and hooks.stop():
            break
        try:
            st, blocks = store_blocks(f, model)
        except (StoreError, OSError) as exc:
            report.skipped.append((f.rel, str(exc)))
            continue
        out.append((f, st, blocks))
    return out


def n_rows_of(source: Source) -> int:
    """Rows a source adds to the index (embedded rows of a store, rows of an old entry)."""
    src, st, _ = source
    return src.stop - src.start if isinstance(src, StoreEntry) else int(st.n_done)


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


def append(
    path: Path, man: Manifest, sources: list[Source], hooks: Hooks
) -> tuple[list[StoreEntry], bool]:
    """Append each source's rows at ``man.n_rows``: the new entries (not committed: the caller
    writes the manifest) and whether `hooks.stop` asked to stop.

    A stop is seen between two blocks of rows; the source being read then is left out (its rows
    past the new ``man.n_rows`` are ignored, and overwritten by the next update), so the
    entries returned are whole stores, ready to commit.
    """
    app = _Appender(path, man.n_rows, man.chunk_rows)
    entries: list[StoreEntry] = []
    total = sum(n_rows_of(s) for s in sources)
    committed, written, stopped = man.n_rows, 0, False
    hooks.rows(0, total)
    for i, (src, st, blocks) in enumerate(sources, 1):
        if hooks.stop():
            stopped = True
            break
        start = app.pos + app.n_buf
        sid = man.next_id
        man.next_id += 1
        for cols in blocks:
            app.add(cols, sid)
            written += len(cols["row"])
            hooks.rows(written, total)
            if hooks.stop():
                stopped = True
                break
        if stopped:
            break
        committed = stop = app.pos + app.n_buf
        if isinstance(src, StoreEntry):
            e = StoreEntry(**{**src.to_json(), "id": sid, "start": start, "stop": stop})
        else:
            e = StoreEntry(sid, src.rel, st.slide_name, st.generation, start, stop,
                           st.n_tiles, st.tile_l0, st.level0_mpp)  # fmt: skip
        entries.append(e)
        if i % 10 == 0 or i == len(sources):
            hooks.say(f"  {i}/{len(sources)} stores, {stop:,} rows")
    app.flush()
    man.n_rows = committed
    return entries, stopped
