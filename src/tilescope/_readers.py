"""Reader worker processes: each opens its own OpenSlide handle and writes uint8 tiles into
shared memory.

Why processes started with `subprocess` (a fresh ``python -c``), not `multiprocessing`:

- *Nothing is inherited.* No ``fork`` of a process that may already run Qt, torch or reader
  threads; and unlike multiprocessing's spawn and forkserver contexts, the child does not
  import the parent's ``__main__`` (napari's entry point, a user's script, pytest): a worker
  imports numpy, Pillow, OpenSlide and `tilescope.slide` only (never torch) and is ready in
  a fraction of a second.
- *Shared memory that cannot leak.* Tiles travel through one anonymous buffer per stream
  (``memfd_create``, or an unlinked temporary file), whose descriptor is passed to the
  workers over their socket (``SCM_RIGHTS``). It has no name, so a killed run leaves nothing
  in ``/dev/shm`` and no resource tracker is involved. Messages (a task: which tiles to read
  into which cells; a reply: which failed) are small pickles over a Unix socket pair.
- *No hang on a dead worker.* The parent waits on the sockets: a worker that dies shows up
  as end-of-file at once, and is reported. A worker whose parent dies sees end-of-file and
  exits.

One pool per process (`shared_pool`) is reused by every stream (a cohort worker embeds many
slides); a second stream running at the same time gets a private pool. Pools are shut down
at interpreter exit (`shutdown_readers` does it earlier).
"""

from __future__ import annotations

import atexit
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

import numpy as np

_HEADER = struct.Struct("<Q")
#: Seconds a worker may take to stop before it is killed.
STOP_TIMEOUT_S = 5.0


# -- framing: length-prefixed pickles, optionally with file descriptors ------------------------
def send(sock: socket.socket, obj: Any, fds: tuple[int, ...] = ()) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    payload = _HEADER.pack(len(data)) + data
    if fds:
        n = socket.send_fds(sock, [payload], list(fds))
        payload = payload[n:]
    if payload:
        sock.sendall(payload)


def recv(sock: socket.socket) -> tuple[Any, list[int]]:
    """The next message and the descriptors that came with it; EOFError at end of stream."""
    head, fds, _, _ = socket.recv_fds(sock, _HEADER.size, 4)
    if not head:
        raise EOFError
    head += _recv_exact(sock, _HEADER.size - len(head))
    (n,) = _HEADER.unpack(head)
    return pickle.loads(_recv_exact(sock, n)), list(fds)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise EOFError
        got += k
    return bytes(buf)


# -- shared memory ------------------------------------------------------------------------------
class Arena:
    """An anonymous shared buffer of `nbytes` (freed when the last mapping closes)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(1, int(nbytes))
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("tilescope-tiles", os.MFD_CLOEXEC)
        else:  # macOS: an unlinked temporary file
            fd, name = tempfile.mkstemp(prefix="tilescope-tiles-")
            os.unlink(name)
            self.fd = fd
        os.ftruncate(self.fd, self.nbytes)
        self._mmap = mmap.mmap(self.fd, self.nbytes)
        self.array = np.frombuffer(self._mmap, np.uint8)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.array = np.zeros(0, np.uint8)
        try:
            self._mmap.close()
        except BufferError:  # a view is still alive (a caller kept a batch); the GC frees it
            pass


# -- the pool (parent side) ---------------------------------------------------------------------
class Worker:
    """One reader process and the parent's end of its socket."""

    def __init__(self) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        src = Path(__file__).resolve().parents[1]  # the folder holding this tilescope
        if src.name not in ("site-packages", "dist-packages"):  # a source tree, a sys.path edit
            env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
        code = "import sys; from tilescope._readers import worker_main as m; m(int(sys.argv[1]))"
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(child.fileno())], pass_fds=(child.fileno(),),
                env=env, stdin=subprocess.DEVNULL, close_fds=True,
            )  # fmt: skip
        finally:
            child.close()
        self.sock = parent
        self.pid = self.proc.pid
        self.ready = False
        self.outstanding = 0  # tasks sent and not answered

    def alive(self) -> bool:
        return self.proc.poll() is None and self.sock.fileno() >= 0

    def describe_exit(self) -> str:
        try:
            code: int | None = self.proc.wait(2.0)  # its socket closed: it is exiting
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            return "closed its connection"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with status {code}"

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Ask the worker to exit, kill it if it does not, and reap it (no zombie)."""
        if self.proc.poll() is None:
            try:
                send(self.sock, ("stop",))
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.close()


def available() -> bool:
    """Whether reader processes can run here (Unix sockets that pass descriptors, and a
    Python interpreter to start; not a frozen application)."""
    return (
        hasattr(socket, "send_fds")
        and hasattr(socket, "AF_UNIX")
        and not getattr(sys, "frozen", False)
    )


class ReaderPool:
    """Reader worker processes, reusable across streams (one stream at a time)."""

    def __init__(self) -> None:
        self.workers: list[Worker] = []
        self.busy = False
        self.closed = False
        self.pid = os.getpid()  # a forked child must not use its parent's workers

    def ensure(self, n: int) -> list[Worker]:
        """`n` live workers (dead ones replaced, more started if needed)."""
        for w in [w for w in self.workers if not w.alive()]:
            w.stop(0)
            self.workers.remove(w)
        while len(self.workers) < n:
            self.workers.append(Worker())
        return self.workers[:n]

    def discard(self, worker: Worker) -> None:
        """Stop a worker that cannot be trusted any more (stuck, or its protocol broken)."""
        worker.stop(0.5)
        if worker in self.workers:
            self.workers.remove(worker)

    def shutdown(self) -> None:
        self.closed = True
        for w in self.workers:
            w.stop()
        self.workers.clear()


_shared: ReaderPool | None = None
_shared_lock = threading.Lock()


def acquire_pool() -> tuple[ReaderPool, bool]:
    """The process's shared pool, or a private one if a stream already uses it; and whether
    the pool is private (shut it down after the stream)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.closed or _shared.pid != os.getpid():
            _shared = ReaderPool()
        if not _shared.busy:
            _shared.busy = True
            return _shared, False
    return ReaderPool(), True


