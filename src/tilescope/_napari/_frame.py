"""A slide layer's frame: its data -> world transform as plain numbers, and how a result layer
is placed in it (see `tilescope._napari._layers` for the coordinate convention)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..raster import Heatmap
from ..slide import SLIDE_SUFFIXES

_IDENTITY3 = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def slide_label(layer_name: str) -> str:
    """A slide layer's name without its file suffix, for result layer names."""
    low = layer_name.lower()
    for suffix in SLIDE_SUFFIXES:
        if low.endswith(suffix):
            return layer_name[: -len(suffix)]
    return layer_name


@dataclass(frozen=True)
class SlideFrame:
    """A slide layer's data -> world transform (2D, row/col order), its units and identity.

    Plain numbers, built on the main thread (`of_layer`) and usable from worker threads.
    """

    scale: tuple[float, float]
    translate: tuple[float, float] = (0.0, 0.0)
    rotate: tuple[tuple[float, float], tuple[float, float]] = ((1.0, 0.0), (0.0, 1.0))
    shear: float = 0.0
    affine: tuple[tuple[float, float, float], ...] = _IDENTITY3
    units: tuple[str, str] = ("pixel", "pixel")
    path: str = ""  # the slide file
    name: str = ""  # the slide layer's name

    @classmethod
    def of_layer(cls, layer: Any) -> SlideFrame:
        sy, sx = (float(v) for v in layer.scale[-2:])
        ty, tx = (float(v) for v in layer.translate[-2:])
        rot = np.asarray(layer.rotate, dtype=float)[-2:, -2:]
        shear = np.asarray(layer.shear, dtype=float).reshape(-1)
        aff = np.asarray(layer.affine.affine_matrix, dtype=float)[-3:, -3:]
        uy, ux = (str(u) for u in layer.units[-2:])
        meta = layer.metadata.get("tilescope", {})
        return cls(
            (sy, sx), (ty, tx), ((rot[0, 0], rot[0, 1]), (rot[1, 0], rot[1, 1])),
            float(shear[-1]) if shear.size else 0.0, tuple(tuple(r) for r in aff.tolist()),
            ("µm" if uy == "micrometer" else uy, "µm" if ux == "micrometer" else ux),
            str(meta.get("path", "")), str(layer.name),
        )  # fmt: skip

    @property
    def label(self) -> str:
        return slide_label(self.name) if self.name else "slide"

    @cached_property
    def _linear(self) -> np.ndarray:
        """R @ Sh @ diag(s): napari's composition of the data -> physical linear part."""
        shear = np.array([[1.0, self.shear], [0.0, 1.0]])
        return np.asarray(self.rotate) @ shear @ np.diag(self.scale)

    @cached_property
    def matrix(self) -> np.ndarray:
        """3x3 homogeneous data (row, col) -> world (row, col)."""
        m = np.eye(3)
        m[:2, :2], m[:2, 2] = self._linear, self.translate
        return np.asarray(self.affine) @ m

    def data_to_world(self, rc: ArrayLike) -> np.ndarray:
        rc = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
        return rc @ self.matrix[:2, :2].T + self.matrix[:2, 2]

    def world_to_data(self, rc: ArrayLike) -> np.ndarray:
        rc = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
        inv = np.linalg.inv(self.matrix)
        return rc @ inv[:2, :2].T + inv[:2, 2]

    def world_to_l0(self, rc: ArrayLike) -> np.ndarray:
        """(K, 2) world (row, col) -> (K, 2) level-0 corner coordinates (x, y)."""
        return (self.world_to_data(rc) + 0.5)[:, ::-1]

    def l0_to_world(self, xy: ArrayLike) -> np.ndarray:
        """(K, 2) level-0 corner coordinates (x, y) -> (K, 2) world (row, col)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        return self.data_to_world(xy[:, ::-1] - 0.5)

    def tile_centres(self, xy: np.ndarray, tile_l0: float) -> np.ndarray:
        """(N, 2) world (row, col) centres of tiles with top-left corners `xy`."""
        return self.l0_to_world(np.asarray(xy, dtype=np.float64) + tile_l0 / 2)

    def tile_rectangles(self, xy: np.ndarray, tile_l0: float, *, world: bool = True) -> np.ndarray:
        """(N, 4, 2) corners of tiles: top-left, top-right, bottom-right, bottom-left (napari's
        rectangle vertex order), in world (row, col), or in the slide's data frame."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        t = float(tile_l0)
        offsets = np.array([[0, 0], [t, 0], [t, t], [0, t]])  # (dx, dy)
        corners = (xy[:, None, :] + offsets[None]).reshape(-1, 2)
        out = self.l0_to_world(corners) if world else corners[:, ::-1] - 0.5
        return out.reshape(-1, 4, 2)

    def place(
        self, scale: Sequence[float] = (1.0, 1.0), offset: Sequence[float] = (0.0, 0.0)
    ) -> dict[str, Any]:
        """napari kwargs that put a layer's data index r at slide data ``offset + scale * r``."""
        c, o = np.asarray(scale, dtype=float), np.asarray(offset, dtype=float)
        return {
            "scale": tuple(float(v) for v in np.asarray(self.scale) * c),
            "translate": tuple(float(v) for v in np.asarray(self.translate) + self._linear @ o),
            "rotate": np.asarray(self.rotate),
            "shear": [self.shear],
            "affine": np.asarray(self.affine),
            "units": self.units,
        }

    def placement(self, hm: Heatmap) -> dict[str, Any]:
        """Placement kwargs that put raster cell (i, j) exactly over its tiles."""
        c, o = hm.world_scale_translate(1.0)  # in level-0 pixel-index units: slide data
        return self.place(c, o)

    def local(self, hm: Heatmap | None = None) -> dict[str, list[float]]:
        """The local placement recorded in metadata (`follow_slide` re-applies it)."""
        if hm is None:
            return {"scale": [1.0, 1.0], "offset": [0.0, 0.0]}
        c, o = hm.world_scale_translate(1.0)
        return {"scale": [float(v) for v in c], "offset": [float(v) for v in o]}

    def meta(self, role: str, **extra: Any) -> dict[str, Any]:
        """A result layer's ``metadata["tilescope"]``: its role and slide, and `extra`."""
        return {"role": role, "slide": self.path, "slide_layer": self.name, **extra}


def result_name(what: str, frame: SlideFrame, tag: str = "") -> str:
    """A result layer's name: what it shows, then its slide (``p(tumor) · CMU-1 [UNTRAINED]``),
    so results of two slides never share a layer."""
    return f"{what} · {frame.label}{tag}"
