"""Benchmark view first: from pressing Embed to a prompt heatmap over the view; one JSON object.

Run it under a virtual X server (napari needs one to draw)::

    xvfb-run -a -s "-screen 0 1920x1200x24" python benchmarks/bench_first_view.py

A 1600 x 1000 napari window with the *Embed slide* and *Prompt heatmap* widgets built as napari
builds them (``viewer.window.add_plugin_dock_widget``, a proxy of the viewer). The slide is the
synthetic benchmark slide of `_slides` at ``--scale 4`` (114,688 px at 0.25 µm/px, 39,107
tissue tiles of 224 px at 0.5 µm/px); the model the full-size BiomedCLIP architecture with
random weights (UNTRAINED: the scores mean nothing, the times are those of the real model),
loaded before anything is timed, on the faster of torch and OpenVINO measured here
(``--backend auto``: a few interleaved batches of each; or ask for one).

- ``seconds_to_first_view``: the user looks at about ``--view-tiles`` tiles of tissue and has
  typed prompts (pressed *Score prompts*: nothing embedded yet, so they wait);
  from pressing *Embed slide* until every tile of that view has a finite value in the heatmap
  layers (p(class)) napari shows. It includes tissue detection, creating the store, the readers
  starting, the model, and the live redraw (at most once a second). Goal < 15 s on this CPU.
  The view is in the middle of the first piece of tissue (top left), which grid order reaches
  early (after about 3,100 of 39,107 tiles): a conservative place for the ratio below.
  ``first_view`` splits the time: until the store existed, until the first rows reached the
  GUI, until the last of the view's rows did (``..._reported``), the tiles embedded by then,
  and how many of the first ``view_tiles`` rows embedded were the view's
  (``view_tiles_among_first_n``).
- ``baseline_grid_order_seconds``: the same, embedding in grid order (view first off).
  Measured when the extra tiles grid order embeds first would take less than
  ``--measure-baseline-below`` seconds at the measured rate (``"baseline_method": "measured"``),
  else computed (``"computed"``): the measured first view plus the tiles grid order hands out
  before the view's last tile (the exact `TileSchedule` order of a run without view first, block
  by block) minus those the view-first run had embedded at its first view, at
  ``tiles_per_s``. ``first_view_ratio`` = baseline / view first (> 1: view first is faster).
- ``pan_frame_ms_p95``: 95th percentile of one pan step (camera moved, Qt events processed and
  the canvas repainted twice: `bench_view.pan_frame_times`) while the slide is being embedded
  and the heatmap redraws live; ``--steps`` steps of a tenth of the canvas across the tissue and
  back. The order follows the camera meanwhile, as it does for a user.
- ``tiles_per_s``: the embedding rate over ``--rate-seconds`` with nobody panning, after the
  pans (the heatmap and coverage layers still redraw once a second; where this process's CPU
  went meanwhile, in cores by thread name: ``cores_by_thread_while_rate_measured``: the GUI
  thread, ``llvmpipe`` (software OpenGL), the model's threads...; the reader process is not
  in it). ``whole_slide_seconds`` =
  seconds until the store existed (tissue detection) + all tissue tiles / ``tiles_per_s`` (an
  estimate: the run is cancelled after the measurements).
- ``open_seconds``: opening the 100,000 x 100,000 px slide of `bench_view` as napari layers
  (its reader + ``add_image``), median of ``--reps``, with the widgets docked.

The machine is shared: ``load_avg_start`` / ``load_avg_end`` are ``os.getloadavg()``.
``--quick``: a smoke run (the 28,672 px slide, 2,300 tiles, the tiny untrained model, a few
steps); its figures say nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_view  # noqa: E402
from _slides import bench_slide, bench_spec  # noqa: E402

GOAL_S = 15.0
PROMPTS = "tumor: invasive carcinoma\nstroma: fibrous stroma\nbackground: blank glass"


# -- the model ----------------------------------------------------------------------------------
def build_encoder(backend: str, rounds: int, quick: bool) -> tuple[Any, dict[str, Any]]:
    """The encoder, on `backend` or (``auto``) on the faster of torch and OpenVINO, measured
    on random batches of each backend's own batch size, rounds interleaved (tiles/s)."""
    from tilescope.models import build_biomedclip_architecture, load_encoder

    if quick:
        return load_encoder("tiny-random", device="cpu"), {"chosen_by": "quick: tiny model"}
    enc = build_biomedclip_architecture(random_weights=True, device="cpu", backend="torch")
    images: dict[str, Any] = {"torch": enc._images}
    if backend in ("auto", "openvino"):
        from tilescope._openvino import OpenVINOImages
        from tilescope.errors import ModelError

        try:
            images["openvino"] = OpenVINOImages(enc)
        except ModelError as exc:  # not installed
            if backend == "openvino":
                raise
            print(f"bench_first_view: OpenVINO unavailable ({exc}); torch", file=sys.stderr)
    if backend != "auto":
        enc.set_image_backend(images[backend])
        enc.encode_images(np.zeros((enc.default_batch_size, 224, 224, 3), np.uint8))  # warm
        return enc, {"chosen_by": "--backend"}
    rates: dict[str, list[float]] = {name: [] for name in images}
    rng = np.random.default_rng(0)
    for r in range(rounds + 1):  # round 0 warms up
        for name, img in images.items():
            enc.set_image_backend(img)
            batch = rng.integers(0, 256, (enc.default_batch_size, 224, 224, 3), np.uint8)
            t = time.perf_counter()
            enc.encode_images(batch)
            if r:
                rates[name].append(len(batch) / (time.perf_counter() - t))
    med = {name: round(float(np.median(v)), 2) for name, v in rates.items()}
    best = max(med, key=lambda k: med[k])
    enc.set_image_backend(images[best])
    return enc, {"chosen_by": f"measured ({rounds} interleaved rounds)", "tiles_per_s": med}