def release_pool(pool: ReaderPool, private: bool) -> None:
    if private:
        pool.shutdown()
        return
    with _shared_lock:
        pool.busy = False


def shutdown_readers() -> None:
    """Stop the shared reader processes (they start again when next needed)."""
    global _shared
    with _shared_lock:
        pool, _shared = _shared, None
    if pool is not None and pool.pid == os.getpid():
        pool.shutdown()


atexit.register(shutdown_readers)


# -- the worker (child side) --------------------------------------------------------------------
def worker_main(fd: int) -> None:
    """Serve tasks until told to stop or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    sock = socket.socket(fileno=fd)
    state = _WorkerState()
    try:
        send(sock, ("ready", os.getpid()))
    except OSError:
        return
    try:
        while True:
            try:
                msg, fds = recv(sock)
            except (EOFError, OSError):
                return
            if msg[0] == "stop":
                return
            reply = state.handle(msg, fds)
            if reply is not None:
                try:
                    send(sock, reply)
                except OSError:  # the parent is gone
                    return
    finally:
        state.release()
        sock.close()


class _WorkerState:
    def __init__(self) -> None:
        self.slide: Any = None
        self.slide_key: tuple[str, float | None] | None = None
        self.mm: mmap.mmap | None = None
        self.cells: np.ndarray | None = None

    def handle(self, msg: tuple[Any, ...], fds: list[int]) -> tuple[Any, ...] | None:
        kind = msg[0]
        if kind == "arena":
            _, nbytes, tile_shape = msg
            self.release_arena()
            self.mm = mmap.mmap(fds[0], nbytes)
            os.close(fds[0])
            n = nbytes // int(np.prod(tile_shape))
            self.cells = np.frombuffer(self.mm, np.uint8, n * int(np.prod(tile_shape))).reshape(
                n, *tile_shape
            )
            return None
        if kind == "release":
            self.release()
            return None
        _, task_id, key, plan, reads, dests = msg
        try:
            return ("done", task_id, self.read(key, plan, reads, dests))
        except BaseException as exc:  # reported to the parent, which raises it
            return ("error", task_id, f"{type(exc).__name__}: {exc}", traceback.format_exc())

    def read(self, key: tuple[str, float | None], plan: Any, reads: Any,
             dests: dict[int, int]) -> list[tuple[int, str]]:  # fmt: skip
        from ._blocks import read_tiles
        from .slide import Slide

        if key != self.slide_key:
            if self.slide is not None:
                self.slide.close()
            self.slide, self.slide_key = None, None
            self.slide = Slide(key[0], mpp=key[1])
            self.slide_key = key
        cells = self.cells
        if cells is None:
            raise RuntimeError("no tile buffer was set up before the task")

        def emit(tile: int, rgb: np.ndarray) -> None:
            cells[dests[tile]] = rgb

        return read_tiles(self.slide, plan, reads, emit)

    def release_arena(self) -> None:
        self.cells = None
        if self.mm is not None:
            self.mm.close()
            self.mm = None

    def release(self) -> None:
        self.release_arena()
        if self.slide is not None:
            self.slide.close()
        self.slide, self.slide_key = None, None
