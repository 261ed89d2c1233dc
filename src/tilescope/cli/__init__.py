"""The ``tilescope`` command: thin argument parsing over the core.

One module per subcommand; each has ``register(sub)`` (its argparse parser, with
``func=run``) and ``run(args) -> int``. Nothing here holds logic of its own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .._version import __version__
from ..errors import TilescopeError
from . import check, classify, demo, embed, export, index, info, score, search
from ._common import EXIT_ERROR, EXIT_INTERRUPTED, describe

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "build_parser", "main"]

#: Subcommands in the order `tilescope --help` lists them.
COMMANDS = (info, embed, score, search, index, classify, export, check, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tilescope",
        description="Whole-slide images with BiomedCLIP patch embeddings. For research use only, "
        "not for diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"tilescope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (TilescopeError, OSError) as exc:
        print(f"tilescope: error: {describe(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("tilescope: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