# -- the window ---------------------------------------------------------------------------------
class Events:
    """Every event of the live results hub, with its time (held: the hub keeps it weakly)."""

    def __init__(self) -> None:
        from tilescope._napari._live import HUB

        self.events: list[tuple[float, Any]] = []
        HUB.subscribe(self.on_event)

    def on_event(self, event: Any) -> None:
        self.events.append((time.perf_counter(), event))

    def first(self, kind: str) -> float | None:
        return next((t for t, e in self.events if e.kind == kind), None)

    def rows(self) -> list[tuple[float, np.ndarray]]:
        return [(t, e.indices) for t, e in self.events if e.kind == "rows"]


def pump(until: Any, timeout: float, what: str) -> None:
    """Process Qt events until ``until()`` is true."""
    from qtpy.QtWidgets import QApplication

    t0 = time.perf_counter()
    while not until():
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"bench_first_view: no {what} after {timeout:.0f} s")
        QApplication.processEvents()
        time.sleep(0.005)


def choose_view(viewer: Any, slide: Any, layout: Any, centre_um: tuple[float, float],
                target: int) -> float:  # fmt: skip
    """Centre the camera on `centre_um` (world row, col) at the zoom whose view overlaps the
    number of tissue tiles nearest `target`; returns that zoom."""
    from tilescope._napari._viewfirst import view_box_l0

    cam = viewer.scene.camera
    best = (np.inf, 1.0)
    for zoom in np.geomspace(4.0, 0.1, 300):
        cam.center, cam.zoom = centre_um, float(zoom)
        n = len(view_tiles(layout, view_box_l0(viewer, slide)))
        best = min(best, (abs(n - target), float(zoom)))
    cam.center, cam.zoom = centre_um, best[1]
    return best[1]


def quiet(slide: Any, timeout: float = 30.0) -> None:
    """Wait until the slide layer's pyramid has read ahead what it queued for the view (its
    prefetch must not compete with the run being timed)."""
    pyramid = slide.data[0].pyramid
    pump(lambda: not pyramid._pf_queue, timeout, "end of the view's prefetch")
    time.sleep(0.5)  # the chunk being decoded when the queue emptied


def view_tiles(layout: Any, box: tuple[float, float, float, float]) -> np.ndarray:
    """Tiles of `layout` overlapping the level-0 view `box` (what view first puts first)."""
    from tilescope.regions import tiles_overlapping

    x0, y0, x1, y1 = box
    return tiles_overlapping(layout.coords, layout.tile_l0, [(x0, y0, x1 - x0, y1 - y0)])


