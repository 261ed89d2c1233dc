"""Synthetic pyramidal slides with known content, for tests, benchmarks and offline demos.

The content is a function of physical position (µm), so every pyramid level and every
resolution a reader asks for has an exact reference: `render(x_um, y_um)` gives the true colour,
`tissue_truth(...)` the true tissue mask. Tiles are generated one at a time, so a 100,000 px
slide is written in bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

TILE = 256


@dataclass(frozen=True)
class Blob:
    """An elliptic piece of tissue, centre and radii in µm."""

    cx: float
    cy: float
    rx: float
    ry: float


@dataclass(frozen=True)
class SyntheticSlide:
    """A description of a synthetic slide; `write()` puts it on disk."""

    width: int
    height: int
    mpp: float = 0.5
    blobs: tuple[Blob, ...] = field(default_factory=tuple)
    n_levels: int = 3
    level_factor: int = 4
    background: int = 243

    @classmethod
    def with_random_blobs(
        cls, width: int, height: int, mpp: float = 0.5, n: int = 4, seed: int = 0, **kw: object
    ) -> SyntheticSlide:
        rng = np.random.default_rng(seed)
        w_um, h_um = width * mpp, height * mpp
        blobs = []
        for _ in range(n):
            r = rng.uniform(0.08, 0.18) * min(w_um, h_um)
            blobs.append(
                Blob(
                    cx=float(rng.uniform(r, w_um - r)),
                    cy=float(rng.uniform(r, h_um - r)),
                    rx=float(r * rng.uniform(0.7, 1.0)),
                    ry=float(r * rng.uniform(0.7, 1.0)),
                )
            )
        return cls(width, height, mpp, tuple(blobs), **kw)  # type: ignore[arg-type]

    # -- content as a function of position --------------------------------------------------
    def tissue_truth(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Boolean tissue mask at the given µm coordinates (broadcast)."""
        inside = np.zeros(np.broadcast(x_um, y_um).shape, bool)
        for b in self.blobs:
            inside |= ((x_um - b.cx) / b.rx) ** 2 + ((y_um - b.cy) / b.ry) ** 2 <= 1.0
        return inside

    def render(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """RGB uint8 colour at µm coordinates (2-D grids); smooth, so resampling is exact-ish."""
        x_um, y_um = np.broadcast_arrays(x_um, y_um)
        tissue = self.tissue_truth(x_um, y_um)
        # H&E-like: a slow mix of eosin pink and haematoxylin purple, periods >= 40 µm.
        t = (
            0.5
            + 0.25 * np.sin(x_um / 23.0) * np.cos(y_um / 31.0)
            + 0.25 * np.sin((x_um + y_um) / 57.0)
        )
        pink = np.array([232.0, 150.0, 190.0])
        purple = np.array([110.0, 60.0, 150.0])
        col = pink * (1 - t[..., None]) + purple * t[..., None]
        out = np.where(tissue[..., None], col, float(self.background))
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def region(self, x0: float, y0: float, w: int, h: int, mpp: float) -> np.ndarray:
        """Reference (h, w, 3) image at `mpp` with top-left at level-0 pixel (x0, y0)."""
        xs = x0 * self.mpp + (np.arange(w) + 0.5) * mpp
        ys = y0 * self.mpp + (np.arange(h) + 0.5) * mpp
        return self.render(xs[None, :], ys[:, None])

    # -- writing ----------------------------------------------------------------------------
    def level_shapes(self) -> list[tuple[int, int]]:
        shapes = []
        for i in range(self.n_levels):
            ds = self.level_factor**i
            shapes.append((max(1, self.height // ds), max(1, self.width // ds)))
        return shapes

    def _tiles(self, level: int, sparse: bool = False) -> Iterator[np.ndarray | None]:
        ds = self.level_factor**level
        h, w = self.level_shapes()[level]
        for ty in range(0, h, TILE):
            for tx in range(0, w, TILE):
                # (tifffile needs the first tile to see the dtype: it is always written)
                if sparse and (tx or ty) and not self.may_hold_tissue(tx * ds, ty * ds, TILE * ds):
                    yield None  # left out of the file: OpenSlide reads it as transparent
                    continue
                tile = self.region(tx * ds, ty * ds, TILE, TILE, self.mpp * ds)
                # beyond the image edge tifffile still wants full tiles; keep them white
                tile[max(0, h - ty) :, :] = self.background
                tile[:, max(0, w - tx) :] = self.background
                yield tile

    def may_hold_tissue(self, x0: float, y0: float, size: float) -> bool:
        """Whether the level-0 square at (x0, y0) of side `size` meets a blob's bounding box."""
        x0, y0, size = x0 * self.mpp, y0 * self.mpp, size * self.mpp
        return any(
            x0 < b.cx + b.rx
            and b.cx - b.rx < x0 + size
            and y0 < b.cy + b.ry
            and b.cy - b.ry < y0 + size
            for b in self.blobs
        )

    def write(
        self,
        path: str | PathLike[str],
        *,
        kind: str = "tiff",
        quality: int = 90,
        sparse: bool = False,
    ) -> Path:
        """Write a tiled, JPEG-compressed pyramid. `kind` is "tiff" (generic) or "svs" (Aperio).

        `sparse` leaves tiles that meet no blob out of the file (as some scanners do with
        empty glass): a 100,000 px slide with little tissue is written in seconds and is a few
        MB. OpenSlide reads missing tiles as transparent, which `Slide` shows as white, so
        give a sparse slide ``background=255``.
        """
        import tifffile

        path = Path(path)
        if kind not in ("tiff", "svs"):
            raise ValueError(f"kind must be 'tiff' or 'svs', not {kind!r}")
        shapes = self.level_shapes()
        with tifffile.TiffWriter(path, bigtiff=self.width * self.height > 2**31) as tw:
            for level, (h, w) in enumerate(shapes):
                ds = self.level_factor**level
                kwargs: dict[str, Any] = {}
                if kind == "svs":
                    desc = (
                        f"Aperio Image Library v12.0.0\r\n{self.width}x{self.height} "
                        f"[0,0 {self.width}x{self.height}] ({TILE}x{TILE}) JPEG/RGB Q={quality}"
                    )
                    if level == 0:
                        desc += f"|AppMag = {round(10 / self.mpp)}|MPP = {self.mpp:.4f}"
                    kwargs.update(description=desc, metadata=None)
                else:
                    res = 1e4 / (self.mpp * ds)  # pixels per centimetre
                    kwargs.update(resolution=(res, res), resolutionunit="CENTIMETER", metadata=None)
                tw.write(
                    self._tiles(level, sparse),
                    shape=(h, w, 3),
                    dtype=np.uint8,
                    tile=(TILE, TILE),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": quality},
                    subfiletype=0 if level == 0 else 1,
                    **kwargs,
                )
        return path
