"""``tilescope embed``: tile and embed slides into zarr stores (resumable)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import TilescopeError
from ._common import EXIT_ERROR, ProgressBar, describe, positive_int


def run(args: argparse.Namespace) -> int:
    from ..embed import embed_slide, store_path_for
    from ..grid import TileGrid
    from ..models import load_encoder

    grid = TileGrid(
        target_mpp=args.mpp, tile_px=args.tile, overlap_px=args.overlap, min_tissue=args.min_tissue
    )
    out = Path(args.out)
    roi = _roi(args)  # read and checked before the model loads
    out.mkdir(parents=True, exist_ok=True)
    encoder = load_encoder(args.model, device=args.device)
    if not encoder.trained:
        print(f"NOTE: {encoder.label}: embeddings are for testing the pipeline only.")
    batch = args.batch_size or (64 if encoder.device.type == "cuda" else 16)
    status = 0
    for slide in args.slides:
        # embed_slide decides: it resumes a store made with these settings (a finished one is
        # a fast no-op) and refuses one made with other settings or another model
        target = store_path_for(slide, out)
        bar = ProgressBar(Path(slide).name)
        try:
            result = embed_slide(
                slide,
                target,
                encoder=encoder,
                grid=grid,
                slide_mpp=args.slide_mpp,
                batch_size=batch,
                num_workers=args.workers,
                overwrite=args.overwrite,
                retry_failed=args.retry_failed,
                progress=bar.update,
                **roi,
            )
        except (TilescopeError, OSError) as exc:  # say so, and go on with the other slides
            bar.close()
            print(f"tilescope: error: {describe(exc)}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        bar.close()
        if result.embedded_now == 0 and result.complete and not result.failed:
            msg = f"{slide}: already embedded in {target}; nothing to do"
        else:
            msg = f"{slide}: {result.n_tiles} tiles -> {target} ({result.seconds:.1f} s)"
        if result.failed:
            for index, message in result.failed[:5]:
                print(f"  tile {index}: {message}", file=sys.stderr)
            status = EXIT_ERROR
        if result.n_failed:
            msg += (
                f"; {result.n_failed} tiles could not be read: recorded in the store, left out "
                "of scores, search and export (--retry-failed tries them again)"
            )
        print(msg)
    return status


def _roi(args: argparse.Namespace) -> dict[str, Any]:
    """``{"regions": polygons}`` from `--roi` (QuPath annotations, level-0 px), or ``{}``."""
    if not args.roi:
        return {}
    import inspect

    from ..embed import embed_slide
    from ..qupath import annotation_regions

    if len(args.slides) != 1:
        raise TilescopeError("--roi holds one slide's regions: embed that slide alone")
    regions = annotation_regions(args.roi)
    if "regions" not in inspect.signature(embed_slide).parameters:
        raise TilescopeError("this Tilescope cannot restrict embedding to regions (--roi) yet")
    return {"regions": regions}


def register(sub: Any) -> None:
    p = sub.add_parser("embed", help="tile and embed slides into zarr stores (resumable)")
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files to embed")
    p.add_argument("-o", "--out", required=True, help="folder for the stores (one per slide)")
    p.add_argument(
        "--model",
        default="biomedclip",
        help="biomedclip (default), tiny-random (untrained, for demos), an open_clip "
        "model id, hf-hub:ORG/REPO, or a local folder with a snapshot",
    )
    p.add_argument("--mpp", type=float, default=0.5, help="target µm/px of tiles (0.5)")
    p.add_argument("--tile", type=int, default=224, help="tile size in px at --mpp (224)")
    p.add_argument("--overlap", type=int, default=0, help="overlap between tiles in px (0)")
    p.add_argument(
        "--min-tissue",
        type=float,
        default=0.25,
        help="minimum tissue fraction of a kept tile (0.25)",
    )
    p.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        help="override the slides' own µm/px (for slides that lack it)",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: best)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="tiles per batch (default: 64 on CUDA, else 16)",
    )
    p.add_argument("--workers", type=int, default=2, help="tile reader threads (2)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace stores made with other settings instead of refusing",
    )
    p.add_argument(
        "--roi",
        metavar="GEOJSON",
        help="embed only the tiles that overlap these QuPath annotations (one slide; level-0 "
        "pixels); the store stays partial until a whole-slide run completes it",
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="try again the tiles an earlier run could not read (recorded in the store)",
    )
    p.set_defaults(func=run)
