"""What runs on a Dask worker: the model, loaded once per worker, and the task of one slide.

The task holds no per-slide logic of its own: it calls `tilescope.embed.embed_slide` with the
worker's encoder, reports progress as Dask events, and stops after the batch in flight when
its future is cancelled (the client was interrupted), so the store's lock is let go at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from distributed import WorkerPlugin, get_worker

from .._torch_env import available_cpus
from ..errors import StoreNotice, TilescopeError

if TYPE_CHECKING:
    from distributed import Worker

    from ..embed import EmbedProgress
    from ..models import Encoder

logger = logging.getLogger("tilescope.cohort")

#: Seconds between two progress events of one slide (stage changes are always sent).
EVENT_SECONDS = 0.5


class SlideTaskError(TilescopeError):
    """A slide's task failed on a worker; the message says why (it pickles as plain text)."""


@dataclass(frozen=True)
class ModelSpec:
    """The model every worker loads once: a name for `load_encoder`, or a factory.

    ``factory`` (a picklable callable taking ``device=``) builds encoders that have no name,
    e.g. `tilescope.models.build_biomedclip_architecture` for timing. ``load_kwargs`` go to
    `load_encoder` as they are (e.g. a ``backend``, where the library has one).
    """

    name: str | None = None
    device: str | None = None
    factory: Callable[..., Encoder] | None = None
    load_kwargs: Mapping[str, Any] = field(default_factory=dict)


def worker_device(requested: str | None, worker_name: object, n_cuda: int) -> str | None:
    """The device of one worker: one GPU per worker when a machine has several.

    An explicit device (``"cpu"``, ``"cuda:1"``, ``"mps"``) is used as it is. Otherwise
    (``None``/``"auto"``/``"cuda"``), with several CUDA devices visible the worker takes
    ``cuda:<i mod n>``, ``i`` being the number that ends its name (LocalCluster names workers
    0, 1, ...; dask-jobqueue ``SLURMCluster-3-1`` is process 1 of job 3). With one visible
    device (Slurm's ``--gres=gpu:1`` sets ``CUDA_VISIBLE_DEVICES`` per job) or none, the choice
    is left to `tilescope.models.pick_device`.
    """
    if requested not in (None, "auto", "cuda") or n_cuda <= 1:
        return requested
    m = re.search(r"(\d+)$", str(worker_name))
    index = int(m.group(1)) if m else os.getpid()
    return f"cuda:{index % n_cuda}"


