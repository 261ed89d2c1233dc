"""The client side of a cohort run: one task per slide, retries, progress and the summary.

Every slide is submitted at once, so the scheduler (and an adaptive cluster) sees the whole
workload. A task that raises is retried by Dask (``retries``); a task whose worker dies is sent
to another worker by Dask. Each attempt numbers itself first (`claim_attempt`), and a slide
past ``retries + 1`` attempts is given up before any work: so a slide that failed twice, or
killed two workers, is reported and the others complete. (Dask's own limit,
``allowed-failures``, stays as a backstop; it also counts deaths of workers the task only
waited on, so it is no measure of a slide.)
"""

from __future__ import annotations

import csv
import os
import queue
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from os import PathLike
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import TilescopeError
from ._progress import CohortProgress, ProgressBook
from ._worker import CohortWorker, ModelSpec, attempt_marks, embed_task, probe

#: The per-slide summary written into the output folder.
SUMMARY_NAME = "embed-summary.csv"
#: Seconds between two progress reports at most (events wake the loop sooner).
POLL_SECONDS = 0.5
#: Seconds between two rewrites of the summary while slides finish (and once at the end).
SUMMARY_SECONDS = 10.0


@dataclass
class SlideReport:
    """How one slide of a cohort run ended (one row of the summary CSV).

    ``status``: ``embedded`` (this run completed its store), ``complete`` (finished before:
    nothing to do), ``partial`` (ended with tiles left, e.g. a region-restricted run),
    ``failed`` (gave up: see ``error``), ``interrupted`` / ``not started`` (the run was
    stopped); ``waiting`` while the run goes on. ``failed_tiles`` counts tiles that could not
    be read (recorded in the store).
    """

    slide: str
    store: str
    tiles: int | None = None
    embedded_now: int = 0
    failed_tiles: int = 0
    seconds: float | None = None
    status: str = "not started"
    error: str = ""
    attempts: int = 0
    worker: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("embedded", "complete", "partial")


@dataclass
class CohortResult:
    reports: list[SlideReport]
    summary: Path | None
    model: dict[str, Any]  # what the probe saw: label, trained, device, ...
    seconds: float

    @property
    def failed(self) -> list[SlideReport]:
        return [r for r in self.reports if r.status == "failed"]


