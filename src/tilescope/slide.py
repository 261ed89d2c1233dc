"""Open a whole-slide image with OpenSlide and read it at a physical resolution.

`Slide` is the only place that talks to OpenSlide. It knows dimensions, levels, mpp (with an
explicit override for slides that lack it) and how to read a region at a requested mpp from the
best pyramid level. It never exposes associated images (label, macro): they can carry patient
identifiers.
"""

from __future__ import annotations

import hashlib
import math
import sys
import threading
from dataclasses import dataclass
from functools import cached_property
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._resample import resize_rgb, rgb_array, rgb_image, scale_box
from ._resample import rgba_to_rgb as _rgba_to_rgb  # noqa: F401  (kept importable from here)
from ._torch_env import available_cpus
from .errors import (
    MissingMppError,
    RegionReadError,
    SlideError,
    SlideNotFoundError,
    UnsupportedFormatError,
)
from .pyramid import LazyLevel, Pyramid

if TYPE_CHECKING:
    from PIL import Image

#: File suffixes OpenSlide reads (the napari reader claims these).
SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".dcm",
)  # fmt: skip


def find_slides(folder: str | PathLike[str]) -> list[Path]:
    """The slide files under `folder` and its sub-folders, sorted (as a cohort is laid out:
    TCGA downloads put each slide in a folder of its own), by `SLIDE_SUFFIXES`.

    A DICOM slide is a folder of ``.dcm`` files, and OpenSlide opens it from any one of them:
    one ``.dcm`` per folder is listed. Hidden entries and Zarr stores (``*.zarr``, which may
    lie beside the slides) are skipped. Nothing is opened: a file that is not a slide after
    all is reported when it is.
    """
    root = Path(folder)
    found: list[Path] = []
    dicom_dirs: set[Path] = set()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).parts
        if any(p.startswith(".") or p.lower().endswith(".zarr") for p in rel):
            continue
        suffix = path.suffix.lower()
        if suffix not in SLIDE_SUFFIXES or not path.is_file():
            continue
        if suffix == ".dcm":
            if path.parent in dicom_dirs:
                continue
            dicom_dirs.add(path.parent)
        found.append(path)
    return found


#: Two resolutions closer than this (relative) count as equal: a 0.499 µm/px slide is read as
#: 0.5 µm/px without resampling.
MPP_TOLERANCE = 0.02

#: Recorded pixel sizes outside this range (µm/px) are treated as missing: whole-slide scanners
#: work between about 0.1 (100x) and 10 (1x); 72 or 96 dpi "resolutions" are not microscopes.
PLAUSIBLE_MPP = (0.05, 25.0)

_HEADER_BYTES = 1 << 20
#: Whole-slide reads above this many level pixels go strip by strip (bounded memory).
_MAX_READ_PX = 1 << 26
#: A region of at least this many pixels (a tissue-mask level, a strip) is painted in bands by
#: up to `_READ_THREADS` threads: OpenSlide decodes in C without the GIL, one handle per thread.
#: Measured on a 7,168 px JPEG level with 2 cores: 0.86 s in one call, 0.46-0.62 s in two bands.
_BAND_MIN_PX = 1 << 23
_READ_THREADS = 4


def _openslide() -> Any:
    """Import openslide with the bundled library from openslide-bin."""
    import openslide  # openslide-python finds openslide-bin's library by itself

    return openslide


@dataclass(frozen=True)
class SlideInfo:
    """Plain metadata of a slide, for printing and JSON."""

    path: str
    vendor: str
    dimensions: tuple[int, int]
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float | None
    mpp_y: float | None
    mpp_source: str
    objective_power: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "vendor": self.vendor,
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "mpp_x": self.mpp_x,
            "mpp_y": self.mpp_y,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
        }


