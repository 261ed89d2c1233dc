"""``tilescope export``: export embeddings, coordinates, scores and provenance."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import TilescopeError
from ._common import EXIT_ERROR, OVERWRITE_FLAG, describe


def run(args: argparse.Namespace) -> int:
    from ..anonymize import Anonymizer, slide_alias
    from ..catalog import read_signature
    from ..export import export_store
    from ..store import EmbeddingStore

    src = Path(args.store)
    if src.is_dir() and read_signature(src) is None:  # a folder of stores: one .h5 per slide
        return _cohort(args, src)
    try:
        out = export_store(
            args.store, args.out, dtype=args.dtype, overwrite=args.overwrite,
            anonymize=args.anonymize, scores=args.scores, objects=args.objects,
            threshold=args.threshold, mil_format=args.format,
        )  # fmt: skip
    except TilescopeError as exc:
        raise TilescopeError(describe(exc, overwrite=OVERWRITE_FLAG)) from exc
    store = EmbeddingStore.open(args.store)
    alias = slide_alias(store.signature)
    if store.n_done == store.n_tiles:
        print(f"wrote {out} (all {store.n_tiles} tiles)")
    else:
        print(
            f"wrote {out}: {store.n_done} of {store.n_tiles} tiles; left out {store.n_failed} "
            f"that could not be read and {store.n_todo} not embedded yet"
        )
    if args.format == "clam" and Path(out).suffix == ".h5":
        from ..mil import clam_pt_path

        print(f"wrote {clam_pt_path(out)} (CLAM's pt_files: the features as a torch tensor)")
    if args.anonymize:
        print(f"  anonymized: the slide's file name and paths are written as {alias}")
        if Anonymizer.for_store(store).leaks(Path(out).name):
            print(f"  NOTE: the output's own name ({Path(out).name}) contains the slide's name; "
                  f"rename it (e.g. {alias}{Path(out).suffix}) before sharing it")  # fmt: skip
    return 0


def _cohort(args: argparse.Namespace, folder: Path) -> int:
    from ..mil import clam_pt_path, export_h5_cohort

    if Path(args.out).suffix.lower() in (".zarr", ".geojson", ".json", ".h5"):
        raise TilescopeError(
            f"{folder} is a folder of stores: -o names a folder for one .h5 feature file per "
            f"slide, not {args.out}; export stores one by one for zarr or GeoJSON"
        )
    if args.objects != "tiles" or args.scores:
        raise TilescopeError("--as and --scores apply to one store; a folder exports .h5 files")
    result = export_h5_cohort(folder, args.out, fmt=args.format, overwrite=args.overwrite,
                              anonymize=args.anonymize)  # fmt: skip
    for path in result.written:
        print(f"wrote {path}")
        if args.format == "clam":
            print(f"wrote {clam_pt_path(path)}")
    for store, reason in result.skipped:
        print(f"tilescope: error: {store}: skipped: {reason}", file=sys.stderr)
    print(
        f"{len(result.written)} feature files ({args.format} layout) in {args.out}"
        + (f"; {len(result.skipped)} stores skipped" if result.skipped else "")
    )
    return EXIT_ERROR if result.skipped else 0


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="export embeddings, coordinates, scores, provenance")
    p.add_argument(
        "store",
        help="a store made by `tilescope embed` (a partial one exports its embedded tiles), "
        "or a folder of stores (one .h5 per slide)",
    )
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="OUT.zarr (embeddings, coordinates in px and µm, scores, provenance), "
        "OUT.geojson (QuPath objects, see --as) or OUT.h5 (MIL features, see --format); for a "
        "folder of stores, a folder for one <slide>.h5 per slide",
    )
    p.add_argument(
        "--dtype",
        choices=["float16", "float32"],
        default="float16",
        help="embedding dtype of a zarr export (float16)",
    )
    p.add_argument(
        "--as",
        dest="objects",
        choices=["tiles", "detections", "annotations"],
        default="tiles",
        help="GeoJSON: tiles (default: every tile with its scores), detections (embedded "
        "tiles as QuPath detections, classified by the score set if there is one) or "
        "annotations (class regions of --scores NAME at --threshold, in the classes' colours)",
    )
    p.add_argument(
        "--scores",
        action="append",
        metavar="NAME",
        help="saved score set to include (repeatable; default: all); annotations need one",
    )
    p.add_argument(
        "--threshold",
        type=_threshold,
        default=0.5,
        help="with --as annotations: a tile belongs to a class's region when its value "
        "(probability) is at least this (0.5)",
    )
    p.add_argument(
        "--format",
        choices=["trident", "clam", "stamp"],
        default="trident",
        help=".h5 layout: trident (default; features + coords in level-0 px, read by TRIDENT "
        "and CLAM's h5 loader), clam (coords attributes of CLAM's patching, and the features "
        "also as pt_files/<slide>.pt beside h5_files/, which CLAM's loader reads by default) or "
        "stamp (feats, coords in µm)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing export at OUT (never an embedding store)",
    )
    p.add_argument(
        "--anonymize",
        action="store_true",
        help="write no slide file name, stem or path (which often hold an accession number) "
        "anywhere in the export: they become slide-<digest>; a folder's .h5 files are named so",
    )
    p.set_defaults(func=run)
