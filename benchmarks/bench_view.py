"""Benchmark viewing a 100,000 x 100,000 px slide in napari; prints one JSON object.

Run it under a virtual X server (napari needs one to draw; ``QT_QPA_PLATFORM=offscreen``
renders black)::

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/bench_view.py

A 1600 x 1000 napari window; Tilescope's chunked, cached pyramid (`tilescope.pyramid`) and, in
the same run, the old path (each napari request one `Slide.read_scaled`, nothing cached:
`OldLazyLevel`, as it was in ``slide.py``). The slide: 100,000 x 100,000 px at 0.25 µm/px,
JPEG tiles of 256 px, every tile in the file, with 4x levels down to 1,562 px (as scanners
write them); a second one stops at 6,250 px (Aperio-style 1/4/16), where the overview must be
reduced from 39 MP.

- ``open_seconds``: the reader and the layer's creation (``viewer.add_image``, during which
  napari slices the layer synchronously: the thumbnail level and the first view). Median of
  ``--reps`` openings, each with a new pyramid. ``open_to_first_frame_seconds`` adds fitting
  the slide in view and drawing it. ``..._levels_to_6250``: the second slide.
- ``open_seconds_napari_floor``: ``viewer.add_image`` of two small in-memory levels: what
  napari itself takes to add a layer, with nothing to read.
- ``pan_frame_ms_p95``: 95th percentile of one pan step on the GUI thread: setting
  ``viewer.scene.camera.center``, then `draw_frame` (Qt events processed, then a synchronous
  repaint of the canvas, twice: the first draw slices the new view and uploads it, the second
  shows it). The pan crosses tissue at a mid zoom (0.8 screen px per µm: napari shows the
  1 µm/px level) in ``--steps`` steps of a tenth of the canvas width.
  ``pan_slice_ms_p95``: of that, the time in napari's slicing of the layer (asking the pyramid
  for the view), which is what the data path costs the GUI; the rest is drawing, the same for
  both paths (software OpenGL under Xvfb, slow on a loaded machine).
- ``repan_decodes``: chunks decoded on demand while panning back over the tissue just seen
  (goal 0); ``repan_prefetch_decodes``: chunks the background prefetch read meanwhile (the ring
  just outside the path).
- ``*_ratio`` = old / new (> 1: the new path is faster).
- ``async_*``: the same pan with napari's asynchronous slicing on: GUI time per step, and the
  time until the layer has the step's data (``layer.loaded``) and is drawn.

`pan_frame_times` is reusable: measure panning under other load (e.g. while embedding).

Usage::

    python benchmarks/bench_view.py [--cache-dir /tmp/tilescope-bench] [--steps 60] [--reps 3]
                                    [--no-old]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tilescope.synthetic import TILE, Blob, SyntheticSlide

SIZE = 100_000
MPP = 0.25
CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
#: Screen px per µm while panning: napari then shows the 1 µm/px level (level 1) at about 1:1.
ZOOM = 0.8
#: One large piece of tissue (µm): the pan runs along its middle.
BLOBS = (Blob(12500.0, 12500.0, 6500.0, 4000.0), Blob(19000.0, 6000.0, 2500.0, 2500.0))


# -- the slide ----------------------------------------------------------------------------------
def bench_slide(cache: Path, n_levels: int = 4) -> Path:
    """A 100,000 px square slide at 0.25 µm/px with `n_levels` 4x levels, written once.

    Every tile is in the file, as scanners write them: glass tiles repeat one encoded glass
    tile; tissue tiles are rendered (`SyntheticSlide`) at every level but level 0, whose
    tissue tiles repeat one flat tissue tile (level 0 is not read at the zooms measured).
    """
    path = cache / f"view_{SIZE}px_{n_levels}levels_v1.tif"
    if path.exists():
        return path
    import tifffile

    spec = SyntheticSlide(SIZE, SIZE, mpp=MPP, blobs=BLOBS, n_levels=n_levels)
    glass = _jpeg(np.full((TILE, TILE, 3), spec.background, np.uint8))
    flat = _jpeg(np.full((TILE, TILE, 3), (200, 120, 170), np.uint8))

    def tiles(level: int) -> Iterator[bytes]:
        ds = spec.level_factor**level
        h, w = spec.level_shapes()[level]
        for ty in range(0, h, TILE):
            for tx in range(0, w, TILE):
                if not spec.may_hold_tissue(tx * ds, ty * ds, TILE * ds):
                    yield glass
                elif level == 0:
                    c = np.array([[(tx + TILE / 2) * MPP]]), np.array([[(ty + TILE / 2) * MPP]])
                    yield flat if spec.tissue_truth(*c).any() else glass
                else:
                    tile = spec.region(tx * ds, ty * ds, TILE, TILE, MPP * ds)
                    tile[max(0, h - ty) :, :] = spec.background  # beyond the edge
                    tile[:, max(0, w - tx) :] = spec.background
                    yield _jpeg(tile)

    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for level, (h, w) in enumerate(spec.level_shapes()):
            res = 1e4 / (MPP * spec.level_factor**level)
            tw.write(tiles(level), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE),
                     photometric="rgb", compression="jpeg", subfiletype=0 if level == 0 else 1,
                     resolution=(res, res), resolutionunit="CENTIMETER", metadata=None)  # fmt: skip
    tmp.rename(path)
    return path


def _jpeg(tile: np.ndarray) -> bytes:
    """`tile` encoded as tifffile encodes a JPEG tile (the bytes of a one-tile TIFF)."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, tile, tile=(TILE, TILE), photometric="rgb", compression="jpeg",
                     metadata=None)  # fmt: skip
    buf.seek(0)
    with tifffile.TiffFile(buf) as tf:
        offset, count = tf.pages[0].dataoffsets[0], tf.pages[0].databytecounts[0]
    return buf.getvalue()[offset : offset + count]