class Cover:
    """Whether every tile of a view has a finite value in the p(class) heatmap layers."""

    def __init__(self, viewer: Any, slide: Any, layout: Any, tiles: np.ndarray,
                 store: Path) -> None:  # fmt: skip
        self.viewer, self.slide, self.store = viewer, slide, str(store)
        centre = layout.coords[tiles] + layout.tile_l0 / 2  # level-0 (x, y)
        self.world = [np.asarray(slide.data_to_world([y - 0.5, x - 0.5]), float)[-2:]
                      for x, y in centre]  # fmt: skip
        self._cells: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def layers(self) -> list[Any]:
        """The p(class) layers of this run's store (an earlier run's are updated in place)."""
        out = []
        for ly in self.viewer.layers:
            meta = ly.metadata.get("tilescope", {})
            if (ly.name.startswith("p(") and meta.get("role") == "prompt-heatmap"
                    and meta.get("store") == self.store):  # fmt: skip
                out.append(ly)
        return out

    def covered(self) -> bool:
        layers = self.layers()
        return bool(layers) and all(self._finite(ly).all() for ly in layers)

    def _finite(self, layer: Any) -> np.ndarray:
        if id(layer) not in self._cells:
            rc = np.round([np.asarray(layer.world_to_data(w), float)[-2:] for w in self.world])
            self._cells[id(layer)] = rc[:, 0].astype(int), rc[:, 1].astype(int)
        r, c = self._cells[id(layer)]
        data = np.asarray(layer.data)
        ok = (r >= 0) & (r < data.shape[0]) & (c >= 0) & (c < data.shape[1])
        out = np.zeros(len(r), bool)
        out[ok] = np.isfinite(data[r[ok], c[ok]])
        return out


def to_first_view(ctx: dict[str, Any], out_dir: Path, *, view_first: bool,
                  timeout: float) -> dict[str, Any]:  # fmt: skip
    """Type the prompts (waiting), press Embed, wait until the view's heatmap is whole."""
    from tilescope._napari import _embed_modes
    from tilescope._napari._viewfirst import view_box_l0

    viewer, slide, embed, heat = ctx["viewer"], ctx["slide"], ctx["embed"], ctx["heat"]
    embed._out_dir.value = out_dir
    heat._prompts.value = PROMPTS
    heat._run.native.click()  # no store yet: the prompts wait for the first tiles
    assert "nothing embedded yet" in str(heat._status.value), heat._status.value
    events = Events()
    real = _embed_modes.view_box_l0
    if not view_first:  # the widget without a view: grid order, as before view first
        _embed_modes.view_box_l0 = _no_view
    try:
        t0 = time.perf_counter()
        embed._run.native.click()
        pump(lambda: events.first("started") is not None, timeout, "store")
    finally:
        _embed_modes.view_box_l0 = real
    run = embed._active
    pump(lambda: run.schedule.bound, timeout, "tile order")  # bound once the readers start
    layout = run.schedule.layout
    tiles = view_tiles(layout, view_box_l0(viewer, slide))
    cover = Cover(viewer, slide, layout, tiles, run.request.store_path)
    pump(cover.covered, timeout, "heatmap over the view")
    t1 = time.perf_counter()
    rows = events.rows()
    need, t_view = set(tiles.tolist()), None
    for t, idx in rows:
        need -= set(idx.tolist())
        if not need and t_view is None:
            t_view = t
    order = np.concatenate([i for _, i in rows]) if rows else np.zeros(0, np.int64)
    return {
        "view_tiles_among_first_n": int(np.isin(order[: len(tiles)], tiles).sum()),
        "camera_moves_applied": run.tracker.moves if run.tracker is not None else None,
        "run": run,
        "events": events,
        "t0": t0,
        "tiles": tiles,
        "layout": layout,
        "seconds": t1 - t0,
        "seconds_to_store": events.first("started") - t0,  # type: ignore[operator]
        "seconds_to_first_rows": (rows[0][0] - t0) if rows else None,
        "seconds_view_rows_reported": (t_view - t0) if t_view is not None else None,
        "tiles_embedded": int(sum(len(i) for _, i in rows)),
    }


def _no_view(viewer: Any, layer: Any) -> Any:
    raise ValueError("view first off (baseline)")


def cancel(embed: Any, timeout: float = 300) -> None:
    embed._cancel.native.click()
    pump(lambda: bool(embed._run.enabled), timeout, "end of the cancelled run")


def hide_coverage(viewer: Any) -> None:
    """Hide the coverage layer of a run (not removed: a synchronous repaint right after a
    layer's removal crashes napari 0.9 / vispy 0.17 under Xvfb's software OpenGL)."""
    for layer in viewer.layers:
        if layer.metadata.get("tilescope", {}).get("role") == "embed-coverage":
            layer.visible = False


