"""The parent side of a parallel tile stream: hands blocks to reader processes, collects
batches.

A feeder thread takes blocks from the `TileSchedule` (best first, at the moment a reader has
room), assigns each tile a cell of a batch slot in shared memory, and sends the block to a
reader with one or two tasks in hand. Readers write tiles straight into their cells. A slot
whose tiles have all arrived is a finished batch; batches are handed out in the order they
were assigned, i.e. schedule order. At most `prefetch` batches are assigned and not yet
handed out, so memory is bounded whatever the slide size, and a re-prioritised schedule
takes effect within `prefetch` batches.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _readers as rd
from ._blocks import ReadPlan
from .errors import ReaderError, TilescopeError
from .schedule import TileSchedule

#: Tasks in hand per reader: one being read, one waiting, so a reader never idles while the
#: parent answers.
DEPTH = 2
#: How long the feeder waits for outstanding tasks when a stream is closed.
DRAIN_TIMEOUT_S = 30.0


@dataclass
class Slot:
    """One batch being assembled in shared memory (cells ``base .. base + batch_size``)."""

    index: int
    base: int
    tiles: list[int] = field(default_factory=list)
    state: list[int] = field(default_factory=list)  # 0 pending, 1 read, 2 failed
    messages: dict[int, str] = field(default_factory=dict)
    closed: bool = False  # no more tiles will be assigned
    pending: int = 0


class Feeder:
    """Runs a stream's reads on `workers`; the consumer calls `next_batch` and `release`."""

    def __init__(self, pool: rd.ReaderPool, workers: list[rd.Worker], key: tuple[str, Any],
                 plan: ReadPlan, layout: Any, schedule: TileSchedule, batch_size: int,
                 prefetch: int, held: int) -> None:  # fmt: skip
        self.pool, self.workers, self.key, self.plan = pool, workers, key, plan
        self.coords, self.grid_rc = layout.coords, layout.grid_rc
        self.schedule, self.batch_size, self.prefetch = schedule, batch_size, prefetch
        tile_shape = (plan.tile_px, plan.tile_px, 3)
        n_slots = prefetch + held
        self.arena = rd.Arena(n_slots * batch_size * int(np.prod(tile_shape)))
        self.cells = self.arena.array.reshape(n_slots * batch_size, *tile_shape)
        self.free = deque(range(n_slots))
        self.queue: deque[Slot] = deque()  # assigned, not yet handed out, in order
        self.open: Slot | None = None
        self.exhausted = False
        self.error: BaseException | None = None
        self.stopping = False
        self.cond = threading.Condition()
        self.tasks: dict[int, tuple[rd.Worker, list[tuple[Slot, int]]]] = {}
        self.next_task = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)  # a full wake-up pipe already wakes the feeder
        for w in workers:
            try:
                rd.send(w.sock, ("arena", self.arena.nbytes, tile_shape), (self.arena.fd,))
            except OSError as exc:
                self.arena.close()
                pool.discard(w)
                raise ReaderError(
                    f"{key[0]}: a tile reader (process {w.pid}) "
                    f"{w.describe_exit()} before it started; run again"
                ) from exc
        self.thread = threading.Thread(target=self._run, name="tilescope-feeder", daemon=True)
        self.thread.start()

    # -- consumer side ------------------------------------------------------------------------
    def next_batch(self) -> Slot | None:
        """The next finished slot in order, None at the end; raises what went wrong."""
        with self.cond:
            while True:
                if self.queue and self._finished(self.queue[0]):
                    slot = self.queue.popleft()
                    self._wake()
                    return slot
                if self.error is not None:
                    raise self.error
                if self.exhausted and not self.queue and self.open is None:
                    return None
                if not self.queue and not self.free:
                    raise TilescopeError(
                        "every tile buffer is held by the consumer: release batches "
                        "(TileBatch.release) before asking for the next one"
                    )
                self.cond.wait(0.5)

    def images(self, slot: Slot) -> np.ndarray:
        return self.cells[slot.base : slot.base + len(slot.tiles)]

    def release(self, slot: Slot) -> None:
        with self.cond:
            self.free.append(slot.index)
        self._wake()

    def close(self) -> None:
        """Stop dispatching, wait for the tasks in hand, and let go of the workers."""
        with self.cond:
            self.stopping = True
        self._wake()
        self.thread.join()
        for w in self.workers:
            if w.alive():
                try:
                    rd.send(w.sock, ("release",))
                except OSError:
                    self.pool.discard(w)
        self.arena.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- feeder thread ------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _finished(self, slot: Slot) -> bool:
        return slot.closed and slot.pending == 0

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        for w in self.workers:
            sel.register(w.sock, selectors.EVENT_READ, w)
        try:
            while True:
                with self.cond:
                    if self.stopping or self.error is not None:
                        break
                    self._dispatch()
                    if self.exhausted and self.open is None and not self.tasks:
                        self.cond.notify_all()
                for key, _ in sel.select(timeout=1.0):
                    if key.data is None:
                        try:
                            self._wake_r.recv(4096)
                        except BlockingIOError:
                            pass
                        continue
                    self._receive(key.data)
                self._check_alive()
            self._drain(sel)
        except BaseException as exc:  # any surprise reaches the consumer
            with self.cond:
                self.error = self.error or exc
                self.cond.notify_all()
        finally:
            sel.close()

    def _dispatch(self) -> None:
        """Send blocks to workers with room, while batches ahead stay within `prefetch`."""
        for w in self.workers:
            while w.outstanding < DEPTH and not self.exhausted and self.error is None:
                room = self._room()
                if room == 0:
                    return
                tiles = self.schedule.take(room)
                if tiles is None:
                    self.exhausted = True
                    if self.open is not None:
                        self._close_open()
                    return
                self._send_task(w, tiles)

    def _room(self) -> int:
        """Tiles that can be assigned now: what is left of the open slot, plus a new slot if
        one is free and the batches ahead stay within `prefetch`."""
        left = self.batch_size - len(self.open.tiles) if self.open is not None else 0
        if self.free and len(self.queue) < self.prefetch:  # the queue includes the open slot
            left += self.batch_size
        return left

    def _send_task(self, w: rd.Worker, tiles: np.ndarray) -> None:
        dests: dict[int, int] = {}
        where: list[tuple[Slot, int]] = []
        for t in tiles:
            if self.open is None:
                self.open = Slot(self.free.popleft(), 0)
                self.open.base = self.open.index * self.batch_size
                self.queue.append(self.open)
            slot = self.open
            pos = len(slot.tiles)
            slot.tiles.append(int(t))
            slot.state.append(0)
            slot.pending += 1
            dests[int(t)] = slot.base + pos
            where.append((slot, pos))
            if len(slot.tiles) == self.batch_size:
                self._close_open()
        reads = self.plan.reads(tiles, self.coords[tiles], self.grid_rc[tiles])
        task_id = self.next_task
        self.next_task += 1
        self.tasks[task_id] = (w, where)
        w.outstanding += 1
        try:
            rd.send(w.sock, ("task", task_id, self.key, self.plan, reads, dests))
        except OSError:
            self._dead(w)

    def _close_open(self) -> None:
        if self.open is not None:
            self.open.closed = True
            self.open = None
            self.cond.notify_all()

    def _receive(self, w: rd.Worker) -> None:
        try:
            msg, fds = rd.recv(w.sock)
        except (EOFError, OSError):
            w.proc.poll()
            self._dead(w)
            return
        for fd in fds:  # workers never send descriptors
            os.close(fd)
        kind = msg[0]
        if kind == "ready":
            w.ready = True
            return
        task = self.tasks.pop(msg[1], None)
        if task is None:
            return
        w.outstanding -= 1
        with self.cond:
            if kind == "error":
                self.error = ReaderError(
                    f"{self.key[0]}: a tile reader (process {w.pid}) failed: {msg[2]}"
                )
                self.cond.notify_all()
                return
            failed = dict(msg[2])
            for slot, pos in task[1]:
                tile = slot.tiles[pos]
                if tile in failed:
                    slot.state[pos] = 2
                    slot.messages[tile] = failed[tile]
                else:
                    slot.state[pos] = 1
                slot.pending -= 1
            self.cond.notify_all()

    def _dead(self, w: rd.Worker) -> None:
        lost = [tid for tid, (tw, _) in self.tasks.items() if tw is w]
        what = f"{w.describe_exit()} while reading tiles" if lost else w.describe_exit()
        with self.cond:
            self.error = self.error or ReaderError(
                f"{self.key[0]}: a tile reader (process {w.pid}) {what}; the tiles it was "
                "reading are not read. Run again to resume; if it happens again at the same "
                "place, the slide file may be damaged there (try `num_workers=0` / "
                "`--workers 0` to read in the main process and see the error)"
            )
            self.cond.notify_all()
        self.pool.discard(w)

    def _check_alive(self) -> None:
        for w in self.workers:
            if w.proc.poll() is not None and self.error is None:
                self._dead(w)

    def _drain(self, sel: selectors.BaseSelector) -> None:
        """Wait for the answers to tasks in hand, so workers start the next stream idle."""
        deadline = threading.Event()
        timer = threading.Timer(DRAIN_TIMEOUT_S, deadline.set)
        timer.start()
        try:
            while self.tasks and not deadline.is_set():
                for key, _ in sel.select(timeout=0.5):
                    if key.data is not None:
                        self._receive(key.data)
                for w in {tw for tw, _ in self.tasks.values()}:
                    if not w.alive():
                        self.tasks = {k: v for k, v in self.tasks.items() if v[0] is not w}
        finally:
            timer.cancel()
        for w in {tw for tw, _ in self.tasks.values()}:  # stuck: never reuse them
            self.pool.discard(w)
