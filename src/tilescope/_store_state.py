"""Reading a store's small arrays defensively, and the integrity rules they must follow.

`read_state` runs on every open (cheap: it reads ``coords``, ``grid_rc``, ``tissue`` and
``done`` chunk by chunk, and lists the ``embeddings`` chunk files without reading them);
`scan_embeddings` reads every embeddings chunk that holds a done row (the full check of
``tilescope check``, and of ``embed`` before it resumes). Nothing here writes.

The rules:

- every array has the documented shape and dtype, and ``embeddings`` is uncompressed with
  chunks of ``chunk_rows`` x D, so every chunk file has exactly ``chunk_rows * D * 4`` bytes;
- every chunk decodes; a chunk of format 2 that is missing reads as its fill value, which no
  written chunk holds (``done`` 255, ``coords`` and ``grid_rc`` -1, ``tissue`` NaN);
- ``done`` holds 0, 1 or 2 only, and a store marked complete has no 0;
- ``coords == origin + rint(grid_rc[:, ::-1] * stride_l0)``, ``grid_rc`` inside
  ``grid_shape`` in row-major order, and the layout
  agrees with the grid and the pixel size (``tile_l0 = tile_px * downsample`` and so on);
- every row marked done has an embeddings chunk of the right size, and (full check) a finite,
  unit-norm embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

TODO, DONE, FAILED, MISSING = 0, 1, 2, 255
#: A done row's embedding norm may differ from 1 by this much (float32 after the model).
NORM_TOLERANCE = 1e-2
#: The layout's downsample must give the target mpp from level0_mpp within this (the grid
#: snaps to pyramid levels within 2 %).
MPP_SNAP = 0.025
DTYPES = {
    "coords": np.int64,
    "grid_rc": np.int32,
    "tissue": np.float32,
    "embeddings": np.float32,
    "done": np.uint8,
}


@dataclass
class Problem:
    """One thing wrong with a store.

    ``array`` is the damaged array (None: the signature); ``rows`` the rows affected;
    ``repairable`` whether re-embedding those rows fixes it (else the layout or the
    signature is lost).
    """

    array: str | None
    message: str
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    repairable: bool = True

    def describe(self) -> str:
        where = f"{self.array}: " if self.array else ""
        return f"{where}{self.message}"


@dataclass
class StoreState:
    """The small arrays as read (damaged chunks replaced by neutral values) and what is wrong."""

    coords: np.ndarray
    grid_rc: np.ndarray
    tissue: np.ndarray
    flags: np.ndarray  # done flags; damaged chunks read as TODO
    problems: list[Problem]
    bad_done_chunks: list[int]  # chunks of ``done`` to rewrite on repair

    @property
    def layout_damaged(self) -> bool:
        return any(p.array in ("coords", "grid_rc", "tissue") for p in self.problems)


def _runs_text(rows: np.ndarray, limit: int = 4) -> str:
    rows = np.asarray(rows, np.int64)
    if not len(rows):
        return "no rows"
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    parts = [
        f"{int(r[0])}" if len(r) == 1 else f"{int(r[0])}-{int(r[-1])}"
        for r in np.split(rows, breaks)
    ]
    more = f" and {len(parts) - limit} more runs" if len(parts) > limit else ""
    return f"{len(rows)} rows ({', '.join(parts[:limit])}{more})"


def _read_chunked(
    arr: zarr.Array, rows: int, fill: Any
) -> tuple[np.ndarray, list[int], str | None]:
    """The whole array, chunk by chunk; undecodable chunks become `fill`. Returns the values,
    the bad chunk indices and the first error."""
    n = int(arr.shape[0])
    try:
        return np.asarray(arr[:]), [], None
    except Exception:  # noqa: BLE001 - find the bad chunks one by one below
        pass
    out = np.full(arr.shape, fill, dtype=arr.dtype)
    bad: list[int] = []
    first: str | None = None
    for c, start in enumerate(range(0, n, rows)):
        try:
            out[start : start + rows] = arr[start : start + rows]
        except Exception as exc:  # noqa: BLE001 - zarr and numcodecs raise many kinds
            bad.append(c)
            first = first or f"{type(exc).__name__}: {exc}"
    return out, bad, first


def check_metadata(p: Path, arrays: Mapping[str, zarr.Array], sig: Mapping[str, Any]) -> None:
    """Shapes, dtypes and the embeddings codec; raises `StoreCorruptError` (not repairable)."""
    from .errors import StoreCorruptError

    n, d = int(sig["n_tiles"]), int(sig["embed_dim"])
    shapes = {
        "coords": (n, 2), "grid_rc": (n, 2), "tissue": (n,), "embeddings": (n, d), "done": (n,),
    }  # fmt: skip
    for name, shape in shapes.items():
        if name not in arrays:
            raise StoreCorruptError(f"{p}: the array {name!r} is missing", array=name)
        arr = arrays[name]
        if tuple(arr.shape) != shape:
            raise StoreCorruptError(
                f"{p}: array {name!r} has shape {arr.shape}, expected {shape}", array=name
            )
        if arr.dtype != DTYPES[name]:
            raise StoreCorruptError(
                f"{p}: array {name!r} has dtype {arr.dtype}, expected "
                f"{np.dtype(DTYPES[name]).name} (its zarr.json was changed)",
                array=name,
            )
    emb = arrays["embeddings"]
    if emb.compressors or emb.filters or emb.chunks[1:] != (d,):
        raise StoreCorruptError(
            f"{p}: array 'embeddings' must be uncompressed with chunks of whole rows "
            "(its zarr.json was changed)",
            array="embeddings",
        )


def read_state(p: Path, arrays: Mapping[str, zarr.Array], sig: Mapping[str, Any]) -> StoreState:
    """Read the small arrays and check them against the rules (cheap; see the module)."""
    n = int(sig["n_tiles"])
    rows = max(1, int(arrays["done"].chunks[0]))
    problems: list[Problem] = []
    v2 = int(sig.get("format_version", 1)) >= 2

    def chunked(name: str, fill: Any) -> tuple[np.ndarray, list[int], str | None]:
        return _read_chunked(arrays[name], max(1, int(arrays[name].chunks[0])), fill)

    coords, bad_c, err_c = chunked("coords", -1)
    grid_rc, bad_g, err_g = chunked("grid_rc", -1)
    tissue, bad_t, err_t = chunked("tissue", np.nan)
    flags, bad_d, err_d = chunked("done", MISSING)
    for name, bad, err in (("coords", bad_c, err_c), ("grid_rc", bad_g, err_g),
                           ("tissue", bad_t, err_t)):  # fmt: skip
        if bad:
            r = max(1, int(arrays[name].chunks[0]))
            lost = np.concatenate([np.arange(c * r, min(n, (c + 1) * r)) for c in bad])
            problems.append(Problem(name, f"the chunks of {_runs_text(lost)} cannot be read "
                                    f"({err})", lost))  # fmt: skip

    # done flags: undecodable, missing (format 2 fill) or invalid chunks are unknown: re-embed
    invalid = ~np.isin(flags, (TODO, DONE, FAILED))
    bad_done = sorted(set(bad_d) | {int(i) // rows for i in np.flatnonzero(invalid)})
    if bad_done:
        lost = np.concatenate([np.arange(c * rows, min(n, (c + 1) * rows)) for c in bad_done])
        why = f"cannot be read ({err_d})" if bad_d else ("missing" if v2 else "invalid")
        problems.append(Problem("done", f"flags of {_runs_text(lost)} {why}", lost))
        for c in bad_done:
            flags[c * rows : (c + 1) * rows] = TODO
    if sig.get("complete") and not bad_done and np.any(flags == TODO):
        todo = np.flatnonzero(flags == TODO)
        problems.append(Problem("done", f"the store is marked complete but {_runs_text(todo)} "
                                "are not embedded", todo))  # fmt: skip

    problems += _layout_problems(sig, coords, grid_rc, tissue)
    problems += _chunk_file_problems(p, arrays["embeddings"], flags == DONE)
    return StoreState(coords, grid_rc, tissue, flags, problems, bad_done)


def _layout_problems(
    sig: Mapping[str, Any], coords: np.ndarray, grid_rc: np.ndarray, tissue: np.ndarray
) -> list[Problem]:
    out: list[Problem] = []
    lay, grid = sig["layout"], sig.get("grid") or {}
    try:
        ds, tile_l0 = float(lay["downsample"]), float(lay["tile_l0"])
        stride_l0 = float(lay.get("stride_l0", tile_l0))
        ox, oy = (int(v) for v in lay.get("origin", (0, 0)))
        g_rows, g_cols = (int(v) for v in lay.get("grid_shape", (2**62, 2**62)))
        mpp = float(np.mean(sig["level0_mpp"]))
    except (KeyError, TypeError, ValueError) as exc:
        return [Problem(None, f"the signature's layout is unreadable ({exc})", repairable=False)]
    meta: list[str] = []
    if "tile_px" in grid and not np.isclose(tile_l0, float(grid["tile_px"]) * ds, rtol=1e-6):
        meta.append(f"layout.tile_l0 {tile_l0:g} != tile_px {grid['tile_px']} x downsample {ds:g}")
    if "tile_px" in grid:
        stride_px = float(grid.get("stride_px", grid["tile_px"] - grid.get("overlap_px", 0)))
        if not np.isclose(stride_l0, stride_px * ds, rtol=1e-6):
            meta.append(f"layout.stride_l0 {stride_l0:g} != stride {stride_px:g} px x {ds:g}")
    if "target_mpp" in grid and not abs(ds * mpp / float(grid["target_mpp"]) - 1) <= MPP_SNAP:
        meta.append(
            f"level0_mpp {mpp:g} x downsample {ds:g} does not give target_mpp {grid['target_mpp']}"
        )
    slide_mpp = (sig.get("slide") or {}).get("mpp")
    if isinstance(slide_mpp, list) and None not in slide_mpp and sig["level0_mpp"] != slide_mpp:
        if not np.allclose(np.asarray(slide_mpp, float), np.asarray(sig["level0_mpp"], float)):
            meta.append(f"level0_mpp {sig['level0_mpp']} != the slide's mpp {slide_mpp}")
    if meta:
        out.append(Problem(None, "the signature was changed or damaged: " + "; ".join(meta),
                           repairable=False))  # fmt: skip
    n = len(coords)
    if not n:
        return out
    rc_bad = (grid_rc < 0).any(1) | (grid_rc[:, 0] >= g_rows) | (grid_rc[:, 1] >= g_cols)
    key = grid_rc[:, 0].astype(np.int64) * max(g_cols, 1) + grid_rc[:, 1]
    order_bad = np.zeros(n, bool)
    order_bad[1:] = np.diff(key) <= 0  # rows are tiles in row-major grid order, each once
    if rc_bad.any() or order_bad.any():
        rows = np.flatnonzero(rc_bad | order_bad)
        out.append(Problem("grid_rc", f"{_runs_text(rows)} lie outside the grid or out of order",
                           rows))  # fmt: skip
    expected = np.array([ox, oy]) + np.rint(grid_rc[:, ::-1].astype(np.float64) * stride_l0)
    off = (coords != expected.astype(np.int64)).any(1) | (coords < 0).any(1)
    if off.any():
        rows = np.flatnonzero(off)
        out.append(Problem("coords", f"{_runs_text(rows)} do not match the layout (tile origin "
                           f"{ox}, {oy}, stride {stride_l0:g} px)", rows))  # fmt: skip
    t_bad = ~np.isfinite(tissue) | (tissue < 0) | (tissue > 1)
    if t_bad.any():
        rows = np.flatnonzero(t_bad)
        out.append(Problem("tissue", f"{_runs_text(rows)} are not fractions in 0..1", rows))
    return out


def _chunk_file_problems(p: Path, emb: zarr.Array, done: np.ndarray) -> list[Problem]:
    """Done rows whose embeddings chunk file is missing or has the wrong size (no reading)."""
    n, d = int(emb.shape[0]), int(emb.shape[1])
    rows = max(1, int(emb.chunks[0]))
    size = rows * d * np.dtype(np.float32).itemsize
    bad: list[np.ndarray] = []
    why: set[str] = set()
    for c, start in enumerate(range(0, n, rows)):
        stop = min(n, start + rows)
        if not done[start:stop].any():
            continue
        f = p / "embeddings" / "c" / str(c) / "0"
        try:
            have = f.stat().st_size
        except FileNotFoundError:
            have = -1
        if have != size:
            why.add("missing" if have < 0 else f"{have} bytes, expected {size}")
            bad.append(start + np.flatnonzero(done[start:stop]))
    if not bad:
        return []
    lost = np.concatenate(bad)
    return [Problem("embeddings", f"the chunks of {_runs_text(lost)} marked done are "
                    f"{' / '.join(sorted(why))}", lost)]  # fmt: skip


def bad_embedding_rows(block: np.ndarray, done: np.ndarray) -> np.ndarray:
    """Offsets of done rows of `block` that are not finite unit vectors.

    One float32 pass: a NaN or an infinity anywhere in a row makes its norm non-finite (and a
    huge value overflows it), so the norm alone decides."""
    if not done.any():
        return np.zeros(0, np.int64)
    sub = block if done.all() else block[done]
    sub = np.asarray(sub, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", sub, sub))
    ok = np.abs(norms - 1.0) <= NORM_TOLERANCE  # False for NaN and inf
    return np.flatnonzero(done)[~ok]


def scan_embeddings(emb: zarr.Array, done: np.ndarray) -> list[Problem]:
    """Full check: read every embeddings chunk holding a done row (one chunk at a time)."""
    n = int(emb.shape[0])
    rows = max(1, int(emb.chunks[0]))
    unreadable: list[np.ndarray] = []
    wrong: list[np.ndarray] = []
    first: str | None = None
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        sel = done[start:stop]
        if not sel.any():
            continue
        try:
            block = np.asarray(emb[start:stop])
        except Exception as exc:  # noqa: BLE001 - zarr raises many kinds for damaged chunks
            first = first or f"{type(exc).__name__}: {exc}"
            unreadable.append(start + np.flatnonzero(sel))
            continue
        wrong.append(start + bad_embedding_rows(block, sel))
    out: list[Problem] = []
    if unreadable:
        lost = np.concatenate(unreadable)
        out.append(Problem("embeddings", f"the chunks of {_runs_text(lost)} marked done cannot "
                           f"be read ({first})", lost))  # fmt: skip
    bad = np.concatenate(wrong) if wrong else np.zeros(0, np.int64)
    if len(bad):
        out.append(Problem("embeddings", f"{_runs_text(bad)} marked done are not finite unit "
                           "vectors (zeroed or overwritten data)", bad))  # fmt: skip
    return out


def rows_text(rows: np.ndarray) -> str:
    """'N rows (a-b, c, ...)' for messages."""
    return _runs_text(rows)