def embed_cohort(
    client: Any,
    jobs: Sequence[tuple[str | PathLike[str], str | PathLike[str]]],
    *,
    model: str | ModelSpec | None = None,
    device: str | None = None,
    embed_kwargs: Mapping[str, Any] | None = None,
    retries: int = 1,
    summary: str | PathLike[str] | None = None,
    progress: Callable[[CohortProgress], None] | None = None,
    on_slide: Callable[[SlideReport], None] | None = None,
    on_model: Callable[[dict[str, Any]], None] | None = None,
    on_batch: Callable[[Any], None] | None = None,
    torch_threads: int | None = None,
) -> CohortResult:
    """Embed many slides on a Dask cluster, one task per slide, each with `embed_slide`.

    Parameters
    ----------
    client
        A connected ``distributed.Client`` (see `tilescope.cohort.connect`).
    jobs
        ``(slide, store path)`` pairs, store paths decided up front (the CLI uses
        `tilescope.catalog.store_path_for` with ``taken=``); paths must mean the same file on
        every worker (a shared file system).
    model, device
        The model every worker loads once (a name, or a `ModelSpec` with a factory) and the
        device (one GPU per worker when a machine has several: `worker_device`).
    embed_kwargs
        Keywords of `embed_slide` (grid, slide_mpp, batch_size, num_workers, overwrite, ...).
    retries
        A slide whose task raises is run again this many times; a slide whose worker dies is
        sent to another worker by the scheduler. A slide is given up (reported, and the others
        go on) when it raised ``retries + 1`` times, or when it would start a ``retries + 2``-th
        time (its earlier attempts died or failed).
    summary
        Where to write the per-slide CSV (rewritten as slides finish, and at the end).
    torch_threads
        Torch threads of each worker; default: the CPUs the worker may use, shared by the
        workers of its machine (`Connection.torch_threads` for a LocalCluster).
    progress, on_slide, on_model
        Called with a `CohortProgress` every half second, a `SlideReport` when a slide ends,
        and once with what the model is (label, trained, device) when the first worker has it.
    on_batch
        Called on the worker after every batch with its `EmbedProgress` (monitoring, tests).

    Returns a `CohortResult`; interrupted (Ctrl-C), it cancels the tasks (running slides stop
    after their batch and keep their rows), writes the summary, waits (up to
    `STOP_WAIT_SECONDS`) until the running slides have let go of their stores, so the same
    command run again at once resumes them, and re-raises.
    """
    from distributed import as_completed

    spec = model if isinstance(model, ModelSpec) else ModelSpec(name=model, device=device)
    token = uuid.uuid4().hex[:12]
    plugin_name, topic = f"tilescope-cohort-{token}", f"tilescope-cohort-{token}"
    reports = [SlideReport(str(s), str(t)) for s, t in jobs]
    book = ProgressBook(len(reports))
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    t0 = time.perf_counter()
    writer = _SummaryWriter(summary, reports)
    client.register_plugin(CohortWorker(spec, torch_threads=torch_threads), name=plugin_name)
    client.subscribe_topic(topic, lambda event: events.put(event[1]))
    running: dict[Any, int] = {}
    try:
        per_host = {
            str(h): n for h, n in Counter(urlsplit(a).hostname for a in client.nthreads()).items()
        }
        info = _probe(client, plugin_name, per_host)
        if on_model is not None:
            on_model(info)
        for i, r in enumerate(reports):
            key = f"tilescope-embed-{i}-{token}"
            fut = client.submit(
                embed_task, i, r.slide, r.store, plugin_name=plugin_name, topic=topic,
                task_key=key, embed_kwargs=dict(embed_kwargs or {}), on_batch=on_batch,
                host_workers=per_host, max_attempts=retries + 1, run_token=token,
                retries=retries, pure=False, key=key,
            )  # fmt: skip
            running[fut] = i
            r.status = "waiting"
        finished = as_completed(list(running))
        last_report = 0.0
        while running:
            try:  # wake up on the next event, or every POLL_SECONDS
                book.event(events.get(timeout=POLL_SECONDS))
            except queue.Empty:
                pass
            _drain(events, book)
            ended = [(f, running.pop(f)) for f in finished.next_batch(block=False) if f in running]
            for fut, i in ended:
                _settle(reports[i], fut, book.starts.get(i, 0))
                book.finish(i, reports[i].ok, reports[i].tiles)
                writer.changed()
                if on_slide is not None:
                    on_slide(reports[i])
            now = time.monotonic()
            if progress is not None and (ended or now - last_report >= POLL_SECONDS):
                last_report = now
                busy = sum(1 for i in running.values() if book.starts.get(i, 0))
                progress(book.snapshot(busy, len(client.nthreads())))
        _drain(events, book)
    except BaseException:
        client.cancel(list(running))  # running slides stop after their batch, rows kept
        for i in running.values():
            reports[i].status = "interrupted" if book.starts.get(i) else "not started"
            reports[i].attempts = book.starts.get(i, 0)
        writer.write()
        started = [Path(reports[i].store) for i in running.values() if book.starts.get(i)]
        _wait_released(started, STOP_WAIT_SECONDS)  # so running again at once can resume them
        raise
    finally:
        _quietly(client.unsubscribe_topic, topic)
        _quietly(client.unregister_worker_plugin, plugin_name)
        for r in reports:
            for mark in attempt_marks(r.store, token):
                _quietly(mark.unlink)
    path = writer.write()
    return CohortResult(reports, path, info, time.perf_counter() - t0)