class Slide:
    """A whole-slide image opened with OpenSlide.

    Parameters
    ----------
    path
        Any file OpenSlide opens (SVS, NDPI, MRXS, tiled TIFF, DICOM, ...).
    mpp
        Micrometres per pixel at level 0, overriding the slide's own value. Needed for slides
        that do not record it; ignored otherwise only if ``None``.

    Examples
    --------
    >>> with Slide("CMU-1-Small-Region.svs") as s:  # doctest: +SKIP
    ...     tile = s.read_region_mpp((1000, 1000), (224, 224), mpp=0.5)
    """

    def __init__(self, path: str | PathLike[str], *, mpp: float | None = None) -> None:
        self.path = Path(path)
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            raise SlideError(self.path, f"mpp override must be a positive number, got {mpp!r}")
        self._mpp_override = None if mpp is None else float(mpp)
        self._local = threading.local()
        self._handles: list[tuple[threading.Thread, Any]] = []
        self._lock = threading.Lock()
        self._check_file()
        _ = self._osr  # open now so a bad file fails here, not later

    # -- opening ----------------------------------------------------------------------------
    def _check_file(self) -> None:
        if not self.path.exists():
            raise SlideNotFoundError(self.path, "no such file; check the path")
        if not self.path.is_file():
            raise SlideNotFoundError(self.path, "is not a file (a folder?); pass the slide file")
        if self.path.stat().st_size == 0:
            raise UnsupportedFormatError(self.path, "the file is empty (0 bytes); copy it again")
        openslide = _openslide()
        try:
            vendor = openslide.OpenSlide.detect_format(str(self.path))
        except Exception as exc:  # OpenSlide raises on unreadable files
            raise UnsupportedFormatError(self.path, f"OpenSlide cannot read it ({exc})") from exc
        if vendor is None:
            with open(self.path, "rb") as fh:
                head = fh.read(4)
            if head in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):  # TIFF or BigTIFF
                size = self.path.stat().st_size
                raise UnsupportedFormatError(
                    self.path,
                    f"a TIFF file ({size:,} bytes) that OpenSlide cannot read as a slide: it may "
                    "be incomplete (a copy or download cut short: compare its size or checksum "
                    "with the source and copy it again), or a plain TIFF without tiles and "
                    "pyramid (convert it, e.g. with `vips tiffsave --tile --pyramid`)",
                )
            raise UnsupportedFormatError(
                self.path,
                "not a whole-slide image OpenSlide can read (formats: SVS, NDPI, MRXS, SCN, "
                "VMS, BIF, DICOM, tiled pyramidal TIFF); plain PNG/JPEG or strip TIFFs are not "
                "slides",
            )

    @property
    def _osr(self) -> Any:
        """This thread's OpenSlide handle (one per thread, as tiffslide does)."""
        osr = getattr(self._local, "osr", None)
        if osr is None:
            openslide = _openslide()
            try:
                osr = openslide.OpenSlide(str(self.path))
            except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as exc:
                raise UnsupportedFormatError(
                    self.path, f"OpenSlide failed to open it: {exc}"
                ) from exc
            self._local.osr = osr
            me = threading.current_thread()
            with self._lock:
                ended = [h for t, h in self._handles if not t.is_alive()]
                self._handles = [(t, h) for t, h in self._handles if t.is_alive()]
                self._handles.append((me, osr))
            for h in ended:  # threads that finished without close_thread_handle (pools)
                h.close()
        return osr

    def close_thread_handle(self) -> None:
        """Close the calling thread's handle, if any; the next read in this thread reopens one.

        Worker threads call this when they finish, so handles do not pile up on a long-lived
        `Slide`. Reads call it after a failure: OpenSlide leaves a handle in a permanent error
        state after any decode error.
        """
        osr = getattr(self._local, "osr", None)
        if osr is None:
            return
        self._local.osr = None
        with self._lock:
            self._handles = [(t, h) for t, h in self._handles if h is not osr]
        osr.close()

    def close(self) -> None:
        """Close every handle opened by any thread."""
        with self._lock:
            for _, osr in self._handles:
                osr.close()
            self._handles.clear()
        self._local = threading.local()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = f"{self.mpp_x:.4g}" if self.mpp_x else "unknown"
        return f"Slide({self.name!r}, {w}x{h}, {self.level_count} levels, mpp={mpp})"

    # -- metadata ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def properties(self) -> dict[str, str]:
        return dict(self._osr.properties)

    @cached_property
    def vendor(self) -> str:
        return self.properties.get("openslide.vendor", "unknown")

    @cached_property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return tuple(self._osr.dimensions)

    @cached_property
    def level_count(self) -> int:
        return int(self._osr.level_count)

    @cached_property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(d) for d in self._osr.level_dimensions)

    @cached_property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._osr.level_downsamples)

    @cached_property
    def _native_mpp(self) -> tuple[float | None, float | None, str]:
        props = self.properties
        x, y = _float(props.get("openslide.mpp-x")), _float(props.get("openslide.mpp-y"))
        if not (x and y):
            return None, None, "missing"
        lo, hi = PLAUSIBLE_MPP
        if not (lo <= x <= hi and lo <= y <= hi):
            # e.g. a TIFF saved at a screen's 72 dpi: 352.8 µm/px is no microscope's
            return None, None, f"implausible ({x:.4g} x {y:.4g} µm/px recorded)"
        return x, y, "slide"

    @property
    def mpp_x(self) -> float | None:
        return self._mpp_override or self._native_mpp[0]

    @property
    def mpp_y(self) -> float | None:
        return self._mpp_override or self._native_mpp[1]

    @property
    def mpp_override(self) -> float | None:
        """The level-0 µm per pixel given when opening, if any."""
        return self._mpp_override

    @property
    def mpp_source(self) -> str:
        return "override" if self._mpp_override else self._native_mpp[2]

    @property
    def has_mpp(self) -> bool:
        return self.mpp_x is not None

    @property
    def mpp(self) -> float:
        """Level-0 µm per pixel (mean of x and y). Raises `MissingMppError` if unknown."""
        if self.mpp_x is None or self.mpp_y is None:
            source = self.mpp_source
            what = (
                "does not record its pixel size (microns per pixel)"
                if source == "missing"
                else f"records a pixel size that is no microscope's: {source}"
            )
            raise MissingMppError(
                self.path,
                f"the slide {what}; pass it explicitly, e.g. `--slide-mpp 0.25` on the command "
                "line or `mpp=0.25` in Python",
            )
        return (self.mpp_x + self.mpp_y) / 2

    @cached_property
    def objective_power(self) -> float | None:
        return _float(self.properties.get("openslide.objective-power"))

    def info(self) -> SlideInfo:
        return SlideInfo(
            path=str(self.path),
            vendor=self.vendor,
            dimensions=self.dimensions,
            level_count=self.level_count,
            level_dimensions=self.level_dimensions,
            level_downsamples=self.level_downsamples,
            mpp_x=self.mpp_x,
            mpp_y=self.mpp_y,
            mpp_source=self.mpp_source,
            objective_power=self.objective_power,
        )

    def identity(self) -> dict[str, Any]:
        """What identifies this slide in a store's provenance (no associated images, no PHI)."""
        with open(self.path, "rb") as fh:
            header = hashlib.sha256(fh.read(_HEADER_BYTES)).hexdigest()
        return {
            "name": self.name,
            "size_bytes": self.path.stat().st_size,
            "dimensions": list(self.dimensions),
            "mpp": [self.mpp_x, self.mpp_y],
            "mpp_source": self.mpp_source,
            "header_sha256": header,
            "openslide_quickhash": self.properties.get("openslide.quickhash-1"),
        }

    # -- reading ----------------------------------------------------------------------------
    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level at or finer than `downsample` (within `MPP_TOLERANCE`)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + MPP_TOLERANCE):
                best = i
        return best

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `size` pixels at `level`; `location` in level-0 pixels.

        Areas outside the slide or transparent in it come back white (glass).
        """
        rgb = rgb_array(self.read_region_pil(location, level, size))
        return rgb if rgb.flags.writeable else rgb.copy()

    def read_region_pil(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        """A region as a Pillow image: RGB where it is opaque (nearly always inside a slide),
        else OpenSlide's straight RGBA (`tilescope._resample` composites it over white).
        Raises `RegionReadError`."""
        w, h = int(size[0]), int(size[1])
        return self.read_region_raw(location, level, (w, h)).tile(0, 0, w, h)

    def read_region_raw(
        self, location: tuple[int, int], level: int, size: tuple[int, int],
        *, out: np.ndarray | None = None,
    ) -> RawRegion:  # fmt: skip
        """A region as OpenSlide paints it, to cut tiles from (`RawRegion.tile`) without
        converting all of it. `out`: a uint32 buffer of at least w * h to paint into (reused
        by block readers; the region is valid until it is painted over).
        Raises `RegionReadError`."""
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise SlideError(self.path, f"region size must be positive, got {size}")
        if not 0 <= level < self.level_count:
            raise SlideError(self.path, f"level {level} out of range 0..{self.level_count - 1}")
        x, y = int(location[0]), int(location[1])
        try:
            if out is None and w * h >= _BAND_MIN_PX:
                bands = self._paint_bands(x, y, level, w, h)
                if bands is not None:
                    return bands
            return _paint(self._osr, x, y, level, w, h, out)
        except Exception as exc:
            self.close_thread_handle()  # the handle is now in an error state; reopen next time
            raise RegionReadError(
                self.path,
                f"failed to decode region at level-0 ({location[0]}, {location[1]}), "
                f"level {level}, size {w}x{h}: {exc}",
            ) from exc

    def _paint_bands(self, x: int, y: int, level: int, w: int, h: int) -> RawRegion | None:
        """A large region painted as horizontal bands by a few threads, into one buffer: the
        same pixels as one call (a band starts on a whole level pixel, so only on levels with
        an integer downsample). None where that cannot be done (one CPU, no low-level call)."""
        from concurrent.futures import ThreadPoolExecutor

        ds = float(self.level_downsamples[level])
        n = min(_READ_THREADS, available_cpus(), h)
        if n < 2 or not ds.is_integer() or _lowlevel_read() is None:
            return None
        buf = np.zeros((h, w), np.uint32)
        edges = np.linspace(0, h, n + 1).astype(int)

        def band(i: int) -> None:
            r0, r1 = int(edges[i]), int(edges[i + 1])
            try:
                _paint(self._osr, x, y + r0 * int(ds), level, w, r1 - r0, buf[r0:r1])
            finally:  # the pool's threads end here: their handles must not pile up
                self.close_thread_handle()

        with ThreadPoolExecutor(n, thread_name_prefix="tilescope-read") as pool:
            list(pool.map(band, range(n)))  # re-raises a band's error
        return RawRegion(buf)

    def read_region_mpp(
        self, location: tuple[int, int], size: tuple[int, int], *, mpp: float
    ) -> np.ndarray:
        """Read `size` (w, h) pixels at `mpp` µm/px whose top-left is `location` (level 0).

        Reads from the closest level at or finer than `mpp` and resizes with antialiasing, unless
        that level is already within `MPP_TOLERANCE` of `mpp`.
        """
        return self.read_scaled(location, size, self.downsample_for_mpp(mpp))

    def read_scaled(
        self, location: tuple[int, int], size: tuple[int, int], downsample: float
    ) -> np.ndarray:
        """`size` (w, h) pixels at `downsample` level-0 px per pixel, top-left at `location`.

        Reads the best level at or finer than `downsample`. Unless that level's downsample is
        `downsample` itself, it reads ``round(w * s) x round(h * s)`` level pixels (``s`` level
        pixels per output pixel) and scales them with the kernels every tile reader uses
        (`tilescope._resample`: a box mean for an exact integer factor, else Lanczos).
        """
        level, (lw, lh) = self.scaled_read_size(size, downsample)
        w, h = int(size[0]), int(size[1])
        if (lw, lh) == (w, h):
            return self.read_region(location, level, (w, h))
        img = rgb_image(self.read_region_pil(location, level, (lw, lh)))
        out = scale_box(img, (0, 0, lw, lh), (w, h))
        return out if out.flags.writeable else out.copy()

    def scaled_read_size(
        self, size: tuple[int, int], downsample: float
    ) -> tuple[int, tuple[int, int]]:
        """The level `read_scaled` reads for `size` pixels at `downsample`, and how many level
        pixels (w, h) it reads there."""
        level = self.best_level_for_downsample(downsample)
        scale = downsample / self.level_downsamples[level]  # level pixels per output pixel
        w, h = int(size[0]), int(size[1])
        if abs(scale - 1) <= 1e-9:
            return level, (w, h)
        return level, (max(1, round(w * scale)), max(1, round(h * scale)))

    def downsample_for_mpp(self, mpp: float) -> float:
        """Level-0 pixels per pixel at `mpp`, snapped to a pyramid level's downsample within
        `MPP_TOLERANCE` (so a 0.499 µm/px slide is read at 0.5 without resampling, and the grid
        and the tile reads agree on every level)."""
        if not (math.isfinite(mpp) and mpp > 0):
            raise SlideError(self.path, f"target mpp must be positive, got {mpp!r}")
        ds = mpp / self.mpp
        for level_ds in self.level_downsamples:
            if abs(ds / level_ds - 1) <= MPP_TOLERANCE:
                return level_ds
        return ds

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB uint8 thumbnail whose longer side is `max_size` (or the slide's, if smaller)."""
        return self.read_level_downsampled(max(1.0, max(self.dimensions) / max_size))

    def read_level_downsampled(self, downsample: float) -> np.ndarray:
        """The whole slide at `downsample` level-0 px per pixel, from the best level.

        For masks and overviews. A slide without a coarse enough level (a single-level TIFF,
        say) is read in horizontal strips, each reduced at once, so memory stays bounded
        (slowly: every pixel is decoded).
        """
        w0, h0 = self.dimensions
        w, h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        level = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[level]
        if lw * lh <= _MAX_READ_PX:
            return self.read_scaled((0, 0), (w, h), downsample)
        level_ds = self.level_downsamples[level]
        rows = max(1, int(_MAX_READ_PX // 4 // lw * level_ds / downsample))  # output rows/strip
        out = np.empty((h, w, 3), np.uint8)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            y0, y1 = round(r0 * downsample), min(h0, round(r1 * downsample))
            strip = self.read_region((0, y0), level, (lw, max(1, round((y1 - y0) / level_ds))))
            out[r0:r1] = resize_rgb(strip, (w, r1 - r0))
        return out

    def multiscale(self, min_size: int = 1024) -> list[LazyLevel]:
        """Lazy array-likes for napari, finest first, down to at most `min_size` px: chunked,
        cached and tile-aligned (see `tilescope.pyramid`)."""
        return Pyramid(self, min_size=min_size).levels


class RawRegion:
    """A region as OpenSlide painted it: premultiplied ARGB (uint32, (h, w)); or, with an
    openslide-python that lacks the low-level call used here, its RGBA image."""

    __slots__ = ("argb", "image")

    def __init__(self, argb: np.ndarray | None, image: Image.Image | None = None) -> None:
        self.argb, self.image = argb, image

    def tile(self, x: int, y: int, w: int, h: int) -> Image.Image:
        """Pixels ``[x, x + w) x [y, y + h)``: RGB if all are opaque, else straight RGBA
        (as openslide-python un-premultiplies it). Only these pixels are converted."""
        from PIL import Image

        if self.argb is None:
            assert self.image is not None
            full = (x, y, w, h) == (0, 0, *self.image.size)
            return self.image if full else self.image.crop((x, y, x + w, y + h))
        view = self.argb[y : y + h, x : x + w]
        if view.min() >= 0xFF000000:  # opaque: premultiplied is the straight colour
            # unpacked straight from the region's rows (a stride), no copy of the tile first
            width = self.argb.shape[1]
            flat = self.argb.reshape(-1).view(np.uint8)
            start = (y * width + x) * 4
            rows = flat[start : start + ((h - 1) * width + w) * 4]
            return Image.frombuffer("RGB", (w, h), rows, "raw", _ARGB_RAWMODE, width * 4, 1)
        a = np.array(view)  # our own copy, converted in place
        _convert().argb2rgba(a)
        return Image.frombuffer("RGBA", (w, h), a, "raw", "RGBA", 0, 1)


#: How Pillow unpacks a native-endian ARGB word to RGB.
_ARGB_RAWMODE = "BGRX" if sys.byteorder == "little" else "XRGB"


def _convert() -> Any:
    from openslide import lowlevel

    return lowlevel._convert


def _lowlevel_read() -> Any:
    """openslide-python's low-level ``read_region`` into a caller's buffer, if this version
    has it (and the ARGB -> RGBA conversion that goes with it)."""
    lowlevel = sys.modules.get("openslide.lowlevel")
    if getattr(lowlevel, "_convert", None) is None:
        return None
    return getattr(lowlevel, "_read_region", None)


def _paint(osr: Any, x: int, y: int, level: int, w: int, h: int,
           out: np.ndarray | None) -> RawRegion:  # fmt: skip
    """`osr.read_region` into a buffer of ours, without openslide-python's conversion pass
    (tiles are converted one by one, opaque ones straight to RGB). Falls back to the public
    `read_region` where openslide-python's low-level call is not there."""
    import ctypes

    handle = getattr(osr, "_osr", None)
    read = _lowlevel_read()
    if handle is None or read is None:
        return RawRegion(None, osr.read_region((x, y), level, (w, h)))
    if out is None or out.size < w * h or out.dtype != np.uint32:
        buf = np.zeros((h, w), np.uint32)
    else:
        buf = out.reshape(-1)[: w * h].reshape(h, w)
    read(handle, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), x, y, level, w, h)
    return RawRegion(buf)


def _float(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except ValueError:
        return None
    return f if math.isfinite(f) and f > 0 else None
