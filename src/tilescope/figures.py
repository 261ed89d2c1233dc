"""PNG figures without a display, and the colour scales shared with napari.

A `ColorScale` says how a heatmap's values become colours: which colormap, which range, and
whether the range is *fixed* (probabilities: 0 to 1 on every slide, so two maps compare) or
*stretched* to the values of this one map (similarities: the best tile is always the brightest).
napari's layers (`tilescope._napari`) and these PNGs use the same scale and the same legend text
(`ColorScale.legend`), so a figure and the viewer never disagree about what a colour means.

`score_figure` (the slide label's class over the slide) and `similarity_figure` (a region
search) are the one place the CLI, the headless demo and the examples make their PNGs.
Pillow only (no matplotlib, no napari).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from .raster import Heatmap, TileGeometry, heatmap
from .slide import Slide

# Anchors of matplotlib's "inferno" and Google's "turbo" as napari draws them, 17 sampled
# evenly, interpolated linearly (within 7 of 255 of napari's colours everywhere).
_RAMPS = {
    "inferno": np.array(
        [[0, 0, 4], [11, 7, 36], [33, 12, 74], [60, 9, 101], [87, 16, 109], [112, 25, 110],
         [137, 34, 106], [163, 43, 97], [187, 55, 85], [209, 70, 68], [227, 89, 50],
         [241, 113, 30], [249, 141, 10], [252, 171, 15], [249, 202, 50], [242, 232, 101],
         [252, 255, 164]],
        dtype=np.float64,
    ),
    "turbo": np.array(
        [[48, 18, 59], [64, 64, 161], [70, 107, 227], [66, 147, 255], [41, 187, 236],
         [24, 220, 195], [49, 242, 153], [107, 253, 100], [163, 253, 60], [204, 237, 52],
         [237, 208, 58], [253, 174, 53], [251, 128, 34], [236, 82, 15], [210, 49, 5],
         [172, 23, 1], [122, 4, 3]],
        dtype=np.float64,
    ),
}  # fmt: skip
#: What the two ends of each colormap look like, for legends.
_ENDS = {
    "inferno": ("black", "yellow"),
    "turbo": ("dark blue", "dark red"),
    "viridis": ("purple", "yellow"),
    "magma": ("black", "light yellow"),
}
#: Said after every legend: tiles not embedded (glass, failed) are left uncoloured.
NO_TILE = "no colour = no embedded tile"


def finite_limits(values: Any) -> tuple[float, float]:
    """(min, max) of the finite values, widened if they are equal; (0, 1) if there are none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        pad = max(abs(lo) * 0.01, 1e-6)
        lo, hi = lo - pad, hi + pad
    return lo, hi


@dataclass(frozen=True)
class ColorScale:
    """How a heatmap's values map to colours, in napari and in the PNGs.

    ``fixed`` scales (probabilities) keep their range on every slide and every re-score;
    stretched ones span the finite values of the map they were made for.
    """

    quantity: str
    colormap: str
    vmin: float
    vmax: float
    fixed: bool

    @classmethod
    def probability(cls, colormap: str = "inferno") -> ColorScale:
        """Class probabilities: a fixed 0 to 1 scale."""
        return cls("probability", colormap, 0.0, 1.0, True)

    @classmethod
    def stretched(
        cls, values: Any, quantity: str = "cosine similarity", colormap: str = "turbo"
    ) -> ColorScale:
        """A scale spanning the finite `values` (e.g. a similarity map)."""
        lo, hi = finite_limits(values)
        return cls(quantity, colormap, lo, hi, False)

    @property
    def limits(self) -> tuple[float, float]:
        return self.vmin, self.vmax

    def legend(self) -> str:
        """One line: what the colours mean, e.g. ``probability, fixed scale: 0 (black) to 1
        (yellow); no colour = no embedded tile``."""
        low, high = _ENDS.get(self.colormap, ("low", "high"))
        how = "fixed scale" if self.fixed else "stretched to this map"
        return (
            f"{self.quantity}, {how}: {self.vmin:.3g} ({low}) to {self.vmax:.3g} ({high}); "
            f"{NO_TILE}"
        )