# -- the old path (baseline) ---------------------------------------------------------------------
class OldLazyLevel:
    """The view before `tilescope.pyramid`: every napari request is one `read_scaled` of the
    best stored level (virtual levels resize a whole region of it), and nothing is cached."""

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, slide: Any, downsample: float) -> None:
        self.slide = slide
        self.downsample = float(downsample)
        w, h = slide.dimensions
        self.shape = (max(1, math.ceil(h / downsample)), max(1, math.ceil(w / downsample)), 3)
        self.size = int(np.prod(self.shape))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self[:, :, :]

    def __getitem__(self, key: Any) -> np.ndarray:
        ys, xs = key[:2]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        ds = self.downsample
        return self.slide.read_scaled((round(x0 * ds), round(y0 * ds)), (x1 - x0, y1 - y0), ds)


def old_multiscale(slide: Any, min_size: int = 1024) -> list[OldLazyLevel]:
    levels = [OldLazyLevel(slide, ds) for ds in slide.level_downsamples]
    while max(levels[-1].shape[:2]) > 2 * min_size:
        levels.append(OldLazyLevel(slide, levels[-1].downsample * 2))
    return levels


# -- measuring -----------------------------------------------------------------------------------
class ReadCounter:
    """Counts `Slide.read_region` calls (OpenSlide decodes, any thread) while installed."""

    def __init__(self) -> None:
        from tilescope.slide import Slide

        self.n = 0
        self._real = Slide.read_region
        counter = self

        def counted(slide: Any, *args: Any) -> np.ndarray:
            counter.n += 1
            return counter._real(slide, *args)

        Slide.read_region = counted  # type: ignore[method-assign]

    def close(self) -> None:
        from tilescope.slide import Slide

        Slide.read_region = self._real  # type: ignore[method-assign]


def draw_frame(viewer: Any) -> None:
    """Process pending Qt events and repaint the canvas synchronously, twice: the first draw
    lets napari slice the new view (synchronous slicing) and upload it, the second shows it."""
    from qtpy.QtWidgets import QApplication

    native = viewer.window._qt_viewer.canvas._scene_canvas.native
    for _ in range(2):
        QApplication.processEvents()
        native.repaint()


