"""``tilescope search``: find tiles like a region, in this and other stores."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import TilescopeError
from ..search import NEG_WEIGHT
from ._common import (
    add_png_args,
    check_save_name,
    parse_box,
    positive_int,
    require_slide_for_png,
    require_store_slide,
    xywh,
)


def run(args: argparse.Namespace) -> int:
    from ..index import search_cohort
    from ..search import query_from_regions
    from ..store import EmbeddingStore

    require_slide_for_png(args)
    _check_outputs(args)
    if not args.region and not args.region_geojson:
        raise TilescopeError("give the query as --region X,Y,W,H or --region-geojson FILE")
    args.region = args.region or []
    positive = [parse_box(b) for b in args.region]
    negative = [parse_box(b, "--unlike") for b in args.unlike]
    store = EmbeddingStore.open(args.store)
    require_store_slide(args, store)
    regions = " and ".join(args.region)
    empty = (
        f"the region {regions} covers no embedded tissue tiles"
        if len(args.region) == 1
        else f"the regions {regions} cover no embedded tissue tiles"
    ) + " (coordinates are level-0 pixels)"
    if args.region_geojson:  # QuPath annotations, plus any --region / --unlike boxes
        query, pos, neg = _geojson_query(args, store, positive, negative)
    else:
        query, pos, neg = query_from_regions(
            store, positive, negative, args.unlike_weight, empty_message=empty
        )
    targets = args.against or [store.path]
    exclude = {store.path: pos}  # the query tiles themselves are not matches
    found = search_cohort(
        query, targets, model=store.signature["model"], k=args.k, per_slide=args.per_slide,
        exclude=exclude, use_index=not args.no_index, exact=args.exact,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )  # fmt: skip
    matches = found.matches
    trained = bool(store.signature["model"].get("trained", True))
    outputs = _write_outputs(args, store, query, pos, neg, matches)
    if args.json:
        print(
            json.dumps(
                {
                    "store": str(store.path),
                    "n_tiles": store.n_tiles,
                    "n_done": store.n_done,
                    "n_failed": store.n_failed,
                    "n_not_embedded": store.n_todo,
                    "complete": store.complete,
                    "trained_model": trained,  # False: similarities of an untrained model
                    "query": {
                        "like": len(pos),
                        "unlike": len(neg),
                        "unlike_weight": args.unlike_weight,
                    },  # fmt: skip
                    "per_slide": args.per_slide,
                    "searched": {
                        "through_index": found.n_indexed,
                        "directly": found.n_direct,
                        "indexes": found.indexes,
                        "approximate": found.approximate,
                    },  # fmt: skip
                    "notes": found.notes,
                    "matches": [m.__dict__ for m in matches],
                    **outputs,
                },
                indent=2,
                allow_nan=False,
            )
        )
    else:
        if not trained:
            print("NOTE: stores embedded with an UNTRAINED model: these matches mean nothing.")
        if store.n_todo:
            print(f"NOTE: the store is partial ({store.state_text()}): only embedded tiles "
                  "are queried and matched")  # fmt: skip
        if args.unlike and not len(neg):
            print(f"NOTE: --unlike {' and '.join(args.unlike)} covers no embedded tiles")
        for note in found.notes:
            print(f"NOTE: {note}")
        if found.approximate:
            print("NOTE: --exact searches every patch exactly")
        cap = f", at most {args.per_slide} per slide" if args.per_slide else ""
        print(f"query: {len(pos)} tiles like, {len(neg)} unlike; top {len(matches)} matches{cap}")
        for rank, m in enumerate(matches, 1):
            print(
                f"{rank:>3}. {m.slide_name:<32} x={m.x:<7} y={m.y:<7} similarity {m.similarity:.4f}"
                + (f"  {m.store}" if args.against else "")
            )
        _print_outputs(args, store, outputs)
    if args.png:
        from ..figures import similarity_figure
        from ..search import similarity_map

        here = store.path.resolve()
        trained = store.signature["model"].get("trained", True)
        similarity_figure(
            args.slide,
            store,
            similarity_map(store, query),
            args.png,
            boxes=[xywh(b) for b in args.region],
            marks=[
                (m.x, m.y, m.tile_l0, m.tile_l0) for m in matches if Path(m.store).resolve() == here
            ],
            slide_mpp=args.slide_mpp,
            warning=None if trained else "UNTRAINED model: NOT A RESULT",
        )
        print(f"wrote {args.png}")
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse a bad --geojson or --save before any work."""
    if args.geojson:
        out = Path(args.geojson)
        if out.suffix.lower() not in (".geojson", ".json"):
            raise TilescopeError(f"--geojson {out}: the matches are GeoJSON; name it ….geojson")
        if out.is_dir():
            raise TilescopeError(f"--geojson {out}: is a folder; name a .geojson file")
    check_save_name(args, "the similarity map")