#: How long an interrupted run waits for its running slides to let go of their stores.
STOP_WAIT_SECONDS = 60.0


def _wait_released(stores: Sequence[Path], timeout: float) -> None:
    """Wait (at most `timeout` s in all) until no task holds these stores' writer locks.

    A cancelled task stops after the batch in flight and then releases its store; without the
    wait, the same command run again at once finds the store busy. A second Ctrl-C ends the
    wait."""
    from filelock import FileLock, Timeout

    from .._store_io import lock_path

    deadline = time.monotonic() + timeout
    for store in stores:
        lock = FileLock(lock_path(store), thread_local=False)
        try:
            lock.acquire(timeout=max(0.0, deadline - time.monotonic()), poll_interval=0.1)
        except (Timeout, OSError):
            continue  # still busy (a worker that hangs) or no lock to take: nothing to wait for
        lock.release()


def _probe(client: Any, plugin_name: str, per_host: dict[str, int]) -> dict[str, Any]:
    """Load the model on one worker first: a wrong model name or a worker without Tilescope
    fails once, here, not once per slide."""
    fut = client.submit(probe, plugin_name, per_host, pure=False,
                        key=f"tilescope-model-{plugin_name}")  # fmt: skip
    try:
        return dict(fut.result())
    except TilescopeError:
        raise
    except Exception as exc:
        raise TilescopeError(
            f"the workers could not load the model ({type(exc).__name__}: {exc}); the "
            "workers need Tilescope installed (the same version as here) and the model's "
            "weights (a hub cache or a folder they can read)"
        ) from None


def _drain(events: queue.Queue[dict[str, Any]], book: ProgressBook) -> None:
    while True:
        try:
            book.event(events.get_nowait())
        except queue.Empty:
            return


def _settle(report: SlideReport, fut: Any, attempts: int) -> None:
    """Fill a slide's report from its finished future."""
    report.attempts = attempts
    if fut.status == "finished":
        out = fut.result()
        report.store = out["store"]
        report.tiles = int(out["tiles"])
        report.embedded_now = int(out["embedded_now"])
        report.failed_tiles = int(out["failed_tiles"])
        report.seconds = float(out["seconds"])
        report.worker = str(out["worker"])
        if not out["complete"]:
            report.status = "partial"
        elif report.embedded_now or out["failed_now"] or out["notes"]:
            report.status = "embedded"
        else:
            report.status = "complete"
        report.error = "; ".join(out["notes"])
        return
    exc = fut.exception()
    report.status = "failed"
    if type(exc).__name__ == "KilledWorker":  # the scheduler's own limit (allowed-failures)
        report.error = (
            f"Dask gave it up: workers holding it died too often ({exc}); out of memory, a "
            "crash in a slide decoder, or lost nodes"
        )
    else:
        report.error = str(exc) or type(exc).__name__


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # the cluster is closing, or the run never got that far
        pass


class _SummaryWriter:
    """Writes the summary CSV atomically, at most every `SUMMARY_SECONDS` while slides end."""

    COLUMNS = [f.name for f in fields(SlideReport)]

    def __init__(self, path: str | PathLike[str] | None, reports: list[SlideReport]) -> None:
        self.path = None if path is None else Path(path)
        self.reports = reports
        self.last = time.monotonic()

    def changed(self) -> None:
        if time.monotonic() - self.last >= SUMMARY_SECONDS:
            self.write()

    def write(self) -> Path | None:
        self.last = time.monotonic()
        if self.path is None:
            return None
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(self.COLUMNS)
            for r in self.reports:
                w.writerow(["" if getattr(r, c) is None else _cell(getattr(r, c))
                            for c in self.COLUMNS])  # fmt: skip
        os.replace(tmp, self.path)
        return self.path


def _cell(value: Any) -> Any:
    return f"{value:.2f}" if isinstance(value, float) else value