def pan_frame_times(
    viewer: Any,
    start: tuple[float, float],
    stop: tuple[float, float],
    steps: int,
    *,
    layer: Any = None,
) -> dict[str, np.ndarray]:
    """Move the camera centre from `start` to `stop` (world (row, col), µm) in `steps` equal
    steps and time each step (ms):

    - ``frame``: on the GUI thread, setting ``camera.center`` + `draw_frame` (with napari's
      synchronous slicing this includes reading the new view);
    - ``slice``: of that, the time in `layer`'s slicing (napari asking the pyramid for the
      view: decoding, assembling, the thumbnail), 0 when the view stays inside what napari
      has (only with a `layer` and synchronous slicing);
    - ``data``: until `layer` says ``loaded`` and the frame is drawn again (with napari's
      asynchronous slicing the data arrives after the frame; else equal to ``frame``).
    """
    from qtpy.QtWidgets import QApplication

    frame, data, sliced = np.empty(steps), np.empty(steps), np.zeros(steps)
    camera = viewer.scene.camera
    state = None if layer is None else layer._slicing_state
    real = None if state is None else state.set_view_slice
    current = [0]

    def timed() -> None:
        t = time.perf_counter()
        real()  # type: ignore[misc]
        sliced[current[0]] += (time.perf_counter() - t) * 1000

    if state is not None:
        state.set_view_slice = timed
    try:
        for i in range(steps):
            current[0] = i
            f = (i + 1) / steps
            centre = (start[0] + f * (stop[0] - start[0]), start[1] + f * (stop[1] - start[1]))
            t0 = time.perf_counter()
            camera.center = centre
            draw_frame(viewer)
            frame[i] = data[i] = (time.perf_counter() - t0) * 1000
            if layer is not None and not layer.loaded:
                while not layer.loaded and time.perf_counter() - t0 < 60:
                    QApplication.processEvents()
                    time.sleep(0.001)
                draw_frame(viewer)
                data[i] = (time.perf_counter() - t0) * 1000
    finally:
        if state is not None:
            del state.set_view_slice
    return {"frame": frame, "slice": sliced, "data": data}


def summary(ms: np.ndarray) -> dict[str, float]:
    return {
        "p50": round(float(np.percentile(ms, 50)), 1),
        "p95": round(float(np.percentile(ms, 95)), 1),
        "max": round(float(ms.max()), 1),
    }


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def wait_loaded(layer: Any, timeout: float = 120) -> None:
    from qtpy.QtWidgets import QApplication

    t0 = time.perf_counter()
    while not layer.loaded and time.perf_counter() - t0 < timeout:
        QApplication.processEvents()
        time.sleep(0.002)


def open_layer(viewer: Any, path: Path, *, old: bool) -> tuple[Any, dict[str, float]]:
    """Open `path` as Tilescope's reader does, fit it in view, and draw it; timings in s (with
    napari's asynchronous slicing, until the layer has its data and is drawn)."""
    from tilescope._napari._reader import read_slides
    from tilescope.slide import Slide

    t0 = time.perf_counter()
    data, kwargs, _ = read_slides(str(path))[0]
    if old:
        data = old_multiscale(Slide(path))
    t1 = time.perf_counter()
    layer = viewer.add_image(data, **kwargs)
    t2 = time.perf_counter()
    viewer.reset_view()
    draw_frame(viewer)
    if not layer.loaded:
        wait_loaded(layer)
        draw_frame(viewer)
    t3 = time.perf_counter()
    return layer, {"reader_s": t1 - t0, "add_layer_s": t2 - t1, "first_frame_s": t3 - t2,
                   "open_s": t2 - t0, "open_to_first_frame_s": t3 - t0}  # fmt: skip


