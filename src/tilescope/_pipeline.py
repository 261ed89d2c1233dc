"""The overlapped embedding loop: reader processes -> encoder -> writer thread -> store.

- Readers prefetch: batch k+1 is read (in other processes) while batch k is in the model.
- The model is fed through ``encoder.submit_images(images) -> pending`` (``pending.result()``
  gives float32 (N, D) embeddings), so an asynchronous backend computes batch k while batch
  k+1 is submitted; a batch's shared memory is given back once its result is in.
- Store writes run on a writer thread behind a bounded queue (`StoreWriter`): the model never
  waits for zarr, and an error in the writer is raised in the caller with its message.

Cancel (closing the generator) collects the batches in flight, writes them, and stops the
readers; the store's own rule (rows flagged done only after their data) keeps a killed run
resumable.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

import numpy as np

#: Batches queued for the writer at most (bounded memory; the model waits only if zarr is
#: this far behind).
WRITER_QUEUE = 8
#: Batches submitted to the encoder and not yet collected, at most.
IN_FLIGHT = 2


class StoreWriter:
    """Writes rows to a store on one thread; `put` raises the writer's error, if any."""

    def __init__(self, store: Any, maxsize: int = WRITER_QUEUE) -> None:
        self.store = store
        self.error: BaseException | None = None
        self._queue: queue.Queue[tuple[np.ndarray, np.ndarray] | None] = queue.Queue(maxsize)
        self._thread = threading.Thread(target=self._run, name="tilescope-writer", daemon=True)
        self._thread.start()

    def put(self, indices: np.ndarray, embeddings: np.ndarray) -> None:
        self.check()
        self._queue.put((indices, embeddings))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Write what is queued, stop the thread (the store is the caller's again)."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining so `put` never blocks on a dead writer
            try:
                self.store.write_rows(*item)
            except BaseException as exc:
                self.error = exc


class _Done:
    """A finished pending result (encoders without `submit_images`)."""

    def __init__(self, value: np.ndarray) -> None:
        self._value = value

    def done(self) -> bool:
        return True

    def result(self) -> np.ndarray:
        return self._value


def submitter(encoder: Any) -> Callable[[np.ndarray], Any]:
    """``encoder.submit_images``, or a synchronous stand-in over ``encode_images``."""
    submit = getattr(encoder, "submit_images", None)
    if submit is not None:
        return submit
    return lambda images: _Done(encoder.encode_images(images))


def _ready(pending: Any) -> bool:
    done = getattr(pending, "done", None)
    return bool(done()) if callable(done) else False


def embed_batches(
    batches: Generator[Any, None, None], encoder: Any, writer: StoreWriter,
    report: Callable[[int, int, np.ndarray | None, np.ndarray | None], Any],
    should_stop: Callable[[], bool] | None = None,
) -> Generator[Any, None, tuple[int, list[tuple[int, str]]]]:  # fmt: skip
    """Embed `batches` (a ``copy=False`` tile stream) into `writer`'s store.

    After every batch, yields ``report(covered, embedded, indices, embeddings)`` (tiles this
    batch covered, tiles embedded so far, its rows and their embeddings). Returns the number
    of tiles embedded and the tiles that failed to read, as ``(index, message)``.
    `should_stop`, polled after every report, ends the run early as if the stream had ended:
    the batches in flight are collected, written and reported first.
    """
    submit = submitter(encoder)
    inflight: deque[tuple[Any, Any]] = deque()
    failures: list[tuple[int, str]] = []
    embedded = 0
    finished = False
    try:
        for batch in batches:
            failures.extend((int(f.index), str(f.message)) for f in batch.failed)
            if len(batch.indices):
                inflight.append((batch, submit(batch.images)))
            else:
                batch.release()
                yield report(len(batch.failed), embedded, None, None)
            while inflight and (len(inflight) >= IN_FLIGHT or _ready(inflight[0][1])):
                b, emb = _collect(inflight)
                writer.put(b.indices, emb)
                embedded += len(b.indices)
                yield report(len(b.indices) + len(b.failed), embedded, b.indices, emb)
            if should_stop is not None and should_stop():
                break
        while inflight:
            b, emb = _collect(inflight)
            writer.put(b.indices, emb)
            embedded += len(b.indices)
            yield report(len(b.indices) + len(b.failed), embedded, b.indices, emb)
        finished = True
    finally:
        if not finished:  # cancelled or failed: keep what was computed, if it can be had
            _salvage(inflight, writer)
        batches.close()  # stop dispatching to the readers promptly, also on cancel
    return embedded, failures


def _collect(inflight: deque[tuple[Any, Any]]) -> tuple[Any, np.ndarray]:
    batch, pending = inflight.popleft()
    try:
        emb = np.asarray(pending.result(), dtype=np.float32)
    finally:
        batch.release()
    return batch, emb


def _salvage(inflight: deque[tuple[Any, Any]], writer: StoreWriter) -> None:
    while inflight:
        try:
            batch, emb = _collect(inflight)
            if writer.error is None:
                writer.put(batch.indices, emb)
        except BaseException:  # the original error (or the cancel) is what matters
            continue


def rate(embedded: int, t_start: float) -> float:
    """This run's tiles per second (never counts rows embedded by earlier runs)."""
    return embedded / max(time.perf_counter() - t_start, 1e-9)