# -- the baseline -------------------------------------------------------------------------------
def grid_order_position(path: Path, layout: Any, tiles: np.ndarray, batch: int) -> int:
    """Tiles a run in grid order hands to the readers until every one of `tiles` is out (the
    exact order: `TileSchedule` without keys, in the stream's blocks)."""
    from tilescope._blocks import ReadPlan
    from tilescope.schedule import TileSchedule
    from tilescope.slide import Slide

    with Slide(path) as s:
        plan = ReadPlan.for_layout(s, layout, 224)
    sched = TileSchedule()
    sched.bind(layout, np.arange(len(layout)), plan.groups(layout))
    need, n = set(tiles.tolist()), 0
    while need:
        got = sched.take(batch)
        if got is None:
            break
        n += len(got)
        need -= set(got.tolist())
    return n


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads so far, summed by thread name
    (Linux ``/proc``; {} elsewhere); the main thread (napari's GUI) apart."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for task in Path("/proc/self/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip().rstrip("0123456789:-_ ")
            name = "GUI (main thread)" if task.name == str(os.getpid()) else name
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name or "?"] = out.get(name or "?", 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_shares(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """CPU used per thread name between two `thread_cpu` readings, in cores (1.0 = one core
    busy the whole time), largest first."""
    used = {k: (after[k] - before.get(k, 0.0)) / wall for k in after}
    return {k: round(v, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.01}


def steady_rate(events: Events, t_from: float) -> float:
    """Tiles per second from the rows reported after `t_from` (first batch's time excluded)."""
    rows = [(t, len(i)) for t, i in events.rows() if t >= t_from]
    if len(rows) < 2:
        return float("nan")
    return sum(n for _, n in rows[1:]) / (rows[-1][0] - rows[0][0])


# -- main ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "tilescope-bench"
    )
    ap.add_argument(
        "--scale", type=int, default=4, help="slide side in 28,672 px units (4: 39,107 tiles)"
    )
    ap.add_argument("--backend", choices=["auto", "torch", "openvino"], default="auto")
    ap.add_argument("--backend-rounds", type=int, default=2)
    ap.add_argument("--view-tiles", type=int, default=60)
    ap.add_argument("--steps", type=int, default=30, help="pan steps each way")
    ap.add_argument("--rate-seconds", type=float, default=45.0)
    ap.add_argument("--reps", type=int, default=3, help="openings of the 100,000 px slide")
    ap.add_argument("--measure-baseline-below", type=float, default=90.0)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--quick", action="store_true", help="smoke run: small slide, tiny model")
    args = ap.parse_args()  # fmt: skip
    if args.quick:
        args.scale, args.steps, args.rate_seconds, args.reps = 1, 4, 5.0, 1
    work = Path(tempfile.mkdtemp(prefix="tilescope-first-view-"))
    os.environ.setdefault("NAPARI_CONFIG", str(args.cache_dir / "napari-settings.yaml"))
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    os.environ["TILESCOPE_STORES"] = str(work / "default-stores")  # never the user's stores
    load_start = os.getloadavg()

    path = bench_slide(args.cache_dir, args.scale)
    spec = bench_spec(args.scale)
    view_path = bench_view.bench_slide(args.cache_dir, 4)
    bench_view.warm_page_cache(path)
    bench_view.warm_page_cache(view_path)
    t = time.perf_counter()
    enc, backend_info = build_encoder(args.backend, args.backend_rounds, args.quick)
    load_model_s = time.perf_counter() - t

    import napari
    from napari.settings import get_settings

    from tilescope._napari._common import register_encoder
    from tilescope.grid import TileGrid
    from tilescope.slide import Slide
    from tilescope.tissue import tissue_mask

    register_encoder(enc)  # "model already loaded": the widgets find it
    get_settings().experimental.async_ = False
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 1000)
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (512, 512, 3), np.uint8))
    bench_view.draw_frame(viewer)  # napari's first layer compiles shaders: not measured
    viewer.layers.clear()
    _, embed = viewer.window.add_plugin_dock_widget("tilescope", "Embed slide")
    _, heat = viewer.window.add_plugin_dock_widget("tilescope", "Prompt heatmap")
    bench_view.draw_frame(viewer)
    opened = bench_view.open_times(viewer, view_path, reps=args.reps, old=False)

    slide = viewer.open(str(path), plugin="tilescope")[0]
    embed._model.value = enc.model_id
    embed._device.value, embed._backend.value = "cpu", enc.backend
    with Slide(path) as s:  # the tiles Embed will find (the same detection, outside the timing)
        layout = TileGrid(target_mpp=0.5, tile_px=224).layout(s, tissue_mask(s))
    b = spec.blobs[0]
    zoom = choose_view(viewer, slide, layout, (b.cy, b.cx), args.view_tiles)
    bench_view.draw_frame(viewer)
    bench_view.wait_loaded(slide)
    quiet(slide)
    canvas = [int(v) for v in viewer.canvas.size]
    ctx = {"viewer": viewer, "slide": slide, "embed": embed, "heat": heat}

    first = to_first_view(ctx, work / "stores", view_first=True, timeout=args.timeout)
    width_um = canvas[1] / zoom
    start = (b.cy, b.cx)
    stop = (b.cy, b.cx + args.steps * width_um / 10)
    there = bench_view.pan_frame_times(viewer, start, stop, args.steps, layer=slide)
    back = bench_view.pan_frame_times(viewer, stop, start, args.steps, layer=slide)
    frames = np.concatenate([there["frame"], back["frame"]])
    t_rate, cpu0 = time.perf_counter(), thread_cpu()
    pump(lambda: time.perf_counter() - t_rate > args.rate_seconds, args.rate_seconds + 10, "")
    cpu = cpu_shares(cpu0, thread_cpu(), time.perf_counter() - t_rate)
    rate = steady_rate(first["events"], t_rate)
    rate_all = steady_rate(first["events"], first["t0"])
    cancel(embed)
    embedded = sum(len(i) for _, i in first["events"].rows())

    n_view = len(first["tiles"])
    pos = grid_order_position(path, first["layout"], first["tiles"], enc.default_batch_size)
    extra_s = max(0, pos - first["tiles_embedded"]) / rate
    baseline: dict[str, Any] = {"tiles_before_view_grid_order": pos}
    if extra_s < args.measure_baseline_below:
        shutil.rmtree(work / "stores")  # no store found: the prompts wait again
        hide_coverage(viewer)
        viewer.scene.camera.center, viewer.scene.camera.zoom = start, zoom
        bench_view.draw_frame(viewer)
        quiet(slide)
        grid = to_first_view(ctx, work / "stores-grid", view_first=False, timeout=args.timeout)
        cancel(embed)
        baseline.update(method="measured", seconds=grid["seconds"],
                        tiles_embedded=grid["tiles_embedded"])  # fmt: skip
    else:
        baseline.update(method="computed", seconds=first["seconds"] + extra_s)
    viewer.close()
    shutil.rmtree(work, ignore_errors=True)

    model = ("tiny-random (UNTRAINED)" if args.quick
             else "BiomedCLIP architecture, random weights (UNTRAINED)")  # fmt: skip
    print(json.dumps({
        "benchmark": "bench_first_view",
        "seconds_to_first_view": round(first["seconds"], 2),
        "goal_seconds": GOAL_S,
        "view_tiles": n_view,
        "whole_slide_seconds": round(first["seconds_to_store"] + len(first["layout"]) / rate),
        "whole_slide_estimate": "seconds until the store existed (tissue detection) + tissue "
                                "tiles / tiles_per_s (measured with nobody panning)",
        "baseline_grid_order_seconds": round(baseline["seconds"], 1),
        "baseline_method": baseline["method"],
        "first_view_ratio": round(baseline["seconds"] / first["seconds"], 2),
        "baseline": baseline,
        "open_seconds": opened["open_s"],
        "open_to_first_frame_seconds": opened["open_to_first_frame_s"],
        "pan_frame_ms_p95": round(float(np.percentile(frames, 95)), 1),
        "pan_frame_ms": bench_view.summary(frames),
        "pan_steps": 2 * args.steps,
        "tiles_per_s": round(rate, 2),
        "tiles_per_s_whole_run": round(rate_all, 2),
        "tiles_embedded_in_run": embedded,
        "cores_by_thread_while_rate_measured": cpu,
        "first_view": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in first.items()
                       if k in ("seconds_to_store", "seconds_to_first_rows",
                                "seconds_view_rows_reported", "tiles_embedded",
                                "view_tiles_among_first_n", "camera_moves_applied")},  # fmt: skip
        "backend": enc.backend,
        "backend_choice": backend_info,
        "batch_size": enc.default_batch_size,
        "device": str(enc.device),
        "model": model,
        "untrained": True,
        "model_load_seconds": round(load_model_s, 1),
        "quick": args.quick,
        "slide": {"file": path.name, "px": spec.width, "mpp": spec.mpp,
                  "tissue_tiles": len(first["layout"])},  # fmt: skip
        "window": [1600, 1000],
        "canvas_px": canvas,
        "zoom_screen_px_per_um": round(zoom, 3),
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
