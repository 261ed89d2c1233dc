"""The ``tilescope`` command: thin argument parsing over the core."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

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
    levels = zip(info.level_dimensions, info.level_downsamples, strict=True)
    for i, ((lw, lh), ds) in enumerate(levels):
        print(f"  level {i}: {lw} x {lh} px (downsample {ds:g})")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .embed import embed_slide, store_path_for
    from .grid import TileGrid
    from .models import load_encoder
    from .store import EmbeddingStore

    grid = TileGrid(target_mpp=args.mpp, tile_px=args.tile, overlap_px=args.overlap,
                    min_tissue=args.min_tissue)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = load_encoder(args.model, device=args.device)
    if not encoder.trained:
        print(f"NOTE: {encoder.label}: embeddings are for testing the pipeline only.")
    batch = args.batch_size or (64 if encoder.device.type == "cuda" else 16)
    status = 0
    for slide in args.slides:
        target = store_path_for(slide, out)
        if target.exists() and EmbeddingStore.is_complete(target) and not args.overwrite:
            print(f"{slide}: already embedded in {target}; skipped")
            continue
        bar = tqdm(desc=Path(slide).name, unit="patch", total=0, dynamic_ncols=True)

        def report(p, bar=bar):  # type: ignore[no-untyped-def]
            bar.total = p.total
            bar.n = p.done
            bar.set_postfix_str(f"{p.stage}" + (f", {p.failed} failed" if p.failed else ""))
            bar.refresh()

        try:
            result = embed_slide(slide, target, encoder=encoder, grid=grid,
                                 slide_mpp=args.slide_mpp, batch_size=batch,
                                 num_workers=args.workers, overwrite=args.overwrite,
                                 progress=report)  # fmt: skip
        finally:
            bar.close()
        msg = f"{slide}: {result.n_tiles} tiles -> {target} ({result.seconds:.1f} s)"
        if result.failed:
            msg += f"; {len(result.failed)} tiles failed to read and are recorded in the store"
            status = EXIT_ERROR
        print(msg)
    return status


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

    p = sub.add_parser("embed", help="tile and embed slides into zarr stores (resumable)")
    p.add_argument("slides", nargs="+", metavar="SLIDE")
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
    p.add_argument("--batch-size", type=int, default=None, help="tiles per batch")
    p.add_argument("--workers", type=int, default=2, help="tile reader threads (2)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace stores made with other settings instead of refusing",
    )
    p.set_defaults(func=_cmd_embed)
    return parser


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