def open_times(viewer: Any, path: Path, *, reps: int, old: bool) -> dict[str, float]:
    """Median of `reps` openings (each a new pyramid: nothing cached from the one before)."""
    from qtpy.QtWidgets import QApplication

    runs = []
    for _ in range(reps):
        layer, t = open_layer(viewer, path, old=old)
        if not old:
            layer.data[0].pyramid.close()
        viewer.layers.clear()
        QApplication.processEvents()
        runs.append(t)
    return {k: round(float(np.median([r[k] for r in runs])), 3) for k in runs[0]}


def pan_run(viewer: Any, path: Path, *, old: bool, steps: int, blob: Blob) -> dict[str, Any]:
    """Open, zoom to `ZOOM` at the left of `blob`, pan right across it, then back."""
    from qtpy.QtWidgets import QApplication

    layer, _ = open_layer(viewer, path, old=old)
    viewer.scene.camera.zoom = ZOOM
    width_um = viewer.window._qt_viewer.canvas.size[1] / ZOOM
    start = (blob.cy, blob.cx - 0.8 * blob.rx)
    stop = (blob.cy, start[1] + steps * width_um / 10)
    viewer.scene.camera.center = start
    draw_frame(viewer)
    wait_loaded(layer)
    slices: list[int] = []
    layer.events.set_data.connect(lambda e: slices.append(1))
    pyramid = None if old else layer.data[0].pyramid
    counter = ReadCounter()
    try:
        there = pan_frame_times(viewer, start, stop, steps, layer=layer)
        reads_there, slices_there = counter.n, len(slices)
        stats0 = None if pyramid is None else dict(vars(pyramid.stats))
        counter.n = 0
        back = pan_frame_times(viewer, stop, start, steps, layer=layer)
        reads_back, slices_back = counter.n, len(slices) - slices_there
    finally:
        counter.close()
    out: dict[str, Any] = {"data_level": int(layer.data_level)}
    for name, times in (("pan", there), ("pan_back", back)):
        out[f"{name}_frame_ms"] = summary(times["frame"])
        out[f"{name}_slice_ms"] = summary(times["slice"])
        if not _sync():
            out[f"{name}_data_ms"] = summary(times["data"])
    out.update(pan_reads=reads_there, pan_back_reads=reads_back, pan_new_views=slices_there,
               pan_back_new_views=slices_back)  # fmt: skip
    if pyramid is not None and stats0 is not None:
        st = pyramid.stats
        out["pan_back_demand_reads"] = (
            st.reads - st.prefetch_reads - (stats0["reads"] - stats0["prefetch_reads"])
        )
        out["pan_back_prefetch_reads"] = st.prefetch_reads - stats0["prefetch_reads"]
        out["cache_mib"] = round(pyramid.cache.nbytes / 2**20, 1)
        pyramid.close()
    viewer.layers.clear()
    QApplication.processEvents()
    return out


