"""Pieces shared by the ``tilescope`` subcommands: progress bar, argument types, messages."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ..errors import TilescopeError, reword

#: What `describe` puts where the core offers to overwrite, in commands that have the flag.
OVERWRITE_FLAG = "pass --overwrite to replace it"

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class ProgressBar:
    """A terminal progress bar (patches/s, ETA) made when the tile count is known.

    It starts at the tiles already done (a resumed store) and counts this run's tiles with
    ``update``, so tqdm's rate and ETA are this run's: setting ``n`` to a resumed count made
    tqdm divide thousands of old tiles by a few milliseconds.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar: Any = None

    def update(self, p: Any) -> None:
        if p.stage == "tissue":
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(desc=self.name, unit="patch", total=p.total, initial=p.done,
                            dynamic_ncols=True)  # fmt: skip
        if p.done > self.bar.n:
            self.bar.update(p.done - self.bar.n)
        if p.failed:
            self.bar.set_postfix_str(f"{p.failed} failed")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def parse_box(text: str, flag: str = "--region") -> list[list[float]]:
    """ "x,y,w,h" in level-0 pixels -> the rectangle's two corners for search.tiles_in_shapes.

    Width and height must be positive and every number finite."""
    try:
        x, y, w, h = (float(v) for v in text.split(","))
    except ValueError:
        msg = f"{flag} {text!r}: a region is x,y,width,height in level-0 pixels"
        raise TilescopeError(msg) from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise TilescopeError(f"{flag} {text!r}: every number must be finite")
    if w <= 0 or h <= 0:
        raise TilescopeError(
            f"{flag} {text!r}: width and height must be positive (x,y is the top-left corner "
            "in level-0 pixels)"
        )
    return [[x, y], [x + w, y + h]]


def check_save_name(args: argparse.Namespace, what: str) -> None:
    """``--save NAME``, if given, names a score set the store can hold (checked before work)."""
    if args.save is None:
        return
    from .._store_scores import check_score_name

    try:
        check_score_name(Path(args.store), args.save)
    except TilescopeError:
        raise TilescopeError(
            f"--save {args.save!r}: a name for {what} must be non-empty and use only "
            "A-Z a-z 0-9 _ . - (not starting with . or -)"
        ) from None


def require_slide_for_png(args: argparse.Namespace) -> None:
    """Refuse `--png` without `--slide`, or to a file not named .png, before any work is done
    (or saved)."""
    if args.png and not args.slide:
        raise TilescopeError("--png draws over the slide: pass its file with --slide")
    if args.png and Path(args.png).suffix.lower() != ".png":
        raise TilescopeError(f"--png {args.png}: the figure is a PNG file; name it ….png")


def require_store_slide(args: argparse.Namespace, store: Any) -> None:
    """Refuse `--png --slide OTHER` before any work: the slide must be the store's (same
    file content: byte size and header digest), else its heatmap lands on another slide."""
    if not args.png or not args.slide:
        return
    from ..catalog import file_identity, same_slide

    slide = Path(args.slide)
    if not slide.is_file():
        raise TilescopeError(f"--slide {slide}: no such file; pass the slide of {store.path}")
    made_from = store.signature.get("slide") or {}
    if not same_slide(made_from, file_identity(slide)):
        raise TilescopeError(
            f"--slide {slide}: is not the slide this store was made from "
            f"({made_from.get('name', '?')}, {made_from.get('size_bytes', '?')} bytes); pass "
            "that slide's file, or the store of this slide"
        )


def state_text(store: Any) -> str:
    """'all 214 tiles' or '112 of 214 tiles (3 failed, 99 not embedded yet)'."""
    if store.n_done == store.n_tiles:
        return f"all {store.n_tiles} tiles"
    return store.state_text().replace(" tiles embedded", " tiles")


def xywh(text: str) -> tuple[float, float, float, float]:
    (x0, y0), (x1, y1) = parse_box(text)
    return x0, y0, x1 - x0, y1 - y0


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number of at least 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def add_png_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--png", help=f"write {what} over the slide to this PNG")
    p.add_argument("--slide", help="the slide file (needed by --png)")
    p.add_argument(
        "--slide-mpp", type=float, default=None, help="override the slide's own µm/px (--png)"
    )


def describe(exc: BaseException, *, overwrite: str | None = None) -> str:
    """One line for the user: a TilescopeError's message, or a file-system error's path and
    reason (``path: Permission denied``).

    Commands with an ``--overwrite`` flag pass `overwrite` (e.g. ``"pass --overwrite to
    replace it"``) to name it where the core offers to overwrite; others say nothing of it.
    """
    if isinstance(exc, OSError) and exc.filename is not None:
        where = str(exc.filename)
        if exc.filename2 is not None:
            where += f" -> {exc.filename2}"
        return f"{where}: {exc.strerror or exc}"
    text = str(exc)
    return reword(text, overwrite) if overwrite else text
