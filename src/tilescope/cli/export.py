"""``tilescope export``: export embeddings, coordinates, scores and provenance."""

from __future__ import annotations

import argparse
from typing import Any


def run(args: argparse.Namespace) -> int:
    from ..export import export_store

    out = export_store(args.store, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="export embeddings, coordinates, scores, provenance")
    p.add_argument("store", help="a complete store made by `tilescope embed`")
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="OUT.zarr (embeddings, coordinates in px and µm, scores, provenance) or "
        "OUT.geojson (tile polygons with scores, for QuPath)",
    )
    p.add_argument(
        "--dtype",
        choices=["float16", "float32"],
        default="float16",
        help="embedding dtype of a zarr export (float16)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing export at OUT (never an embedding store)",
    )
    p.set_defaults(func=run)
