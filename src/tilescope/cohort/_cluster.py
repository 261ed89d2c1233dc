"""Reaching a Dask cluster: a `LocalCluster` started here, or a cluster that already runs.

Local workers are processes with one task thread each (one slide at a time per worker, one
GPU each, as dask-cuda's workers), started as non-daemonic processes
(``distributed.worker.daemon: False``, so a task may use multiprocessing; Tilescope's own tile
readers are plain subprocesses and run in daemonic workers too), and forked from a fork server
that imported torch once. Torch gets the machine's CPUs shared among the
workers. On a cluster that runs already, these are that cluster's settings (see the README).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._torch_env import available_cpus
from ..errors import TilescopeError

#: Where a LocalCluster's dashboard listens (another free port if this one is taken).
LOCAL_DASHBOARD = "127.0.0.1:8787"
#: Imported once by the fork server that local workers are forked from (see `_fork_server`).
FORKSERVER_PRELOAD = ("distributed", "numpy", "torch", "open_clip", "tilescope.embed",
                      "tilescope.models", "tilescope.cohort._worker")  # fmt: skip


@dataclass
class Connection:
    """A client connected to a cluster, and what to tell the user about it."""

    client: Any  # distributed.Client
    description: str
    dashboard: str  # the dashboard's URL, or "" when the scheduler serves none
    torch_threads: int | None  # torch threads per worker (a LocalCluster's share), or None


def parse_local(text: str) -> int | None:
    """``"local"`` -> None (choose), ``"local:4"`` -> 4; anything else is an error."""
    m = re.fullmatch(r"local(?::(\d+))?", text.strip())
    if m is None or (m.group(1) is not None and int(m.group(1)) < 1):
        raise TilescopeError(
            f"--cluster {text!r}: write local or local:N (N worker processes, N >= 1); to use "
            "a cluster that runs already, pass --scheduler tcp://HOST:PORT or --scheduler-file"
        )
    return int(m.group(1)) if m.group(1) else None


def default_local_workers() -> int:
    """One worker per visible CUDA device, else one."""
    import torch

    return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 1)


@contextmanager
def connect(
    *,
    local: int | None | bool = False,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    dashboard: bool = True,
    threads_per_worker: int = 1,
) -> Iterator[Connection]:
    """Start a LocalCluster (``local=N``, or ``local=None`` to choose N) or connect to a
    running scheduler; closes what it started on exit (also on errors and Ctrl-C).

    A local worker runs `threads_per_worker` slides at a time (1: one slide per worker and
    GPU); `Connection.torch_threads` is its share of this machine's CPUs.
    """
    from distributed import Client, LocalCluster

    chosen = [local is not False, scheduler is not None, scheduler_file is not None]
    if sum(chosen) != 1:
        raise TilescopeError("give one of --cluster, --scheduler or --scheduler-file")
    with ExitStack() as stack:
        torch_threads = None
        if local is not False:
            n = int(local) if local is not None and local is not True else default_local_workers()
            torch_threads = max(1, available_cpus() // n)
            # kept for the cluster's lifetime: the nanny reads it again when it restarts a worker
            stack.enter_context(dask_config({"distributed.worker.daemon": False, **_fork_server()}))
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=n,
                    threads_per_worker=threads_per_worker,
                    processes=True,
                    dashboard_address=LOCAL_DASHBOARD if dashboard else None,
                    silence_logs=logging.ERROR,
                )
            )
            client = stack.enter_context(Client(cluster))
            what = f"a local cluster of {n} worker process{'es' if n > 1 else ''}"
            what += f" ({torch_threads} model thread{'s' if torch_threads > 1 else ''} each)"
        else:
            where = scheduler or scheduler_file
            if scheduler_file and not Path(scheduler_file).is_file():  # Dask would wait forever
                raise TilescopeError(
                    f"--scheduler-file {scheduler_file}: no such file; the scheduler writes it "
                    "when it starts (start it first, or check the path)"
                )
            try:
                client = stack.enter_context(
                    Client(scheduler_file=scheduler_file) if scheduler_file else Client(scheduler)
                )
            except (OSError, ValueError) as exc:  # TimeoutError is an OSError
                flag = "--scheduler-file" if scheduler_file else "--scheduler"
                raise TilescopeError(
                    f"{flag} {where}: could not reach the Dask scheduler ({exc}); is it running, "
                    "and is this its address (tcp://HOST:PORT) or its scheduler file?"
                ) from None
            what = f"the Dask scheduler at {client.scheduler.address}"
        yield Connection(client, what, client.dashboard_link or "", torch_threads)


def _fork_server() -> dict[str, str]:
    """Dask config that forks local workers from a server that imported torch once.

    Spawned workers (Dask's default) each import torch and open_clip afresh: seconds each,
    a minute on a slow shared file system, again for every worker restarted after a crash.
    Forked from Python's fork server (a clean single-threaded process that never touches a
    GPU), a worker starts with them imported. Where there is no fork server (Windows), spawn.
    """
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return {}
    from distributed.utils import get_mp_context

    with dask_config({"distributed.worker.multiprocessing-method": "forkserver"}):
        get_mp_context()  # Dask sets its own preload list once; ours replaces it below
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(FORKSERVER_PRELOAD))
    return {"distributed.worker.multiprocessing-method": "forkserver"}


def dask_config(values: dict[str, Any]) -> Any:
    import dask

    return dask.config.set(values)
