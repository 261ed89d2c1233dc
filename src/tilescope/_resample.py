"""Pixel kernels shared by every reader of a slide: RGBA -> RGB, and scaling to a tile.

One set of kernels for the tile readers (`tilescope.tiles`), `Slide.read_scaled` (the napari
view, tissue detection) and `Slide.read_region`, so every reader of a slide agrees on every
pixel:

- **RGBA -> RGB** in integers, no float round trip. OpenSlide hands out straight RGBA; pixels
  with alpha < 255 (outside the slide, transparent areas) are composited over white with
  ``(c * a + 255 * (255 - a) + 127) // 255``; opaque pixels are copied as they are.
- **Scaling.** When the pixels read are an exact integer multiple ``f`` of the tile (``f * w``
  by ``f * h``), a box reduction: the mean of each ``f x f`` block, rounded half up (Pillow's
  `Image.reduce` in C for powers of two, where it is exact; numpy for other factors, where
  Pillow's fixed-point division is one grey level low on some sums). Any other factor:
  Pillow's antialiased Lanczos with ``reducing_gap=3`` (a box pre-reduction by
  ``int(factor / 3)``, then Lanczos), as before.
  An image is always cropped to its tile before it is scaled, so a tile cut from a larger
  read equals the tile read on its own, byte for byte.

`RESAMPLING` names this choice; stores record it (a notice-level field of the signature).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

#: What a store records about how tiles were resampled (``reader.resampling``).
RESAMPLING = "integer factors: box mean (round half up); other factors: lanczos, reducing_gap 3"
#: Lanczos pre-reduces by int(factor / REDUCING_GAP) with a box filter (Pillow's reducing_gap).
REDUCING_GAP = 3.0


def integer_factor(src: tuple[int, int], size: tuple[int, int]) -> int | None:
    """``f`` if `src` (w, h) is exactly ``f`` times `size` (w, h) on both axes, else None."""
    (sw, sh), (w, h) = src, size
    if w <= 0 or h <= 0 or sw % w or sh % h:
        return None
    f = sw // w
    return f if f >= 1 and sh // h == f else None


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """RGB uint8 (h, w, 3) from straight RGBA uint8 (h, w, 4), over white where alpha < 255.

    Opaque pixels are copied unchanged; the rest are blended in integers. RGB input is
    returned as a contiguous array.
    """
    if rgba.shape[-1] == 3:
        return np.ascontiguousarray(rgba)
    alpha = rgba[..., 3]
    rgb = np.ascontiguousarray(rgba[..., :3])
    if alpha.min() == 255:
        return rgb
    _composite(rgb, alpha)
    return rgb


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> None:
    """Blend `rgb` over white in place where `alpha` < 255 (fully transparent -> 255)."""
    where = alpha < 255
    a = alpha[where].astype(np.uint32)[:, None]
    rgb[where] = ((rgb[where] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def rgb_image(img: Image.Image) -> Image.Image:
    """An RGB Pillow image of an RGBA one (as OpenSlide returns), over white where needed.

    The opaque case (nearly every region inside a slide) is a single C conversion; regions
    with transparent pixels take the integer blend of `rgba_to_rgb`.
    """
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode != "RGBA":
        return img.convert("RGB")
    if _opaque(img):
        return img.convert("RGB")
    return Image.fromarray(_blend(img), "RGB")


def rgb_array(img: Image.Image) -> np.ndarray:
    """(h, w, 3) uint8 RGB of an RGBA Pillow image, over white where needed (`rgb_image`);
    possibly read-only. The opaque case is one C packing pass, no intermediate image."""
    if img.mode == "RGBA" and _opaque(img):
        raw = img.tobytes("raw", "RGB")
        return np.frombuffer(raw, np.uint8).reshape(img.height, img.width, 3)
    if img.mode == "RGBA":
        return _blend(img)
    return image_array(img)


def _opaque(img: Image.Image) -> bool:
    lo, _ = img.getchannel("A").getextrema()
    return bool(lo == 255)


def _blend(img: Image.Image) -> np.ndarray:
    rgba = np.asarray(img)
    rgb = np.ascontiguousarray(rgba[..., :3])  # a writable copy
    _composite(rgb, rgba[..., 3])
    return rgb


def image_array(img: Image.Image) -> np.ndarray:
    """(h, w, 3) uint8 array of an RGB Pillow image."""
    return np.asarray(img.convert("RGB") if img.mode != "RGB" else img)


def scale_box(
    img: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int]
) -> np.ndarray:
    """The pixels of `box` (x0, y0, x1, y1) of an RGB image, scaled to `size` (w, h).

    The box is cropped first (the result depends on the box's pixels only), then kept as is,
    box-reduced (exact integer factor) or Lanczos-resized (any other factor).
    """
    from PIL import Image

    x0, y0, x1, y1 = box
    w, h = size
    src = (x1 - x0, y1 - y0)
    if src == (w, h):
        return image_array(img.crop(box)) if box != (0, 0, *img.size) else image_array(img)
    f = integer_factor(src, (w, h))
    if f is not None and f & (f - 1) == 0:
        return image_array(img.reduce(f, box=box))  # reads only the box's pixels; exact
    if f is not None:
        return reduce_mean(image_array(img.crop(box)), f)
    tile = img.crop(box) if box != (0, 0, *img.size) else img
    out = tile.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    return image_array(out)


def reduce_mean(img: np.ndarray, f: int) -> np.ndarray:
    """Box reduction of (f*h, f*w, 3) uint8 by `f`: each output pixel is the mean of its
    ``f x f`` block, rounded half up (exact integers)."""
    h, w = img.shape[0] // f, img.shape[1] // f
    acc = np.zeros((h, w, img.shape[2]), np.uint32)
    for dy in range(f):
        for dx in range(f):
            acc += img[dy : f * h : f, dx : f * w : f]
    return ((acc + (f * f) // 2) // (f * f)).astype(np.uint8)


def resize_rgb(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 array to `size` (w, h): box mean for an exact integer factor,
    antialiased Lanczos otherwise (see the module)."""
    from PIL import Image

    w, h = size
    if img.shape[1] == w and img.shape[0] == h:
        return img
    pil = Image.fromarray(np.ascontiguousarray(img))
    return scale_box(pil, (0, 0, pil.width, pil.height), (w, h))