def colorize(values: np.ndarray, vmin: float, vmax: float, colormap: str = "inferno") -> np.ndarray:
    """Map values to RGB uint8 with a colormap ramp; NaN maps to the low end (mask it)."""
    ramp = _RAMPS[colormap]
    span = max(vmax - vmin, 1e-12)
    t = np.clip((np.nan_to_num(values, nan=vmin) - vmin) / span, 0, 1) * (len(ramp) - 1)
    lo = np.floor(t).astype(int).clip(0, len(ramp) - 2)
    frac = (t - lo)[..., None]
    rgb = ramp[lo] * (1 - frac) + ramp[lo + 1] * frac
    return rgb.round().astype(np.uint8)


def overlay(
    thumbnail: np.ndarray,
    slide_dims: tuple[int, int],
    hm: Heatmap,
    scale: ColorScale,
    *,
    alpha: float = 0.6,
) -> np.ndarray:
    """Blend a heatmap over a thumbnail of the whole slide (level-0 `slide_dims` = (w, h))."""
    th, tw = thumbnail.shape[:2]
    sx, sy = tw / slide_dims[0], th / slide_dims[1]  # thumbnail px per level-0 px
    ys, xs = np.mgrid[0:th, 0:tw]
    # level-0 position of each thumbnail pixel centre → raster cell
    col = np.floor(((xs + 0.5) / sx - hm.origin_l0[0]) / hm.cell_l0).astype(int)
    row = np.floor(((ys + 0.5) / sy - hm.origin_l0[1]) / hm.cell_l0).astype(int)
    h, w = hm.raster.shape
    inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    vals = np.full((th, tw), np.nan, np.float32)
    vals[inside] = hm.raster[row[inside], col[inside]]
    ok = np.isfinite(vals)
    colour = colorize(vals, scale.vmin, scale.vmax, scale.colormap).astype(np.float32)
    out = thumbnail[..., :3].astype(np.float32)
    out[ok] = (1 - alpha) * out[ok] + alpha * colour[ok]
    return out.round().astype(np.uint8)


def save_figure(
    image: np.ndarray,
    path: str | PathLike[str],
    caption: Sequence[str] = (),
    *,
    warning: str | None = None,
) -> Path:
    """Save `image` with caption lines below it (and a red `warning` banner) as PNG."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    lines = [_ascii(t) for t in ([warning] if warning else []) + list(caption)]
    line_h = 18
    pad = 6
    h, w = image.shape[:2]
    canvas = Image.new("RGB", (max(w, 480), h + pad * 2 + line_h * len(lines)), "white")
    canvas.paste(Image.fromarray(image[..., :3]), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = h + pad
    for i, line in enumerate(lines):
        fill = (200, 0, 0) if warning and i == 0 else (0, 0, 0)
        draw.text((pad, y), line, fill=fill, font=font)
        y += line_h
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _ascii(text: str) -> str:
    """Pillow's default font lacks some glyphs (em dash, µ): use plain equivalents."""
    return text.replace("\u2014", "-").replace("\u2013", "-").replace("\u00b5", "u")


def draw_boxes(
    image: np.ndarray,
    slide_dims: tuple[int, int],
    boxes: Sequence[tuple[float, float, float, float]],
    colour: tuple[int, int, int] = (0, 200, 255),
    width: int = 3,
) -> np.ndarray:
    """Outline level-0 boxes (x, y, w, h) on a whole-slide thumbnail."""
    from PIL import Image, ImageDraw

    th, tw = image.shape[:2]
    sx, sy = tw / slide_dims[0], th / slide_dims[1]
    pil = Image.fromarray(image[..., :3].copy())
    draw = ImageDraw.Draw(pil)
    for x, y, w, h in boxes:
        draw.rectangle([x * sx, y * sy, (x + w) * sx, (y + h) * sy], outline=colour, width=width)
    return np.asarray(pil)


