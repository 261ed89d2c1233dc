"""The ``tilescope`` command: thin argument parsing over the core."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ._version import __version__
from .errors import TilescopeError

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _cmd_info(args: argparse.Namespace) -> int:
    from .slide import Slide

    with Slide(args.slide, mpp=args.slide_mpp) as slide:
        info = slide.info()
    if args.json:
        print(json.dumps(info.as_dict(), indent=2))
        return 0
    w, h = info.dimensions
    if info.mpp_x is None:
        mpp = "unknown (not recorded; pass --slide-mpp to set it)"
    else:
        mpp = f"{info.mpp_x:.4g} x {info.mpp_y:.4g} µm/px ({info.mpp_source})"
    mag = f"{info.objective_power:g}x" if info.objective_power else "unknown"
    print(f"file:          {info.path}")
    print(f"vendor:        {info.vendor}")
    print(f"size:          {w} x {h} px")
    print(f"mpp:           {mpp}")
    print(f"magnification: {mag}")
    print(f"levels:        {info.level_count}")
    for i, ((lw, lh), ds) in enumerate(zip(info.level_dimensions, info.level_downsamples)):
        print(f"  level {i}: {lw} x {lh} px (downsample {ds:g})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilescope",
        description="Whole-slide images with BiomedCLIP patch embeddings. For research use only, "
        "not for diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"tilescope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="print a slide's vendor, size, levels, mpp, magnification")
    p.add_argument("slide", help="slide file (anything OpenSlide reads)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--slide-mpp", type=float, default=None, help="override the slide's mpp")
    p.set_defaults(func=_cmd_info)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Other modules' sub-commands register here (kept in their own files to keep this one thin).
_EXTRA_COMMANDS: list = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TilescopeError as exc:
        print(f"tilescope: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("tilescope: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
