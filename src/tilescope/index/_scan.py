"""Exact search over the memory-mapped index: an int8 scan, then float16 rescoring within a
proven error bound, so the ranking is exactly the float16 embeddings' ranking.

Why int8 and a bound. One query over 1,000,000 x 512 reads 2 GB in float32, 1 GB in float16
and 512 MB in int8; on this class of machine the scan is bound by memory bandwidth, and numpy
has no fast float16 product (it converts element by element). So the scan reads the int8 copy
(``scan_i8``, one scale per row) with SIMD integer dot products (numkong's ``cdist``; int32
accumulation of int8 products is exact, and below 2**24 so exact in float32 too). For a unit
query q and a row e, with q~ and e~ their dequantised int8 forms,

    |q.e - q~.e~| = |q.(e - e~) + (q - q~).e~| <= ||q|| ||e - e~|| + ||q - q~|| ||e~||  =: eps

(Cauchy-Schwarz; the per-row norms are stored: ``scan_err``, ``scan_norm``). Candidates are
taken by this upper bound; once the k-th best *exact* float16 score among the rescored ones,
tau, is known, every row whose bound reaches tau must have been rescored (else more are); no
other row can enter the top k. So the result is the float16 top k, not an
approximation of it, and the only difference from float32 search is float16 rounding
(|error| < 1e-3 on a cosine; ties at that level may swap).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import IndexCorruptError
from ._layout import ARRAYS, Manifest, chunk_file

#: Slack added to the bound for float32 rounding in the scale products.
_ROUNDING = 1e-5


def quantize_rows(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """int8 rows, 1/scale, ||e - e~|| and ||e~|| of (n, D) rows (float16 values, as stored).

    The two norms bound the scan's error, so they are rounded up: computed in float32 (a sum
    of D squares is within D * 2**-24 of exact, relatively), then raised by 1e-4 relative.
    """
    e = np.asarray(emb, dtype=np.float32)
    peak = np.abs(e).max(axis=1)
    peak[peak == 0] = 1.0
    scale = np.float32(127.0) / peak
    q8 = np.rint(e * scale[:, None])
    np.clip(q8, -127, 127, out=q8)
    inv = np.float32(1.0) / scale
    back = q8 * inv[:, None]
    up = np.float32(1 + 1e-4)
    err = np.linalg.norm(e - back, axis=1) * up + np.float32(1e-7)
    norm = np.linalg.norm(back, axis=1) * up
    return q8.astype(np.int8), inv.astype(np.float32), err, norm


class MappedIndex:
    """The index's arrays, memory-mapped chunk by chunk (a snapshot of one manifest)."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path, self.manifest = path, manifest
        self.n, self.d, self.rows = manifest.n_rows, manifest.embed_dim, manifest.chunk_rows
        self.n_chunks = -(-self.n // self.rows)
        self._maps: dict[str, list[np.ndarray]] = {}
        for name in ("embeddings", "scan_i8"):
            self._maps[name] = [self._map(name, c) for c in range(self.n_chunks)]
        flat = {n: self._flat(n) for n in ARRAYS if n not in ("embeddings", "scan_i8")}
        self.scale, self.err, self.norm = flat["scan_scale"], flat["scan_err"], flat["scan_norm"]
        self.store_id, self.row = flat["store_id"], flat["row"]
        self.coords = flat["coords"].reshape(-1, 2)

    def _map(self, name: str, chunk: int) -> np.ndarray:
        dtype, wide = ARRAYS[name]
        width = self.d if wide else (2 if name == "coords" else 1)
        f = chunk_file(self.path, name, chunk)
        want = self.rows * width * np.dtype(dtype).itemsize
        try:
            size = f.stat().st_size
        except OSError:
            size = -1
        if size != want:
            raise IndexCorruptError(f"{self.path}: chunk {chunk} of {name} is missing or has "
                                    f"{size} bytes, not {want}; run `tilescope index "
                                    "--rebuild` on its folder")  # fmt: skip
        valid = min(self.rows, self.n - chunk * self.rows)
        m = np.memmap(f, dtype=dtype, mode="r", shape=(self.rows, width) if width > 1 or wide
                      else (self.rows,))  # fmt: skip
        return m[:valid]

    def _flat(self, name: str) -> np.ndarray:
        """A 1-D (or coords) array, read whole (a few bytes per row)."""
        parts = [np.asarray(self._map(name, c)) for c in range(self.n_chunks)]
        dtype = ARRAYS[name][0]
        if not parts:
            return np.zeros((0, 2) if name == "coords" else (0,), dtype=dtype)
        return np.concatenate(parts)

    def chunk_span(self, chunk: int) -> tuple[int, int]:
        a = chunk * self.rows
        return a, min(a + self.rows, self.n)

    # -- scoring -------------------------------------------------------------------------------
    def upper_bounds(self, query: np.ndarray) -> np.ndarray:
        """(n,) float32: an upper bound of each row's float16 score, from the int8 copy.

        ``int8 score + ||q|| err_i + ||q - q~|| norm_i`` (plus a little for float32 rounding):
        a row's own bound, so one row with an outlier component does not widen every row's.
        """
        import numkong as nk

        q = np.asarray(query, dtype=np.float64).reshape(-1)
        peak = float(np.abs(q).max()) or 1.0
        q8 = np.clip(np.rint(q * (127.0 / peak)), -127, 127).astype(np.int8)[None]
        q_inv = peak / 127.0
        q_err = float(np.linalg.norm(q - q8[0] * q_inv))
        out = np.empty(self.n, dtype=np.float32)
        for c in range(self.n_chunks):
            a, b = self.chunk_span(c)
            nk.cdist(q8, self._maps["scan_i8"][c], "dot", out=out[a:b].reshape(1, b - a),
                     out_dtype="float32")  # fmt: skip
        # out * scale * q_inv + ||q|| err + q_err norm (+ rounding), in place where possible
        np.multiply(out, self.scale, out=out)
        out *= np.float32(q_inv)
        out += np.float32(np.linalg.norm(q)) * self.err
        out += np.float32(q_err) * self.norm + np.float32(_ROUNDING)
        return out

    def rescore(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact scores of `rows` (global row numbers) from the float16 embeddings."""
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty(len(rows), dtype=np.float32)
        chunk = rows // self.rows
        for c in np.unique(chunk):
            sel = np.flatnonzero(chunk == c)
            local = rows[sel] - c * self.rows
            order = np.argsort(local, kind="stable")  # page order: fewer seeks on a cold file
            block = self._maps["embeddings"][int(c)][local[order]].astype(np.float32)
            out[sel[order]] = block @ q
        return out

    def exact_rows(self, query: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Exact float16 scores of the contiguous rows ``start:stop``."""
        return self.rescore(query, np.arange(start, stop))


def select(
    rows: np.ndarray, scores: np.ndarray, store_id: np.ndarray, k: int, per_slide: int | None
) -> np.ndarray:
    """Positions into `rows` of the best `k` (score descending, then row), at most
    `per_slide` per store."""
    order = np.lexsort((rows, -scores.astype(np.float64)))
    if per_slide is not None:
        sid = store_id[rows[order]]
        by = np.argsort(sid, kind="stable")
        s = sid[by]
        starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
        rank = np.empty(len(s), dtype=np.int64)
        rank[by] = np.arange(len(s)) - np.repeat(starts, np.diff(np.r_[starts, len(s)]))
        order = order[rank < per_slide]
    return order[:k]


def exact_top_k(
    ix: MappedIndex,
    query: np.ndarray,
    k: int,
    allowed: np.ndarray,
    per_slide: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Global rows and float16 scores of the exact top `k` among `allowed` rows, best first."""
    ub = ix.upper_bounds(query)
    ub[~allowed] = -np.inf
    n_ok = int(np.count_nonzero(allowed))
    if per_slide is not None:  # at most this many results exist under the cap
        n_ok_cap = int(np.minimum(np.bincount(ix.store_id[allowed]), per_slide).sum())
        k = min(k, n_ok_cap)
    k = min(k, n_ok)
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    m = min(n_ok, max(4 * k, k + 64) if per_slide is None else max(16 * k, 256))
    cand = np.flatnonzero(allowed) if m >= n_ok else np.argpartition(-ub, m - 1)[:m]
    while True:
        exact = ix.rescore(query, cand)
        pos = select(cand, exact, ix.store_id, k, per_slide)
        if len(pos) < k:  # the per-slide cap left too few: look further
            m = min(n_ok, m * 4)
            cand = np.flatnonzero(allowed) if m >= n_ok else np.argpartition(-ub, m - 1)[:m]
            continue
        tau = float(exact[pos[-1]])
        need = np.flatnonzero(ub >= tau)  # every row that could reach tau
        if len(need) <= len(cand) and np.isin(need, cand, assume_unique=True).all():
            return cand[pos], exact[pos]
        cand = np.union1d(cand, need)  # rescore them all: tau can only rise