def _sync() -> bool:
    from napari.settings import get_settings

    return not get_settings().experimental.async_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    tmp = Path(tempfile.gettempdir()) / "tilescope-bench"
    ap.add_argument("--cache-dir", type=Path, default=tmp)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3, help="openings per measurement (median)")
    ap.add_argument("--no-old", action="store_true", help="skip the old path (baseline)")
    args = ap.parse_args()
    # the async setting changed below must not touch the user's napari settings file
    os.environ.setdefault("NAPARI_CONFIG", str(args.cache_dir / "napari-settings.yaml"))
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")

    t0 = time.perf_counter()
    path4, path3 = bench_slide(args.cache_dir, 4), bench_slide(args.cache_dir, 3)
    write_s = time.perf_counter() - t0
    warm_page_cache(path4)
    warm_page_cache(path3)
    load_before = os.getloadavg()

    import napari
    from napari.settings import get_settings

    get_settings().experimental.async_ = False
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (512, 512, 3), np.uint8))
    draw_frame(viewer)  # napari's first layer compiles shaders: not part of any measurement
    viewer.layers.clear()
    canvas = [int(v) for v in viewer.window._qt_viewer.canvas.size]

    # napari's own share of opening: the same layer over in-memory levels (nothing to read)
    floor = []
    for _ in range(args.reps):
        levels = [np.full((2 ** (11 - i), 2 ** (11 - i), 3), 200, np.uint8) for i in range(2)]
        t0 = time.perf_counter()
        viewer.add_image(levels, rgb=True, multiscale=True, contrast_limits=(0, 255))
        floor.append(time.perf_counter() - t0)
        viewer.layers.clear()
    opens: dict[str, Any] = {"napari_add_image_floor_s": round(float(np.median(floor)), 3)}
    slides = [("levels_to_1562", path4), ("levels_to_6250", path3)]
    if CMU.exists():  # a real single-level slide: every level above 0 is virtual
        slides.append(("cmu_small_region", CMU))
    for name, path in slides:
        for old in (False, True) if not args.no_old else (False,):
            key = f"{'old' if old else 'new'}_{name}"
            opens[key] = open_times(viewer, path, reps=args.reps, old=old)
    new = pan_run(viewer, path4, old=False, steps=args.steps, blob=BLOBS[0])
    old = None if args.no_old else pan_run(viewer, path4, old=True, steps=args.steps,
                                           blob=BLOBS[0])  # fmt: skip
    get_settings().experimental.async_ = True
    try:
        async_open = open_times(viewer, path4, reps=args.reps, old=False)
        asyn = pan_run(viewer, path4, old=False, steps=args.steps, blob=BLOBS[0])
    finally:
        get_settings().experimental.async_ = False
    viewer.close()

    def ratio(a: float | None, b: float) -> float | None:
        return None if a is None else round(a / max(b, 0.1), 2)

    o = opens
    result: dict[str, Any] = {
        "benchmark": "bench_view",
        "open_seconds": o["new_levels_to_1562"]["open_s"],
        "open_to_first_frame_seconds": o["new_levels_to_1562"]["open_to_first_frame_s"],
        "open_seconds_napari_floor": o["napari_add_image_floor_s"],
        "open_seconds_levels_to_6250": o["new_levels_to_6250"]["open_s"],
        "pan_frame_ms_p95": new["pan_frame_ms"]["p95"],
        "pan_slice_ms_p95": new["pan_slice_ms"]["p95"],
        "repan_decodes": new["pan_back_demand_reads"],
        "repan_prefetch_decodes": new["pan_back_prefetch_reads"],
        "pan_frame_ratio": ratio(old and old["pan_frame_ms"]["p95"], new["pan_frame_ms"]["p95"]),
        "pan_slice_ratio": ratio(old and old["pan_slice_ms"]["p95"], new["pan_slice_ms"]["p95"]),
        "repan_frame_ratio": ratio(
            old and old["pan_back_frame_ms"]["p95"], new["pan_back_frame_ms"]["p95"]
        ),
        "open_ratio": ratio(
            o.get("old_levels_to_1562", {}).get("open_s"), o["new_levels_to_1562"]["open_s"]
        ),
        "open_ratio_levels_to_6250": ratio(
            o.get("old_levels_to_6250", {}).get("open_s"), o["new_levels_to_6250"]["open_s"]
        ),
        "open_seconds_cmu": o.get("new_cmu_small_region", {}).get("open_s"),
        "open_ratio_cmu": ratio(
            o.get("old_cmu_small_region", {}).get("open_s"),
            o.get("new_cmu_small_region", {}).get("open_s", 1.0),
        ),
        "async_pan_frame_ms_p95": asyn["pan_frame_ms"]["p95"],
        "async_pan_data_ms_p95": asyn["pan_data_ms"]["p95"],
        "open": opens,
        "async_open": async_open,
        "pan_new": new,
        "pan_old": old,
        "pan_async": asyn,
        "canvas_px": canvas,
        "zoom_screen_px_per_um": ZOOM,
        "steps": args.steps,
        "slide": f"{SIZE}x{SIZE} px, {MPP} µm/px, JPEG tiles {TILE} px, 4x levels",
        "slide_write_seconds": round(write_s, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        },  # fmt: skip
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
