"""Cohort progress from the workers' events: slides done, patches/s across the cluster, ETA.

Workers send one small event per slide at most every half second (`tilescope.cohort._worker`);
`ProgressBook` keeps the latest of each attempt and turns them into a `CohortProgress`.
Everything final (the summary) comes from the tasks' results, never from events, so a lost
event only makes the display lag.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Seconds of history behind the patches/s figure.
RATE_WINDOW = 30.0


@dataclass(frozen=True)
class CohortProgress:
    """One progress report of a cohort run.

    ``patches_embedded`` counts tiles embedded in this run (across attempts); ``rate`` is
    patches/s across the cluster over the last `RATE_WINDOW` seconds; ``eta`` the seconds
    left at that rate (None while unknown: slides whose tile count is not known yet count as
    the mean of those known).
    """

    slides_total: int
    slides_done: int
    slides_failed: int
    slides_running: int
    patches_embedded: int
    rate: float
    eta: float | None
    workers: int
    elapsed: float


class ProgressBook:
    """The latest event of every attempt of every slide, and the run's rate history."""

    def __init__(self, n_slides: int, *, clock: Any = time.monotonic) -> None:
        self.n_slides = n_slides
        self.clock = clock
        self.t0 = clock()
        self.attempts: dict[str, dict[str, Any]] = {}  # attempt id -> latest event
        self.latest: dict[int, dict[str, Any]] = {}  # slide -> latest event of any attempt
        self.starts: dict[int, int] = {}  # slide -> attempts started
        self.finished: dict[int, bool] = {}  # slide -> True done, False failed
        self.history: deque[tuple[float, int]] = deque()

    def event(self, msg: Mapping[str, Any]) -> None:
        slide, attempt = int(msg["slide"]), str(msg["attempt"])
        if msg.get("stage") == "start":
            self.starts[slide] = self.starts.get(slide, 0) + 1
        prev = self.attempts.get(attempt, {})
        self.attempts[attempt] = {**prev, **msg}
        self.latest[slide] = {**self.latest.get(slide, {}), **msg}

    def finish(self, slide: int, ok: bool, tiles: int | None = None) -> None:
        self.finished[slide] = ok
        if tiles is not None:
            self.latest.setdefault(slide, {})["total"] = tiles
            self.latest[slide]["done"] = tiles

    def embedded(self) -> int:
        return sum(int(a.get("embedded", 0)) for a in self.attempts.values())

    def snapshot(self, running: int, workers: int) -> CohortProgress:
        now = self.clock()
        total = self.embedded()
        self.history.append((now, total))
        while len(self.history) > 2 and now - self.history[0][0] > RATE_WINDOW:
            self.history.popleft()
        t_first, n_first = self.history[0]
        rate = (total - n_first) / (now - t_first) if now - t_first > 0 else 0.0
        return CohortProgress(
            slides_total=self.n_slides,
            slides_done=sum(self.finished.values()),
            slides_failed=sum(not ok for ok in self.finished.values()),
            slides_running=running,
            patches_embedded=total,
            rate=rate,
            eta=self._eta(rate),
            workers=workers,
            elapsed=now - self.t0,
        )

    def _eta(self, rate: float) -> float | None:
        if rate <= 0:
            return None
        known = {s: e for s, e in self.latest.items() if int(e.get("total", 0)) > 0}
        left = 0.0
        for slide, e in known.items():
            if slide not in self.finished:
                left += max(0, int(e["total"]) - int(e.get("done", 0)))
        unknown = self.n_slides - len(self.finished) - sum(s not in self.finished for s in known)
        if unknown > 0:
            if not known:
                return None
            left += unknown * sum(int(e["total"]) for e in known.values()) / len(known)
        return left / rate