class CohortWorker(WorkerPlugin):
    """Per-worker state of one cohort run: the encoder (loaded on first use, once) and the
    keys of this run's tasks that were cancelled (so a running slide stops after its batch).

    Registered by the client under a name of its own (``tilescope-cohort-<token>``) and
    removed at the end of the run, which frees the model.
    """

    idempotent = False

    def __init__(self, spec: ModelSpec, *, torch_threads: int | None = None) -> None:
        self.spec = spec
        self.torch_threads = torch_threads
        self.worker_name = ""
        self.host = ""
        self.cancelled: set[str] = set()
        self._encoder: Encoder | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # sent to workers: the spec, not the state
        return {"spec": self.spec, "torch_threads": self.torch_threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"], torch_threads=state["torch_threads"])  # type: ignore[misc]

    def setup(self, worker: Worker) -> None:
        self.worker_name = str(worker.name)
        self.host = str(urlsplit(worker.address).hostname)

    def teardown(self, worker: Worker) -> None:
        if self._encoder is not None:  # frees the model (and its GPU memory) with the run
            self._encoder = None
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        # the client let go of a task this worker runs (the worker state machine reports the
        # requested state, "released"; the task's own state becomes "cancelled")
        if start in ("executing", "long-running") and finish in ("released", "cancelled"):
            self.cancelled.add(str(key))

    def encoder(self, host_workers: Mapping[str, int] | None = None) -> Encoder:
        """The worker's encoder, loaded on first use (in a task thread, not the event loop).

        `host_workers` (workers per host, as the client saw them) shares this machine's CPUs
        among its workers for torch, unless the plugin was given ``torch_threads``."""
        with self._lock:
            if self._encoder is None:
                self._encoder = self._load(dict(host_workers or {}))
            return self._encoder

    def _load(self, host_workers: dict[str, int]) -> Encoder:
        import torch

        # Dask's nanny starts workers with OMP_NUM_THREADS=1: torch would use one core
        share = max(1, host_workers.get(self.host, 1))
        torch.set_num_threads(self.torch_threads or max(1, available_cpus() // share))
        n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device = worker_device(self.spec.device, self.worker_name, n_cuda)
        if self.spec.factory is not None:
            return self.spec.factory(device=device)
        from ..models import DEFAULT_MODEL, load_encoder

        return load_encoder(
            self.spec.name or DEFAULT_MODEL, device=device, **dict(self.spec.load_kwargs)
        )


def _plugin(name: str) -> CohortWorker:
    plugin = get_worker().plugins.get(name)
    if not isinstance(plugin, CohortWorker):
        raise SlideTaskError(f"this worker has no {name} plugin: the cohort run ended")
    return plugin


def _describe(exc: BaseException) -> str:
    """One line: a TilescopeError's message, or a file-system error's path and reason."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc) or type(exc).__name__


def probe(plugin_name: str, host_workers: Mapping[str, int]) -> dict[str, Any]:
    """Load the model on one worker before any slide is sent, and say what it runs."""
    import torch

    from .._version import __version__

    try:
        enc = _plugin(plugin_name).encoder(host_workers)
    except TilescopeError as exc:
        raise SlideTaskError(str(exc)) from None
    return {
        "label": enc.label,
        "trained": bool(enc.trained),
        "device": str(enc.device),
        "image_tower": enc.describe_tower(),
        "tilescope_version": __version__,
        "daemonic": multiprocessing.current_process().daemon,
        "worker": get_worker().name,
        "torch_threads": torch.get_num_threads(),
    }


def stopped(worker: Any, plugin_name: str, plugin: CohortWorker, task_key: str) -> bool:
    """True once the client let go of this task (Ctrl-C, or a given-up run): its future was
    cancelled, or the run's plugin was removed from this worker (which may come first)."""
    return task_key in plugin.cancelled or worker.plugins.get(plugin_name) is not plugin


def attempt_marks(store: str | os.PathLike[str], run_token: str) -> list[Path]:
    """The attempt files of a store in one run (hidden, beside the store)."""
    p = Path(store)
    return sorted(p.parent.glob(f".{p.name}.attempt-{run_token}-*"))


def claim_attempt(store: str | os.PathLike[str], run_token: str) -> int:
    """Number this attempt at a slide (1, 2, ...) by creating the next free attempt file beside
    its store (``O_EXCL``: atomic on local and network file systems). Counted in files, not on
    the scheduler, because an attempt whose worker died has no other trace: Dask's own count
    (``allowed-failures``) also counts deaths of workers the task only waited on."""
    p = Path(store)
    p.parent.mkdir(parents=True, exist_ok=True)
    k = 1
    while True:
        mark = p.parent / f".{p.name}.attempt-{run_token}-{k}"
        try:
            os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return k
        except FileExistsError:
            k += 1


def embed_task(
    index: int,
    slide: str,
    store: str,
    *,
    plugin_name: str,
    topic: str,
    task_key: str,
    embed_kwargs: Mapping[str, Any],
    on_batch: Callable[[EmbedProgress], None] | None = None,
    host_workers: Mapping[str, int] | None = None,
    max_attempts: int = 2,
    run_token: str = "",
) -> dict[str, Any]:
    """Embed one slide into its store on this worker (`embed_slide` decides: resume, skip a
    finished store, repair, or refuse a store made with other settings).

    The attempt is numbered first (`claim_attempt`); past `max_attempts` (earlier attempts
    raised, or their workers died) the slide is given up at once, before any work."""
    from ..embed import embed_slide

    worker = get_worker()
    plugin = _plugin(plugin_name)
    number = claim_attempt(store, run_token) if run_token else 1
    if number > max_attempts:
        raise SlideTaskError(
            f"given up after {max_attempts} attempts that did not finish (their workers died: "
            "out of memory, a crash in a slide decoder, or a lost node; or they failed)"
        )
    attempt = f"{worker.address}/{time.time_ns()}"
    who = str(worker.name)
    start = {"slide": index, "attempt": attempt, "stage": "start", "worker": who, "n": number}
    worker.log_event(topic, start)
    last: dict[str, Any] = {"t": 0.0, "stage": "", "base": None}

    def report(p: EmbedProgress) -> None:
        if p.stage == "embedding" and last["base"] is None:
            last["base"] = p.done  # tiles done before this attempt (resumed)
        now = time.monotonic()
        if p.stage != last["stage"] or now - last["t"] >= EVENT_SECONDS:
            last["t"], last["stage"] = now, p.stage
            embedded = max(0, p.done - (last["base"] or 0) - p.failed) if p.total else 0
            msg = {
                "slide": index,
                "attempt": attempt,
                "stage": p.stage,
                "done": p.done,
                "total": p.total,
                "failed": p.failed,
                "embedded": embedded,
            }
            worker.log_event(topic, msg)
        if on_batch is not None:
            on_batch(p)

    kwargs = dict(embed_kwargs)
    try:
        encoder = plugin.encoder(host_workers)
        if kwargs.get("batch_size") is None:
            kwargs["batch_size"] = encoder.default_batch_size
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", StoreNotice)
            result = embed_slide(
                slide,
                store,
                encoder=encoder,
                progress=report,
                should_stop=lambda: stopped(worker, plugin_name, plugin, task_key),
                **kwargs,
            )
    except (TilescopeError, OSError) as exc:
        raise SlideTaskError(_describe(exc)) from None
    except Exception as exc:  # a bug or a library error: keep its type, log the traceback here
        logger.exception("tilescope: %s failed on worker %s", slide, who)
        raise SlideTaskError(f"{type(exc).__name__}: {exc}") from None
    return {
        "index": index,
        "store": str(Path(result.store_path)),
        "tiles": result.n_tiles,
        "embedded_now": result.embedded_now,
        "failed_tiles": result.n_failed,
        "failed_now": [list(f) for f in result.failed[:5]],
        "seconds": result.seconds,
        "complete": result.complete,
        "worker": who,
        "notes": [str(n.message) for n in notes if issubclass(n.category, StoreNotice)],
    }
