"""The embedding pipeline: slide → tissue → grid → tile batches → encoder → store.

Resumable: rows already in the store are skipped; killing the process loses at most the batch
in flight. Progress is reported through a callback (CLI bar, napari progress bar, or nothing),
and the same work is available as a generator (`iter_embed_slide`) for napari's
``thread_worker``, whose Cancel closes the generator between batches.

Examples
--------
>>> from tilescope import embed_slide                              # doctest: +SKIP
>>> result = embed_slide("CMU-1-Small-Region.svs", "out/CMU-1.zarr")  # doctest: +SKIP
>>> result.n_tiles, result.store_path                              # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from . import _pipeline
from ._resample import RESAMPLING
from ._signature import jsonable
from .errors import NoTilesError, StoreNotice
from .grid import TileGrid, TileLayout
from .regions import Region, tiles_overlapping
from .slide import Slide
from .store import EmbeddingStore
from .tiles import Order, default_workers, stream_tiles
from .tissue import NoTissueWarning, tissue_mask

if TYPE_CHECKING:
    from .models import Encoder


@dataclass(frozen=True)
class EmbedProgress:
    """One progress report. ``done``/``total`` count tiles of this slide."""

    slide: str
    stage: str  # "tissue", "embedding", "done"
    done: int
    total: int
    elapsed: float
    rate: float  # tiles per second in this run
    failed: int = 0
    #: Rows of the batch just embedded and their embeddings (float32 (n, D), L2-normalised),
    #: so a live view can score new rows without reading the store; None in other reports.
    indices: np.ndarray | None = field(default=None, repr=False, compare=False)
    embeddings: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def eta(self) -> float | None:
        if self.rate <= 0:
            return None
        return (self.total - self.done) / self.rate


@dataclass(frozen=True)
class EmbedResult:
    store_path: Path
    n_tiles: int
    embedded_now: int
    failed: tuple[tuple[int, str], ...]
    seconds: float
    complete: bool
    trained_model: bool
    n_failed: int = 0  # rows of the store recorded as failed (this run's and earlier ones)


def store_path_for(slide_path: str | PathLike[str], out_dir: str | PathLike[str]) -> Path:
    """The store of a slide in `out_dir` (see `tilescope.catalog.store_path_for`): usually
    ``OUT/<slide file name without suffix>.zarr``; another slide's store is never reused."""
    from .catalog import store_path_for as _store_path_for

    return _store_path_for(slide_path, out_dir)