def _write_outputs(args: argparse.Namespace, store: Any, query: Any, pos: Any, neg: Any,
                   matches: list) -> dict[str, Any]:  # fmt: skip
    """--geojson: the matches on the query's slide as QuPath objects; --save: the similarity
    map as a score set of the query's store. Returns what `--json` reports of them."""
    out: dict[str, Any] = {}
    trained = bool(store.signature["model"].get("trained", True))
    if args.geojson:
        from ..qupath import match_features, write_features

        feats = match_features(matches, store=store.path, trained=trained,
                               object_type=args.geojson_as.rstrip("s"))  # fmt: skip
        write_features(args.geojson, feats, overwrite=True)
        out["geojson"] = {"path": str(args.geojson), "objects": len(feats),
                          "object_type": args.geojson_as.rstrip("s"),
                          "left_out_other_slides": len(matches) - len(feats)}  # fmt: skip
    if args.save is not None:
        from ..search import similarity_map

        meta = {
            "kind": "similarity",
            "model_id": store.model_id,
            "trained": trained,
            "query": {"regions": list(args.region), "region_geojson": args.region_geojson,
                      "region_class": args.region_class, "unlike": list(args.unlike),
                      "unlike_class": list(args.unlike_class), "like_tiles": len(pos),
                      "unlike_tiles": len(neg), "unlike_weight": args.unlike_weight},
        }  # fmt: skip
        store.write_scores(args.save, {"similarity": similarity_map(store, query)}, meta)
        out["saved_as"] = args.save
    return out


def _print_outputs(args: argparse.Namespace, store: Any, outputs: dict[str, Any]) -> None:
    geo = outputs.get("geojson")
    if geo:
        other = geo["left_out_other_slides"]
        note = f" ({other} matches on other slides left out: coordinates are per slide)"
        print(f"wrote {geo['objects']} matches as QuPath {geo['object_type']}s to "
              f"{geo['path']}" + (note if other else ""))  # fmt: skip
    if "saved_as" in outputs:
        print(f"saved the similarity map as {args.save!r} in {store.path} (export --scores "
              f"{args.save} --as annotations --threshold T: its regions for QuPath)")  # fmt: skip


def _geojson_query(args: argparse.Namespace, store: Any, positive: list, negative: list) -> Any:
    """Query from QuPath annotations (`--region-geojson`), plus any --region / --unlike boxes."""
    import numpy as np

    from ..qupath import geojson_query_rows
    from ..search import build_query, tiles_in_shapes

    pos, neg = geojson_query_rows(
        store, args.region_geojson, classes=args.region_class, unlike_classes=args.unlike_class
    )
    done = store.done
    if positive:  # --region boxes add to the annotations
        extra = tiles_in_shapes(store.coords, store.tile_l0, positive)
        pos = np.union1d(pos, extra[done[extra]])
    if negative:
        extra = tiles_in_shapes(store.coords, store.tile_l0, negative)
        neg = np.union1d(neg, extra[done[extra]])
    return build_query(store.embeddings, pos, neg, args.unlike_weight), pos, neg


def register(sub: Any) -> None:
    p = sub.add_parser("search", help="find tiles like a region, in this and other stores")
    p.add_argument("store", help="the store holding the query region")
    p.add_argument(
        "--region",
        action="append",
        metavar="X,Y,W,H",
        help="query rectangle in level-0 pixels: the tiles whose centre is inside (or, for "
        "a region smaller than a tile, the tile it overlaps most); repeatable",
    )
    p.add_argument(
        "--region-geojson",
        metavar="FILE",
        help="QuPath annotations (GeoJSON, level-0 pixels) as the query; holes are left out",
    )
    p.add_argument(
        "--region-class",
        action="append",
        metavar="NAME",
        help="with --region-geojson: only annotations of this QuPath class are the query "
        "(repeatable; default: every annotation not named by --unlike-class)",
    )
    p.add_argument(
        "--unlike-class",
        action="append",
        default=[],
        metavar="NAME",
        help="with --region-geojson: annotations of this class are tissue the matches should "
        "not look like (repeatable)",
    )
    p.add_argument(
        "--unlike",
        action="append",
        default=[],
        metavar="X,Y,W,H",
        help="rectangle of tissue the matches should not look like; repeatable",
    )
    p.add_argument(
        "--unlike-weight",
        type=float,
        default=NEG_WEIGHT,
        help=f"how strongly --unlike pushes the query away ({NEG_WEIGHT}: Rocchio's usual "
        "weight; 1 lets near-duplicate tissue cancel the query)",
    )
    p.add_argument(
        "--against",
        action="append",
        metavar="STORE_OR_FOLDER",
        help="stores (or folders of stores) to search; default: the query's store. A folder "
        "is searched through its index (tilescope index), built or updated first when needed",
    )
    p.add_argument(
        "--per-slide",
        type=positive_int,
        default=None,
        metavar="K",
        help="at most K matches from any one slide (default: no cap)",
    )
    p.add_argument(
        "--exact",
        action="store_true",
        help="exact search even where a folder's index has an approximate index",
    )
    p.add_argument(
        "--no-index",
        action="store_true",
        help="read every store of --against folders instead of their index (slow)",
    )
    p.add_argument(
        "-k", "--k", dest="k", type=positive_int, default=20, help="number of matches (20)"
    )
    p.add_argument(
        "--geojson",
        metavar="OUT.geojson",
        help="write the matches on the query's slide as QuPath objects (one tile square each, "
        "classified 'Search match', with Rank and Similarity measurements; level-0 pixels)",
    )
    p.add_argument(
        "--geojson-as",
        choices=["annotations", "detections"],
        default="annotations",
        help="QuPath object type of the --geojson matches (annotations)",
    )
    p.add_argument(
        "--save",
        metavar="NAME",
        help="save the similarity map in the query's store as the score set NAME (for export "
        "--scores NAME and score --scores NAME --png), replacing a set of that name",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_png_args(p, "the similarity map")
    p.set_defaults(func=run)
