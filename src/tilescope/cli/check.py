"""``tilescope check``: the full integrity check of stores."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._common import EXIT_ERROR


def run(args: argparse.Namespace) -> int:
    from ..check import check_store

    reports = [check_store(s) for s in args.stores]
    if args.json:
        out = [r.as_dict() for r in reports]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
        return 0 if all(r.ok for r in reports) else EXIT_ERROR
    for r in reports:
        model = r.model + ("" if r.trained else " (UNTRAINED)")
        state = "complete" if r.complete else "partial"
        counts = f"{r.n_done} of {r.n_tiles} tiles embedded"
        if r.n_failed or r.n_todo:
            counts += f" ({r.n_failed} failed, {r.n_todo} not embedded yet)"
        print(f"{r.path}: {'OK' if r.ok else 'DAMAGED'}: {state}, {counts}; slide {r.slide}; "
              f"model {model}")  # fmt: skip
        for problem in r.problems:
            print(f"  problem: {problem}")
        for note in r.notes:
            print(f"  note: {note}")
        if not r.ok:
            if r.repairable:
                print(
                    f"  repair: run `tilescope embed SLIDE -o {r.path}` with the settings that "
                    f"made it: the {r.rows_to_reembed} damaged rows are embedded again"
                )
            else:
                print(
                    "  repair: the store's layout or signature is lost; embed the slide again "
                    "into a new store (or with --overwrite)"
                )
    return 0 if all(r.ok for r in reports) else EXIT_ERROR


def register(sub: Any) -> None:
    p = sub.add_parser(
        "check", help="check stores fully: every array, every embedded row, the saved scores"
    )
    p.add_argument("stores", nargs="+", metavar="STORE", help="stores made by `tilescope embed`")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
