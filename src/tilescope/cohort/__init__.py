"""Cohorts: many slides embedded on a Dask cluster, and many stores scored at once.

Embedding runs the same per-slide pipeline (`tilescope.embed.embed_slide`), one Dask task
per slide, on ``dask.distributed``: a `LocalCluster` on one machine, or any cluster that runs
already (dask-jobqueue on Slurm, dask-kubernetes, a scheduler address). Each worker loads the
model once (a worker plugin) on its own device; finished stores are left as they are and
partial ones resumed; a slide whose worker dies goes to another worker; a slide that fails
twice is reported and the others complete. Running the same command again resumes a cohort.

Examples
--------
>>> from tilescope.cohort import connect, embed_cohort                  # doctest: +SKIP
>>> with connect(local=2) as conn:                                       # doctest: +SKIP
...     result = embed_cohort(conn.client, [("a.svs", "out/a.zarr")], model="tiny-random")
>>> [r.status for r in result.reports]                                   # doctest: +SKIP
['embedded']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._score import ScoredSlide, TopTile, score_stores

if TYPE_CHECKING:
    from ._cluster import Connection, connect, parse_local
    from ._progress import CohortProgress
    from ._run import SUMMARY_NAME, CohortResult, SlideReport, embed_cohort
    from ._worker import ModelSpec, worker_device

#: Names imported on first use: scoring stores needs no Dask.
_LAZY = {
    "Connection": "._cluster", "connect": "._cluster", "parse_local": "._cluster",
    "CohortProgress": "._progress", "SUMMARY_NAME": "._run", "CohortResult": "._run",
    "SlideReport": "._run", "embed_cohort": "._run", "ModelSpec": "._worker",
    "worker_device": "._worker",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SUMMARY_NAME",
    "CohortProgress",
    "CohortResult",
    "Connection",
    "ModelSpec",
    "ScoredSlide",
    "SlideReport",
    "TopTile",
    "connect",
    "embed_cohort",
    "parse_local",
    "score_stores",
    "worker_device",
]