def heatmap_figure(
    slide_path: str | PathLike[str],
    hm: Heatmap,
    out: str | PathLike[str],
    caption: Sequence[str] = (),
    *,
    scale: ColorScale | None = None,
    slide_mpp: float | None = None,
    warning: str | None = None,
    max_size: int = 1024,
    boxes: Sequence[tuple[float, float, float, float]] = (),
    box_colour: tuple[int, int, int] = (0, 200, 255),
    marks: Sequence[tuple[float, float, float, float]] = (),
    mark_colour: tuple[int, int, int] = (40, 220, 40),
) -> Path:
    """Write `hm` over the slide's thumbnail to `out` (PNG), with the scale's legend last.

    `scale` defaults to one stretched over the raster's values. `boxes` (level-0 x, y, w, h;
    e.g. a query region) and `marks` (e.g. matches) are outlined on top in their colours.
    """
    scale = scale or ColorScale.stretched(hm.raster, "value", "inferno")
    with Slide(slide_path, mpp=slide_mpp) as slide:
        thumb = slide.thumbnail(max_size)
        dims = slide.dimensions
    img = overlay(thumb, dims, hm, scale)
    if marks:
        img = draw_boxes(img, dims, marks, mark_colour, width=2)
    if boxes:
        img = draw_boxes(img, dims, boxes, box_colour)
    return save_figure(img, out, [*caption, f"colour: {scale.legend()}"], warning=warning)


def slide_call_line(pooled: Any) -> str:
    """``slide label: tumor (attention: tumor 0.712, stroma 0.201, ...)``."""
    scores = getattr(pooled, "scores", {})
    parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items(), key=lambda kv: -kv[1]))
    label, method = getattr(pooled, "label", "?"), getattr(pooled, "method", "")
    return f"slide label: {label} ({method}: {parts})"


def score_figure(
    slide_path: str | PathLike[str],
    store: Any,
    scores: Any,
    pooled: Any,
    out: str | PathLike[str],
    *,
    slide_mpp: float | None = None,
    warning: str | None = None,
) -> Path:
    """The slide label's class probability per tile over the slide (fixed 0-1 scale, as the
    napari heatmaps), captioned with the slide-level call: ``score -> winning class -> PNG``."""
    c = list(scores.classes).index(pooled.label)
    hm = heatmap(scores.probs[:, c], TileGeometry.from_store(store))
    caption = [f"P({pooled.label}) per tile", slide_call_line(pooled)]
    return heatmap_figure(slide_path, hm, out, caption, scale=ColorScale.probability(),
                          slide_mpp=slide_mpp, warning=warning)  # fmt: skip


def similarity_figure(
    slide_path: str | PathLike[str],
    store: Any,
    sim: np.ndarray,
    out: str | PathLike[str],
    *,
    boxes: Sequence[tuple[float, float, float, float]] = (),
    marks: Sequence[tuple[float, float, float, float]] = (),
    slide_mpp: float | None = None,
    warning: str | None = None,
) -> Path:
    """A similarity map (one value per tile, NaN = not embedded) over the slide, stretched as
    in napari's Region search; the query `boxes` in cyan, the matches `marks` in green."""
    hm = heatmap(sim, TileGeometry.from_store(store))
    caption = ["cosine similarity to the query region (cyan); top matches on this slide (green)"]
    return heatmap_figure(slide_path, hm, out, caption, scale=ColorScale.stretched(hm.raster),
                          slide_mpp=slide_mpp, warning=warning, boxes=boxes,
                          marks=marks)  # fmt: skip


def saved_scores_figure(
    slide_path: str | PathLike[str],
    store: Any,
    values: np.ndarray,
    out: str | PathLike[str],
    *,
    title: str,
    quantity: str = "probability",
    caption: Sequence[str] = (),
    slide_mpp: float | None = None,
    warning: str | None = None,
) -> Path:
    """One column of a saved score set (one value per tile, NaN = none) over the slide:
    probabilities on the fixed 0-1 scale of `score_figure`, similarities stretched in turbo
    as `similarity_figure`, anything else stretched in inferno."""
    hm = heatmap(np.asarray(values, dtype=np.float32), TileGeometry.from_store(store))
    if quantity == "probability":
        scale = ColorScale.probability()
    elif quantity == "similarity":
        scale = ColorScale.stretched(hm.raster)
    else:
        scale = ColorScale.stretched(hm.raster, quantity, "inferno")
    return heatmap_figure(slide_path, hm, out, [title, *caption], scale=scale,
                          slide_mpp=slide_mpp, warning=warning)  # fmt: skip
