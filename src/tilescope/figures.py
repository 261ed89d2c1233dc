"""PNG figures without a display: a heatmap laid over the slide thumbnail, with a caption.

Used by ``tilescope score --png``, ``tilescope search --png`` and the headless demo. Pillow only
(no matplotlib, no napari).
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np

from .raster import Heatmap
from .slide import Slide

# Anchors of matplotlib's "inferno" (CC0), interpolated linearly: dark = low, yellow = high.
_INFERNO = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
     [250, 193, 39], [252, 255, 164]],
    dtype=np.float64,
)  # fmt: skip


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map values to RGB uint8 with the inferno ramp; NaN maps to black (mask it yourself)."""
    span = max(vmax - vmin, 1e-12)
    t = np.clip((np.nan_to_num(values, nan=vmin) - vmin) / span, 0, 1) * (len(_INFERNO) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_INFERNO) - 2)
    frac = (t - lo)[..., None]
    rgb = _INFERNO[lo] * (1 - frac) + _INFERNO[lo + 1] * frac
    return rgb.round().astype(np.uint8)


def overlay(
    thumbnail: np.ndarray,
    slide_dims: tuple[int, int],
    hm: Heatmap,
    *,
    alpha: float = 0.6,
    vmin: float | None = None,
    vmax: float | None = None,
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
    finite = hm.raster[np.isfinite(hm.raster)]
    lo = float(finite.min()) if vmin is None and finite.size else (vmin or 0.0)
    hi = float(finite.max()) if vmax is None and finite.size else (vmax or 1.0)
    colour = colorize(vals, lo, hi).astype(np.float32)
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
    slide_mpp: float | None = None,
    warning: str | None = None,
    max_size: int = 1024,
    vmin: float | None = None,
    vmax: float | None = None,
    boxes: Sequence[tuple[float, float, float, float]] = (),
    box_colour: tuple[int, int, int] = (0, 200, 255),
    marks: Sequence[tuple[float, float, float, float]] = (),
    mark_colour: tuple[int, int, int] = (40, 220, 40),
) -> Path:
    """Write `hm` over the slide's thumbnail to `out` (PNG), with the colour range in the caption.

    `boxes` (level-0 x, y, w, h; e.g. a query region) and `marks` (e.g. matches) are outlined
    on top in their colours.
    """
    with Slide(slide_path, mpp=slide_mpp) as slide:
        thumb = slide.thumbnail(max_size)
        dims = slide.dimensions
    finite = hm.raster[np.isfinite(hm.raster)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    img = overlay(thumb, dims, hm, vmin=lo, vmax=hi)
    if marks:
        img = draw_boxes(img, dims, marks, mark_colour, width=2)
    if boxes:
        img = draw_boxes(img, dims, boxes, box_colour)
    legend = f"colour: {lo:.3g} (dark purple) to {hi:.3g} (yellow); uncoloured = no tissue tile"
    return save_figure(img, out, [*caption, legend], warning=warning)
