"""The ``tilescope`` command: thin argument parsing over the core."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


class _Bar:
    """A terminal progress bar (patches/s, ETA) made when the tile count is known."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar: Any = None

    def update(self, p: Any) -> None:
        if p.stage == "tissue":
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(desc=self.name, unit="patch", total=p.total, dynamic_ncols=True)
        self.bar.n = p.done
        if p.failed:
            self.bar.set_postfix_str(f"{p.failed} failed")
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cmd_embed(args: argparse.Namespace) -> int:
    from .embed import embed_slide, store_path_for
    from .grid import TileGrid
    from .models import load_encoder

    grid = TileGrid(
        target_mpp=args.mpp, tile_px=args.tile, overlap_px=args.overlap, min_tissue=args.min_tissue
    )
    out = Path(args.out)
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
        bar = _Bar(Path(slide).name)
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
            )
        except (TilescopeError, OSError) as exc:  # say so, and go on with the other slides
            bar.close()
            print(f"tilescope: error: {_describe(exc)}", file=sys.stderr)
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


def _parse_box(text: str) -> list[list[float]]:
    """ "x,y,w,h" in level-0 pixels -> the rectangle's two corners for search.tiles_in_shapes."""
    try:
        x, y, w, h = (float(v) for v in text.split(","))
    except ValueError:
        msg = f"a region is x,y,width,height in level-0 pixels, not {text!r}"
        raise TilescopeError(msg) from None
    return [[x, y], [x + w, y + h]]


def _require_slide_for_png(args: argparse.Namespace) -> None:
    """Refuse `--png` without `--slide` before any work is done (or saved)."""
    if args.png and not args.slide:
        raise TilescopeError("--png draws over the slide: pass its file with --slide")


def _xywh(text: str) -> tuple[float, float, float, float]:
    (x0, y0), (x1, y1) = _parse_box(text)
    return x0, y0, x1 - x0, y1 - y0


def _label_line(pooled: object) -> str:
    scores = getattr(pooled, "scores", {})
    parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items(), key=lambda kv: -kv[1]))
    return (
        f"slide label: {getattr(pooled, 'label', '?')} ({getattr(pooled, 'method', '')}: {parts})"
    )


