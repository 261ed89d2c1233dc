"""Tissue detection on a low-resolution view of a slide.

`tissue_mask` reads one coarse pyramid level (never level 0 of a large slide), keeps pixels
that are coloured (saturation above an Otsu threshold) and not bright glass (optical density),
drops black borders and ink-black areas, and cleans the result with morphology whose sizes are
given in micrometres. The `TissueMask` it returns knows how many level-0 pixels one mask pixel
covers, so `TissueMask.box_fraction` gives the exact tissue fraction of any level-0 box, which
is what the tile grid needs.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from os import PathLike
from typing import Any

import numpy as np

from .slide import Slide


class NoTissueWarning(UserWarning):
    """A slide (or a region of it) appears to contain no tissue."""


@dataclass(frozen=True, eq=False)
class TissueMask:
    """A boolean tissue mask over a whole slide at low resolution.

    Attributes
    ----------
    mask
        Boolean (h, w) array; ``True`` is tissue. Mask pixel ``(i, j)`` covers the level-0 box
        ``[j * downsample, (j + 1) * downsample) x [i * downsample, (i + 1) * downsample)``.
    downsample
        Level-0 pixels per mask pixel, one value for x and y (they differ by less than a mask
        pixel over the whole slide).
    mpp
        Micrometres per mask pixel, if the slide's pixel size is known.
    params
        The detection parameters and the thresholds actually used, for provenance.
    """

    mask: np.ndarray
    downsample: float
    mpp: float | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if mask.ndim != 2:
            raise ValueError(f"a tissue mask must be 2-D (h, w), got shape {mask.shape}")
        object.__setattr__(self, "mask", mask.astype(bool, copy=False))
        ds = float(self.downsample)
        if not (math.isfinite(ds) and ds > 0):
            raise ValueError(f"mask downsample must be a positive number, got {self.downsample!r}")
        object.__setattr__(self, "downsample", ds)

    @property
    def shape(self) -> tuple[int, int]:
        """(h, w) of the mask in mask pixels."""
        return self.mask.shape[0], self.mask.shape[1]

    @property
    def fraction(self) -> float:
        """Fraction of the slide covered by tissue (0 for an empty mask)."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def is_empty(self) -> bool:
        """True if no pixel is tissue."""
        return not bool(self.mask.any())

    @cached_property
    def _integral(self) -> np.ndarray:
        """Summed-area table with a zero first row and column, shape (h + 1, w + 1)."""
        h, w = self.shape
        sat = np.zeros((h + 1, w + 1), np.float64)
        np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.float64), axis=1, out=sat[1:, 1:])
        return sat

    def _area_to(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Tissue area (mask px) in [0, u) x [0, v) for continuous mask coordinates.

        The summed-area table of a piecewise-constant mask is bilinear inside each cell, so
        bilinear interpolation of the table is exact.
        """
        h, w = self.shape
        sat = self._integral
        u = np.clip(u, 0.0, w)
        v = np.clip(v, 0.0, h)
        j = np.minimum(np.floor(u).astype(np.intp), max(w - 1, 0))
        i = np.minimum(np.floor(v).astype(np.intp), max(h - 1, 0))
        fu, fv = u - j, v - i
        s00, s01 = sat[i, j], sat[i, j + 1]
        s10, s11 = sat[i + 1, j], sat[i + 1, j + 1]
        return (s00 * (1 - fu) + s01 * fu) * (1 - fv) + (s10 * (1 - fu) + s11 * fu) * fv

    def box_fraction(self, x: Any, y: Any, width: float, height: float | None = None) -> np.ndarray:
        """Tissue fraction of level-0 boxes ``[x, x + width) x [y, y + height)``.

        Parameters
        ----------
        x, y
            Level-0 top-left corners; any shapes that broadcast together (e.g. a column of
            ``y`` and a row of ``x`` give a whole grid at once).
        width, height
            Box size in level-0 pixels (``height`` defaults to ``width``).

        Returns
        -------
        numpy.ndarray
            float32 fractions in [0, 1] with the broadcast shape of ``x`` and ``y``. Parts of a
            box outside the slide count as glass, so an edge box is judged on its whole area.
        """
        height = width if height is None else height
        if width <= 0 or height <= 0:
            raise ValueError(f"box size must be positive, got {width} x {height}")
        ds = self.downsample
        u0 = np.asarray(x, np.float64) / ds
        v0 = np.asarray(y, np.float64) / ds
        u1, v1 = u0 + width / ds, v0 + height / ds
        area = (
            self._area_to(u1, v1)
            - self._area_to(u0, v1)
            - self._area_to(u1, v0)
            + self._area_to(u0, v0)
        )
        frac = area / ((width / ds) * (height / ds))
        return np.clip(frac, 0.0, 1.0).astype(np.float32)


def tissue_mask(
    slide: Slide | str | PathLike[str],
    *,
    mask_mpp: float = 8.0,
    min_mask_px: int = 512,
    saturation_threshold: float | None = None,
    saturation_bounds: tuple[float, float] = (0.05, 0.20),
    min_optical_density: float = 0.05,
    black_level: int = 50,
    closing_um: float = 16.0,
    min_object_um2: float = 5_000.0,
    min_hole_um2: float = 20_000.0,
) -> TissueMask:
    """Detect tissue on a low-resolution view of `slide`.

    A pixel is tissue if it is coloured (HSV saturation at least an Otsu threshold computed on
    the slide, clipped to `saturation_bounds`), darker than glass (optical density of its
    darkest channel at least `min_optical_density`) and not black (some channel at least
    `black_level`, which removes black borders, empty scan areas and black ink). Small gaps are
    closed, specks removed and small holes filled, with sizes in micrometres.

    Parameters
    ----------
    slide
        An open `Slide` or a path to one (opened and closed here).
    mask_mpp
        Micrometres per mask pixel. The slide is read from the closest pyramid level at or
        finer than this, never at full resolution unless the slide is small.
    min_mask_px
        Small slides get a finer mask so its longer side has at least this many pixels (but
        never finer than level 0).
    saturation_threshold
        Fixed saturation threshold in [0, 1]; ``None`` (default) uses Otsu's method.
    saturation_bounds
        Clip range for the Otsu threshold, so a slide that is all glass (Otsu splits noise)
        or all tissue (Otsu splits pink from purple) still gets a sensible threshold.
    min_optical_density
        Minimum optical density (-log10 of transmitted light) of the darkest channel.
    black_level
        Pixels whose brightest channel is below this (0-255) are black, not tissue.
    closing_um
        Radius of the morphological closing that bridges small gaps.
    min_object_um2, min_hole_um2
        Tissue pieces smaller than this are removed; holes smaller than this are filled.

    Returns
    -------
    TissueMask
        Empty (with a `NoTissueWarning`) if nothing looks like tissue.

    Raises
    ------
    tilescope.errors.MissingMppError
        If the slide records no pixel size and none was given when opening it.

    Examples
    --------
    >>> tm = tissue_mask(Slide("CMU-1-Small-Region.svs"))  # doctest: +SKIP
    >>> round(tm.fraction, 1)  # doctest: +SKIP
    0.4
    """
    if not (math.isfinite(mask_mpp) and mask_mpp > 0):
        raise ValueError(f"mask_mpp must be a positive number, got {mask_mpp!r}")
    lo, hi = saturation_bounds
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"saturation_bounds must satisfy 0 <= low <= high <= 1, got {lo, hi}")
    params = {
        "mask_mpp": float(mask_mpp),
        "min_mask_px": int(min_mask_px),
        "saturation_threshold": saturation_threshold,
        "saturation_bounds": (float(lo), float(hi)),
        "min_optical_density": float(min_optical_density),
        "black_level": int(black_level),
        "closing_um": float(closing_um),
        "min_object_um2": float(min_object_um2),
        "min_hole_um2": float(min_hole_um2),
    }
    if isinstance(slide, Slide):
        return _detect(slide, **params)
    with Slide(slide) as opened:
        return _detect(opened, **params)


def _detect(slide: Slide, **p: Any) -> TissueMask:
    slide_mpp = slide.mpp  # raises MissingMppError with a helpful message
    w0, h0 = slide.dimensions
    ds = p["mask_mpp"] / slide_mpp
    ds = max(1.0, min(ds, max(w0, h0) / p["min_mask_px"]))
    rgb = slide.read_level_downsampled(ds)
    h, w = rgb.shape[:2]
    ds_eff = (w0 / w + h0 / h) / 2  # exact extent of the mask in level-0 px
    px_um = ds_eff * slide_mpp
    mask, sat_t = _classify(rgb, p)
    mask = _clean(mask, px_um, p)
    params = dict(p, saturation_threshold_used=sat_t, mask_downsample=ds_eff)
    tm = TissueMask(mask, ds_eff, px_um, params)
    if tm.is_empty:
        warnings.warn(
            f"{slide.name}: no tissue found (the slide looks like glass or empty); no tiles "
            "will be made. If it does hold tissue, lower `saturation_bounds` or "
            "`min_optical_density` of tissue_mask.",
            NoTissueWarning,
            stacklevel=3,
        )
    return tm


# optical density of each uint8 value, -log10 of transmitted light
_OD_LUT = -np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)

#: Otsu's threshold is computed on about this many pixels (a regular subsample).
_OTSU_SAMPLES = 1 << 20


def _classify(rgb: np.ndarray, p: dict[str, Any]) -> tuple[np.ndarray, float]:
    """Pixel-wise tissue decision; returns the raw mask and the saturation threshold used.

    Everything stays in small integers: HSV saturation ``(max - min) / max`` is compared as
    ``(max - min) * 255 >= t * max`` and optical density as a bound on the darkest channel.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    diff = mx - mn
    not_black = mx >= p["black_level"]
    # OD decreases with intensity: dense <=> darkest channel below this value
    dense_below = int(np.count_nonzero(_OD_LUT >= p["min_optical_density"]))
    if p["saturation_threshold"] is not None:
        sat_t = float(p["saturation_threshold"])
    else:
        step = max(1, math.isqrt(mx.size // _OTSU_SAMPLES))
        smx, sdiff = mx[::step, ::step], diff[::step, ::step]
        keep = smx >= p["black_level"]
        sat8 = sdiff[keep].astype(np.uint16) * 255 // smx[keep]
        # Otsu's foreground is strictly above its threshold value
        sat_t = (_otsu_uint8(sat8.astype(np.uint8)) + 0.5) / 255.0
        lo, hi = p["saturation_bounds"]
        sat_t = float(min(max(sat_t, lo), hi))
    t255 = math.ceil(sat_t * 255 - 1e-9)  # same as floor(sat * 255) >= t255
    coloured = diff.astype(np.uint16) * 255 >= mx.astype(np.uint16) * t255
    return coloured & not_black & (mn < dense_below), sat_t


def _otsu_uint8(values: np.ndarray) -> float:
    """Otsu threshold of uint8 values (0 if there is only one value or none)."""
    if values.size == 0:
        return 0.0
    from skimage.filters import threshold_otsu

    counts = np.bincount(values.ravel(), minlength=256)
    if np.count_nonzero(counts) < 2:
        return 0.0
    return float(threshold_otsu(hist=(counts, np.arange(256))))


def _clean(mask: np.ndarray, px_um: float, p: dict[str, Any]) -> np.ndarray:
    """Close gaps, drop specks, fill holes; sizes given in µm are converted to mask px."""
    from skimage.morphology import closing, disk

    if not mask.any():
        return mask
    radius = round(p["closing_um"] / px_um)
    if radius >= 1:
        mask = closing(mask, disk(radius))
    cap = 0.01 * mask.size  # on tiny slides µm-sized limits must not wipe everything out
    min_obj = int(min(p["min_object_um2"] / px_um**2, cap))
    min_hole = int(min(p["min_hole_um2"] / px_um**2, cap))
    if min_obj >= 1:
        mask = _remove_small(mask, min_obj, holes=False)
    if min_hole >= 1:
        mask = _remove_small(mask, min_hole, holes=True)
    return mask


def _remove_small(mask: np.ndarray, size: int, *, holes: bool) -> np.ndarray:
    """Remove objects (or fill holes) smaller than `size` px, across scikit-image versions."""
    from skimage import morphology

    func = morphology.remove_small_holes if holes else morphology.remove_small_objects
    if "max_size" in inspect.signature(func).parameters:  # scikit-image >= 0.26
        return func(mask, max_size=size - 1)
    if holes:  # older scikit-image: area_threshold / min_size are exclusive lower bounds
        return func(mask, area_threshold=size)
    return func(mask, min_size=size)
