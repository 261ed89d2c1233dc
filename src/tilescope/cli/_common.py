"""Pieces shared by the ``tilescope`` subcommands: progress bar, argument types, messages."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import TilescopeError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class ProgressBar:
    """A terminal progress bar (patches/s, ETA) made when the tile count is known."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar: Any = None

    def update(self, p: Any) -> None:
        if p.stage == "tissue":
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(desc=self.name, unit="patch", total=p.total, dynamic_ncols=True)
        self.bar.n = p.done
        if p.failed:
            self.bar.set_postfix_str(f"{p.failed} failed")
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def parse_box(text: str) -> list[list[float]]:
    """ "x,y,w,h" in level-0 pixels -> the rectangle's two corners for search.tiles_in_shapes."""
    try:
        x, y, w, h = (float(v) for v in text.split(","))
    except ValueError:
        msg = f"a region is x,y,width,height in level-0 pixels, not {text!r}"
        raise TilescopeError(msg) from None
    return [[x, y], [x + w, y + h]]


def require_slide_for_png(args: argparse.Namespace) -> None:
    """Refuse `--png` without `--slide` before any work is done (or saved)."""
    if args.png and not args.slide:
        raise TilescopeError("--png draws over the slide: pass its file with --slide")


def xywh(text: str) -> tuple[float, float, float, float]:
    (x0, y0), (x1, y1) = parse_box(text)
    return x0, y0, x1 - x0, y1 - y0


def label_line(pooled: object) -> str:
    scores = getattr(pooled, "scores", {})
    parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items(), key=lambda kv: -kv[1]))
    return (
        f"slide label: {getattr(pooled, 'label', '?')} ({getattr(pooled, 'method', '')}: {parts})"
    )


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_png_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--png", help=f"write {what} over the slide to this PNG")
    p.add_argument("--slide", help="the slide file (needed by --png)")
    p.add_argument(
        "--slide-mpp", type=float, default=None, help="override the slide's own µm/px (--png)"
    )


def describe(exc: BaseException) -> str:
    """One line for the user: a TilescopeError's message, or a file-system error's path and
    reason (``path: Permission denied``)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        where = str(exc.filename)
        if exc.filename2 is not None:
            where += f" -> {exc.filename2}"
        return f"{where}: {exc.strerror or exc}"
    return str(exc)