def _cmd_score(args: argparse.Namespace) -> int:
    from .models import load_encoder_for_store
    from .score import PromptSet, TileGeometry, heatmap, save_scores, score_store
    from .store import EmbeddingStore

    _require_slide_for_png(args)
    store = EmbeddingStore.open(args.store)
    prompts = PromptSet.parse(args.classes, templates=args.template or ("{}",))
    encoder = load_encoder_for_store(store.signature["model"], name=args.model, device=args.device)
    # without --temperature, the library's default (its units are the library's business)
    options: dict[str, Any] = {} if args.temperature is None else {"temperature": args.temperature}
    scores, pooled = score_store(
        store,
        prompts,
        encoder.encode_text,
        encoder.logit_scale,
        method=args.pooling,
        k=args.k,
        **options,
    )
    if args.save:
        save_scores(store, args.save, scores, prompts, {"pooling": args.pooling})
    if args.json:
        print(
            json.dumps(
                {
                    "store": str(store.path),
                    "label": pooled.label,
                    "scores": pooled.scores,
                    "pooling": pooled.method,
                    "model": encoder.model_id,
                    "trained_model": encoder.trained,
                    "n_tiles": store.n_tiles,
                },
                indent=2,
            )
        )
    else:
        if not encoder.trained:
            print(f"NOTE: {encoder.label}: these scores mean nothing.")
        print(f"slide label: {pooled.label}  ({pooled.method} pooling over {store.n_tiles} tiles)")
        for name, value in sorted(pooled.scores.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<24} {value:.4f}")
    if args.png:
        from .figures import heatmap_figure

        c = prompts.class_names.index(pooled.label)
        hm = heatmap(scores.probs[:, c], TileGeometry.from_store(store))
        warn = None if encoder.trained else f"{encoder.label}: NOT A RESULT"
        heatmap_figure(
            args.slide,
            hm,
            args.png,
            [f"P({pooled.label}) per tile", _label_line(pooled)],
            slide_mpp=args.slide_mpp,
            warning=warn,
        )
        print(f"wrote {args.png}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from .search import query_from_regions, search_stores
    from .store import EmbeddingStore

    _require_slide_for_png(args)
    positive = [_parse_box(b) for b in args.region]
    negative = [_parse_box(b) for b in args.unlike]
    store = EmbeddingStore.open(args.store)
    regions = " and ".join(args.region)
    empty = (
        f"the region {regions} covers no embedded tissue tiles"
        if len(args.region) == 1
        else f"the regions {regions} cover no embedded tissue tiles"
    ) + " (a tile counts when its centre is inside; coordinates are level-0 pixels)"
    query, pos, neg = query_from_regions(store, positive, negative, empty_message=empty)
    targets = args.against or [store.path]
    exclude = {store.path: pos}  # the query tiles themselves are not matches
    matches = search_stores(
        query, targets, model=store.signature["model"], k=args.k, exclude=exclude
    )
    if args.json:
        print(json.dumps([m.__dict__ for m in matches], indent=2))
    else:
        print(f"query: {len(pos)} tiles like, {len(neg)} unlike; top {len(matches)} matches")
        for rank, m in enumerate(matches, 1):
            print(
                f"{rank:>3}. {m.slide_name:<32} x={m.x:<7} y={m.y:<7} similarity {m.similarity:.4f}"
            )
    if args.png:
        import numpy as np

        from .figures import heatmap_figure
        from .score import TileGeometry, heatmap
        from .search import similarity

        sim = np.where(store.done, similarity(store.embeddings, query), np.nan)
        hm = heatmap(sim, TileGeometry.from_store(store))
        here = store.path.resolve()
        trained = store.signature["model"].get("trained", True)
        heatmap_figure(
            args.slide,
            hm,
            args.png,
            ["cosine similarity to the query region (cyan); top matches in this slide (green)"],
            slide_mpp=args.slide_mpp,
            warning=None if trained else "UNTRAINED model: NOT A RESULT",
            boxes=[_xywh(b) for b in args.region],
            marks=[
                (m.x, m.y, m.tile_l0, m.tile_l0) for m in matches if Path(m.store).resolve() == here
            ],
        )
        print(f"wrote {args.png}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_store

    out = export_store(args.store, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slide = demo.demo_slide(args.slide, out)
    if not args.headless and demo.has_display():
        from ._napari._demo import launch

        return launch(slide, out, args.model, args.device)
    encoder = demo.demo_encoder(args.model, args.device)
    result = demo.run_headless(slide, out, encoder)
    print(demo.report(result, requested_model=args.model))
    return 0


def _positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _add_png_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--png", help=f"write {what} over the slide to this PNG")
    p.add_argument("--slide", help="the slide file (needed by --png)")
    p.add_argument(
        "--slide-mpp", type=float, default=None, help="override the slide's own µm/px (--png)"
    )


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
    p.add_argument("--slide-mpp", type=float, default=None, help="override the slide's own µm/px")
    p.set_defaults(func=_cmd_info)

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
        type=_positive_int,
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
        "--retry-failed",
        action="store_true",
        help="try again the tiles an earlier run could not read (recorded in the store)",
    )
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("score", help="score a store's tiles against text prompts")
    p.add_argument("store", help="a store made by `tilescope embed`")
    p.add_argument(
        "--class",
        dest="classes",
        action="append",
        required=True,
        metavar="NAME=PROMPT[|PROMPT...]",
        help='a class and its prompts, e.g. "tumor=invasive carcinoma|malignant '
        'epithelium"; repeat for each class',
    )
    p.add_argument(
        "--template",
        action="append",
        help='prompt template with {} (e.g. "an H&E image of {}"); repeatable',
    )
    p.add_argument(
        "--pooling",
        choices=["attention", "topk", "mean"],
        default="attention",
        help="slide-level pooling: attention (default), topk (mean of the k highest logits "
        "per class) or mean (of the tiles' probabilities)",
    )
    p.add_argument(
        "-k", "--k", dest="k", type=_positive_int, default=50, help="tiles for topk pooling (50)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="temperature of attention pooling, in cosine-similarity units (default: the "
        "library's)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="where to load the store's model from (a name or local folder; its weights must "
        "be those that made the store); default: the model recorded in the store",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: best)")
    p.add_argument("--save", metavar="NAME", help="save the scores into the store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_png_args(p, "the winning class's heatmap")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("search", help="find tiles like a region, in this and other stores")
    p.add_argument("store", help="the store holding the query region")
    p.add_argument(
        "--region",
        action="append",
        required=True,
        metavar="X,Y,W,H",
        help="query rectangle in level-0 pixels (tiles whose centre is inside); repeatable",
    )
    p.add_argument(
        "--unlike",
        action="append",
        default=[],
        metavar="X,Y,W,H",
        help="rectangle of tissue the matches should not look like; repeatable",
    )
    p.add_argument(
        "--against",
        action="append",
        metavar="STORE_OR_FOLDER",
        help="stores (or folders of stores) to search; default: the query's store",
    )
    p.add_argument(
        "-k", "--k", dest="k", type=_positive_int, default=20, help="number of matches (20)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_png_args(p, "the similarity map")
    p.set_defaults(func=_cmd_search)

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
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="embed the sample slide and show heatmaps and a search")
    p.add_argument("--slide", help="a slide to use instead of the sample slide")
    p.add_argument("--model", help="model (default: BiomedCLIP, else tiny-random with a notice)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: best)")
    p.add_argument("--out", default="tilescope-demo", help="folder for store, PNGs, exports")
    p.add_argument(
        "--headless",
        action="store_true",
        help="write PNG figures instead of opening napari (default without a display)",
    )
    p.set_defaults(func=_cmd_demo)
    return parser


def _describe(exc: BaseException) -> str:
    """One line for the user: a TilescopeError's message, or a file-system error's path and
    reason (``path: Permission denied``)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        where = str(exc.filename)
        if exc.filename2 is not None:
            where += f" -> {exc.filename2}"
        return f"{where}: {exc.strerror or exc}"
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (TilescopeError, OSError) as exc:
        print(f"tilescope: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("tilescope: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
