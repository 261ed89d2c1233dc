"""``tilescope index``: one searchable index over every complete store in a folder."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def run(args: argparse.Namespace) -> int:
    from ..index import update_index

    def say(message: str) -> None:
        print(message, file=sys.stderr if args.json else sys.stdout, flush=True)

    reports = update_index(args.folder, rebuild=args.rebuild, ann=args.ann, progress=say)
    if args.json:
        print(json.dumps([_as_json(r) for r in reports], indent=2))
        return 0
    if not reports:
        print(f"{args.folder}: no complete store to index yet (embed the slides to the end)")
    for r in reports:
        what = "up to date" if not r.changed else (
            f"+{len(r.added)} stores, -{len(r.dropped)}" + (", rewritten" if r.rebuilt else "")
        )  # fmt: skip
        ann = f"approximate index {r.ann}" if r.ann else "exact search only"
        print(f"{r.path} ({r.model_id}): {r.n_stores} stores, {r.n_live:,} patches; {what}; "
              f"{ann}; {r.seconds:.1f} s")  # fmt: skip
        for store, why in r.skipped:
            print(f"  not indexed: {store}: {why}")
    return 0


def _as_json(r: Any) -> dict[str, Any]:
    return {
        "index": str(r.path),
        "model_id": r.model_id,
        "n_stores": r.n_stores,
        "n_patches": r.n_live,
        "n_rows": r.n_rows,
        "added": r.added,
        "dropped": r.dropped,
        "rewritten": r.rebuilt,
        "skipped": [{"store": s, "reason": why} for s, why in r.skipped],
        "approximate_index": r.ann,
        "seconds": round(r.seconds, 2),
    }


def register(sub: Any) -> None:
    p = sub.add_parser(
        "index",
        help="build or update the searchable index of a folder of stores",
        description="Index every complete store under FOLDER (sub-folders too) into "
        "FOLDER/tilescope-index/, one index per model. Run it again after adding, removing or "
        "re-embedding slides: only the changes are written. `search --against FOLDER` does "
        "this by itself when the index is out of date.",
    )
    p.add_argument("folder", help="the folder of stores")
    p.add_argument("--rebuild", action="store_true", help="write the index again from scratch")
    p.add_argument(
        "--ann",
        choices=("auto", "on", "off"),
        default="auto",
        help="approximate index (FAISS IVF, reranked exactly): auto = from 2,000,000 patches",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