#: ``compute_dtype`` of the encoder provenance -> the short precision name recorded.
_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def tissue_parameters(tissue_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every parameter of `tissue_mask` as this run uses it (defaults and `tissue_kwargs`),
    recorded in the signature: other tissue settings give other tiles."""
    from . import tissue as detector  # the detector's own signature (not a stand-in)

    params = {
        k: p.default
        for k, p in inspect.signature(detector.tissue_mask).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(tissue_kwargs or {}) - set(params))
    if unknown:
        raise TypeError(f"unknown tissue_mask parameters {unknown}; known: {sorted(params)}")
    params.update(tissue_kwargs or {})
    return {"detector": "tilescope.tissue.tissue_mask", **cast(dict[str, Any], jsonable(params))}


def build_signature(
    slide: Slide,
    grid: TileGrid,
    layout: Any,
    encoder: Encoder,
    *,
    tissue: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What produced a store (the provenance that must match to resume).

    `layout` is a `~tilescope.grid.GridGeometry` or a `~tilescope.grid.TileLayout` (only its
    geometry is recorded); `tissue` the tissue parameters (`tissue_parameters`). The model's
    compute precision is recorded (``fp32``/``bf16``/``fp16``) but never refuses a resume.
    """
    model = dict(encoder.provenance())
    model.setdefault("compute_precision", _PRECISION.get(str(model.get("compute_dtype")), "fp32"))
    sig = {
        "model": model,
        "grid": grid.as_dict(),
        "slide": slide.identity(),
        "level0_mpp": [slide.mpp_x, slide.mpp_y],
        "layout": {
            "origin": [int(v) for v in layout.origin],
            "downsample": float(layout.downsample),
            "tile_l0": float(layout.tile_l0),
            "stride_l0": float(layout.stride_l0),
            "grid_shape": [int(v) for v in layout.grid_shape],
        },
        # how tiles were resampled: a notice if it differs, never a refusal
        "reader": {"resampling": RESAMPLING},
    }
    if tissue is not None:
        sig["tissue"] = dict(tissue)
    return sig


def _tissue_layout(slide: Slide, grid: TileGrid, tissue_kwargs: Mapping[str, Any]) -> TileLayout:
    """Tissue mask and kept tiles of a new store; `NoTilesError` if no tile is kept."""
    with warnings.catch_warnings():  # said once, in the error below
        warnings.simplefilter("ignore", NoTissueWarning)
        mask = tissue_mask(slide, **tissue_kwargs)
        layout = grid.layout(slide, mask)
    if not len(layout):
        raise NoTilesError(
            f"{slide.path}: no tiles to embed: {grid.empty_reason(mask)} (the minimum tissue "
            f"fraction, min_tissue, is {grid.min_tissue:g}); lower it if the slide does hold "
            "tissue"
        )
    return layout


def store_layout(store: EmbeddingStore) -> TileLayout:
    """The tiles of a store as a `TileLayout`: its own coords, grid_rc and tissue."""
    lay = store.signature["layout"]
    return TileLayout(
        coords=store.coords,
        grid_rc=store.grid_rc,
        tissue=store.tissue,
        origin=tuple(lay.get("origin", (0, 0))),
        downsample=lay["downsample"],
        tile_l0=lay["tile_l0"],
        stride_l0=lay.get("stride_l0", lay["tile_l0"]),
        grid_shape=tuple(lay["grid_shape"]),
    )


def iter_embed_slide(
    slide_path: str | PathLike[str],
    store_path: str | PathLike[str],
    *,
    encoder: Encoder,
    grid: TileGrid | None = None,
    slide_mpp: float | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    overwrite: bool = False,
    on_error: str = "skip",
    retry_failed: bool = False,
    tissue_kwargs: dict[str, Any] | None = None,
    order: Order = None,
    regions: Iterable[Region] | None = None,
    prefetch_batches: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[EmbedProgress, None, EmbedResult]:
    """Embed one slide, yielding an `EmbedProgress` after every batch; returns `EmbedResult`.

    `should_stop` (polled after every batch) ends the run early and still returns its
    `EmbedResult` (``complete`` False): the batches in flight are written and counted first.
    Closing the generator (``gen.close()``) stops the same way, without a result. Either way
    every row embedded so far is written to the store and a later run resumes from
    there. A killed process loses at most the rows of the last ``store.FLUSH_SECONDS`` seconds.

    An existing store is resumed from its own tiles when its signature matches (the tissue
    is not detected again); a damaged one is repaired (its damaged rows are embedded again).
    With `overwrite`, a store of this slide made with other settings is replaced: the new one
    is built beside it and takes its place when the run ends without being cancelled.

    Tiles that cannot be read (``on_error="skip"``) are recorded in the store as failed; the
    store still completes, and scores, search and export leave them out. They are tried
    again only with ``retry_failed=True``.

    Parameters
    ----------
    num_workers
        Reader processes; None: one if the model runs on the CPU (it needs the cores, and
        one reader outpaces it many times), else one per CPU but one; 0 reads in this thread.
    order
        None (grid order), tile indices (those, in that order), or a
        `~tilescope.schedule.TileSchedule` that is bound to the store's missing rows here and
        may be re-ordered or restricted from any thread while the run goes on (view first:
        ``schedule.prioritize_view(box)`` whenever the view moves). A new order takes effect
        after the tiles already handed to the readers: at most `prefetch_batches` batches
        read ahead, plus the batches in the model.
    regions
        Embed only the tiles that overlap these level-0 regions (boxes ``(x, y, w, h)``
        and/or shapely polygons). The store stays partial (``complete`` False) until a run
        without regions embeds the rest.
    prefetch_batches
        Batches read ahead of the model (None: enough to keep every reader busy).
    should_stop
        Polled after every batch; True stops the run early (see above).
    """
    grid = grid or TileGrid()
    t0 = time.perf_counter()
    name = Path(slide_path).name
    tissue = tissue_parameters(tissue_kwargs)
    region_list = None if regions is None else list(regions)
    with Slide(slide_path, mpp=slide_mpp) as slide:
        _ = slide.mpp  # fail early and clearly if mpp is missing
        signature = build_signature(slide, grid, grid.geometry(slide), encoder, tissue=tissue)
        yield EmbedProgress(name, "tissue", 0, 0, 0.0, 0.0)
        if should_stop is not None and should_stop():  # before the tissue is detected
            return EmbedResult(store_path=Path(store_path), n_tiles=0, embedded_now=0,
                               failed=(), seconds=time.perf_counter() - t0, complete=False,
                               trained_model=bool(encoder.trained))  # fmt: skip
        store = EmbeddingStore.resume_or_create(
            store_path,
            signature=signature,
            embed_dim=encoder.embed_dim,
            make_layout=lambda: _tissue_layout(slide, grid, tissue_kwargs or {}),
            overwrite=overwrite,
            retry_failed=retry_failed,
        )
    if store.notices:  # one notice for one resume (backend, precision and dtype differ together)
        warnings.warn(f"{store.path}: resumed with other provenance: {'; '.join(store.notices)}",
                      StoreNotice, 2)  # fmt: skip
    for damage in store.repaired:
        warnings.warn(f"{store.path}: repaired: {damage}; embedding those rows again",
                      StoreNotice, 2)  # fmt: skip
    layout = store_layout(store)
    workers = _workers(encoder, num_workers)
    try:
        result = yield from _embed_rows(
            name, t0, store, layout, grid, encoder, slide_path, slide_mpp, on_error,
            retry_failed, region_list,
            dict(batch_size=batch_size, num_workers=workers, order=order,
                 prefetch_batches=prefetch_batches), should_stop,
        )  # fmt: skip
        if result.complete:  # a replacement (overwrite) takes the old store's place once whole
            store.publish()
        return result
    finally:
        store.close()  # flushes, and lets the next writer in (also on cancel or error)


def _workers(encoder: Any, num_workers: int | None) -> int:
    """Reader processes for this encoder (see `iter_embed_slide`)."""
    if num_workers is not None:
        return num_workers
    device = getattr(getattr(encoder, "device", None), "type", "cpu")
    return 1 if device == "cpu" else max(1, default_workers() - 1)


def _embed_rows(
    name: str,
    t0: float,
    store: EmbeddingStore,
    layout: Any,
    grid: TileGrid,
    encoder: Encoder,
    slide_path: str | PathLike[str],
    slide_mpp: float | None,
    on_error: str,
    retry_failed: bool,
    regions: list[Region] | None,
    stream_kwargs: dict[str, Any],
    should_stop: Callable[[], bool] | None,
) -> Generator[EmbedProgress, None, EmbedResult]:
    total = len(layout)
    todo = store.todo_indices(include_failed=retry_failed)
    if regions is not None:
        todo = np.intersect1d(todo, tiles_overlapping(layout.coords, layout.tile_l0, regions))
    state = {"done": total - len(store.todo_indices(include_failed=retry_failed)), "failed": 0}
    t_start = time.perf_counter()
    yield EmbedProgress(name, "embedding", state["done"], total, time.perf_counter() - t0, 0.0)
    if should_stop is not None and should_stop():  # before the first batch
        todo = todo[:0]

    def report(covered: int, embedded: int, idx: Any, emb: Any) -> EmbedProgress:
        state["done"] += covered
        return EmbedProgress(name, "embedding", state["done"], total, time.perf_counter() - t0,
                             _pipeline.rate(embedded, t_start), failed=state["failed"],
                             indices=idx, embeddings=emb)  # fmt: skip

    batches = stream_tiles(
        slide_path, layout, target_mpp=grid.target_mpp, tile_px=grid.tile_px,
        on_error=on_error, indices=todo, slide_mpp=slide_mpp, copy=False, **stream_kwargs,
    )  # fmt: skip
    writer = _pipeline.StoreWriter(store)
    try:
        run = _pipeline.embed_batches(batches, encoder, writer, report, should_stop)
        embedded_now, failures = yield from run
    finally:
        writer.close()  # the rows in its queue are written first, also on cancel
        store.flush()  # keep every embedded row, also on cancel or error
    writer.check()
    if failures or store.failures:  # also forgets earlier failures embedded now
        store.record_failures(failures)
    complete = not len(store.todo_indices())  # failed tiles are recorded, not pending
    if complete and not store.complete:
        store.finalize()
    elapsed = time.perf_counter() - t0
    rate = _pipeline.rate(embedded_now, t_start)
    yield EmbedProgress(name, "done", state["done"], total, elapsed, rate, failed=len(failures))
    return EmbedResult(
        store_path=store.path,
        n_tiles=total,
        embedded_now=embedded_now,
        failed=tuple(failures),
        seconds=elapsed,
        complete=complete,
        trained_model=bool(encoder.trained),
        n_failed=store.n_failed,
    )


def embed_slide(
    slide_path: str | PathLike[str],
    store_path: str | PathLike[str],
    *,
    encoder: Encoder | None = None,
    model: str | None = None,
    device: str | None = None,
    backend: str = "auto",
    progress: Callable[[EmbedProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    regions: Iterable[Region] | None = None,
    **kwargs: Any,
) -> EmbedResult:
    """Embed one slide into a zarr store (see `iter_embed_slide` for the keyword options).

    Parameters
    ----------
    slide_path, store_path
        The slide and the ``.zarr`` directory to create or resume.
    encoder, model, device, backend
        A loaded `~tilescope.models.Encoder`, or a model name to load (BiomedCLIP by default)
        on `device` with `backend` ("auto", "torch" or "openvino"; see `load_encoder`).
    progress
        Called with an `EmbedProgress` after every batch.
    should_stop
        Polled after every batch; returning True stops cleanly (the store keeps its rows).
    regions
        Embed only the tiles overlapping these level-0 regions (boxes and/or polygons).
    """
    if encoder is None:
        from .models import DEFAULT_MODEL, load_encoder

        encoder = load_encoder(model or DEFAULT_MODEL, device=device, backend=backend)
    gen = iter_embed_slide(slide_path, store_path, encoder=encoder, regions=regions,
                           should_stop=should_stop, **kwargs)  # fmt: skip
    try:
        while True:
            report = next(gen)
            if progress is not None:
                progress(report)
    except StopIteration as stop:
        return stop.value


def embed_slides(
    slide_paths: Sequence[str | PathLike[str]],
    out_dir: str | PathLike[str],
    **kwargs: Any,
) -> list[EmbedResult]:
    """Embed several slides, one store each in `out_dir`; finished stores are skipped.

    Two slides with one file name get two stores (`tilescope.catalog.store_path_for`)."""
    from .catalog import store_path_for as _store_path_for

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    results: list[EmbedResult] = []
    taken: list[Path] = []
    for p in slide_paths:
        target = _store_path_for(p, out_dir, taken=taken)
        taken.append(target)
        results.append(embed_slide(p, target, **kwargs))
    return results
