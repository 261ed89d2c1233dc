"""``tilescope embed --cluster local[:N] | --scheduler ADDR | --scheduler-file FILE``.

The slides are checked and their stores chosen here (`tilescope.cli.embed.plan`, as for a
serial run); then `tilescope.cohort.embed_cohort` runs one Dask task per slide. Terminal
output: the cluster and its dashboard, one line per slide as it ends, a bar of slides done
with patches/s across the cluster and the ETA, and the per-slide summary CSV.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import TilescopeError, reword
from ._common import EXIT_ERROR, OVERWRITE_FLAG


def wanted(args: argparse.Namespace) -> bool:
    """True if the command line asks for a Dask cluster."""
    return bool(args.cluster or args.scheduler or args.scheduler_file)


def run(args: argparse.Namespace, grid: Any, todo: list[tuple[str, Path]], roi: dict) -> int:
    """Embed `todo` on the cluster the flags name; the exit status (1 if a slide failed)."""
    from ..cohort import SUMMARY_NAME, ModelSpec, connect, embed_cohort, parse_local

    local: int | None | bool = parse_local(args.cluster) if args.cluster else False
    folder = Path(todo[0][1]).parent  # where plan() put the stores (-o DIR, or the default)
    embed_kwargs = dict(
        grid=grid,
        slide_mpp=args.slide_mpp,
        batch_size=args.batch_size,
        num_workers=args.workers,
        overwrite=args.overwrite,
        retry_failed=args.retry_failed,
        **roi,
    )
    load_kwargs = {"backend": args.backend, "compile": bool(args.compile)}
    display = _Display(len(todo))
    with connect(local=local, scheduler=args.scheduler, scheduler_file=args.scheduler_file) as c:
        print(f"cohort: {len(todo)} slide{'s' if len(todo) != 1 else ''} on {c.description}")
        print(
            f"  dashboard: {c.dashboard}"
            if c.dashboard
            else "  dashboard: none (the scheduler serves none; `pip install bokeh` for it)"
        )
        spec = ModelSpec(name=args.model, device=args.device, load_kwargs=load_kwargs)
        try:
            result = embed_cohort(
                c.client,
                todo,
                model=spec,
                embed_kwargs=embed_kwargs,
                retries=1,
                summary=folder / SUMMARY_NAME,
                torch_threads=c.torch_threads,
                progress=display.progress,
                on_slide=display.slide,
                on_model=display.model,
            )
        finally:
            display.close()
    status = 0
    counts: dict[str, int] = {}
    for r in result.reports:
        counts[r.status] = counts.get(r.status, 0) + 1
        if r.status == "failed" or r.failed_tiles:
            status = EXIT_ERROR
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"summary: {result.summary} ({parts}; {result.seconds:.0f} s)")
    if result.failed:
        print(
            "run the same command again to retry the failed slides; finished ones are kept",
            file=sys.stderr,
        )
    return status


class _Display:
    """Terminal output: a tqdm bar of slides with patches/s and ETA, a line per slide."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.bar: Any = None

    def model(self, info: dict[str, Any]) -> None:
        tower = info.get("image_tower", f"on {info.get('device')}")
        print(f"  model: {info.get('label')}, image tower: {tower} (worker {info.get('worker')})")
        if not info.get("trained", True):
            print(f"NOTE: {info.get('label')}: embeddings are for testing the pipeline only.")
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.n,
            unit="slide",
            dynamic_ncols=True,
            file=sys.stderr,
            bar_format="{n_fmt}/{total_fmt} slides |{bar}| {desc}",
        )

    def progress(self, p: Any) -> None:
        if self.bar is None:
            return
        eta = "?" if p.eta is None else _duration(p.eta)
        self.bar.n = p.slides_done + p.slides_failed
        failed = f", {p.slides_failed} failed" if p.slides_failed else ""
        self.bar.set_description_str(
            f"{p.slides_running} running on {p.workers} workers{failed}, {p.patches_embedded:,} "
            f"patches, {p.rate:,.0f} patches/s, ETA {eta}",
            refresh=False,
        )
        self.bar.refresh()

    def slide(self, r: Any) -> None:
        name = Path(r.slide).name
        if r.status == "failed":
            line = (
                f"{name}: FAILED after {r.attempts} attempt(s): {reword(r.error, OVERWRITE_FLAG)}"
            )
        elif r.status == "complete":
            line = f"{name}: already embedded in {r.store}; nothing to do"
        else:
            line = f"{name}: {r.tiles} tiles -> {r.store} ({r.seconds:.1f} s, worker {r.worker})"
            if r.status == "partial":
                line += "; partial (tiles left to embed)"
        if r.failed_tiles:
            line += f"; {r.failed_tiles} tiles could not be read (--retry-failed tries them again)"
        if r.status != "failed" and r.error:
            line += f"; note: {r.error}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr if r.status == "failed" else sys.stdout)
        else:
            print(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The cluster flags of ``tilescope embed`` (mutually exclusive)."""
    g = p.add_argument_group(
        "cohorts on Dask (one task per slide; without these flags slides run one after another "
        "in this process)"
    ).add_mutually_exclusive_group()
    g.add_argument(
        "--cluster",
        metavar="local[:N]",
        help="start a local Dask cluster of N worker processes (default: one per GPU, else 1)",
    )
    g.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="join a running Dask cluster")
    g.add_argument(
        "--scheduler-file",
        metavar="FILE",
        help="join a running Dask cluster through its scheduler file (Slurm, dask-jobqueue)",
    )


def check(args: argparse.Namespace) -> None:
    """Refuse what a cluster run cannot do, before any slide is opened."""
    if args.cluster:
        from ..cohort import parse_local

        parse_local(args.cluster)
    try:
        import distributed  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise TilescopeError(
            "--cluster/--scheduler need dask.distributed: pip install distributed"
        ) from None
