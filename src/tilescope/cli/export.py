"""``tilescope export``: export embeddings, coordinates, scores and provenance."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import OVERWRITE_FLAG, describe


def run(args: argparse.Namespace) -> int:
    from ..errors import TilescopeError
    from ..export import export_store
    from ..store import EmbeddingStore

    try:
        out = export_store(
            args.store, args.out, dtype=args.dtype, overwrite=args.overwrite,
            anonymize=args.anonymize,
        )  # fmt: skip
    except TilescopeError as exc:
        raise TilescopeError(describe(exc, overwrite=OVERWRITE_FLAG)) from exc
    store = EmbeddingStore.open(args.store)
    if store.n_done == store.n_tiles:
        print(f"wrote {out} (all {store.n_tiles} tiles)")
    else:
        print(
            f"wrote {out}: {store.n_done} of {store.n_tiles} tiles; left out {store.n_failed} "
            f"that could not be read and {store.n_todo} not embedded yet"
        )
    if args.anonymize:
        print("  the slide's file name is replaced by a digest of its content")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="export embeddings, coordinates, scores, provenance")
    p.add_argument(
        "store",
        help="a store made by `tilescope embed` (a partial one exports its embedded tiles)",
    )
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
    p.add_argument(
        "--anonymize",
        action="store_true",
        help="replace the slide's file name (which often holds an accession number) by a "
        "digest in the export's provenance",
    )
    p.set_defaults(func=run)
