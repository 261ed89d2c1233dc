"""``tilescope embed``: tile and embed slides into zarr stores (resumable).

Where stores go: ``-o x.zarr`` with one slide writes exactly that store; ``-o DIR`` writes one
store per slide in DIR (``DIR/<stem>.zarr``, or the store this slide already has there, or
``DIR/<stem>-<digest>.zarr`` when another slide has the plain name); without ``-o`` the stores
go to the default folder the napari widgets use (`tilescope.catalog.default_store_dir`).
Every slide is checked (file, format, pixel size, grid) before the model loads.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from ..errors import NoTilesError, StoreNotice, TilescopeError
from . import _cohort_embed
from ._common import (
    EXIT_ERROR,
    OVERWRITE_FLAG,
    ProgressBar,
    describe,
    non_negative_int,
    positive_int,
    xywh,
)


def _error(text: str) -> None:
    print(f"tilescope: error: {text}", file=sys.stderr)


def plan(args: argparse.Namespace, grid: Any) -> tuple[list[tuple[str, Path]], int]:
    """Check every slide and choose its store, before any model is loaded.

    Returns ``[(slide, store path)]`` of the slides to embed and the exit status so far.
    """
    from ..catalog import (
        default_store_dir,
        file_identity,
        read_signature,
        same_slide,
        store_path_for,
    )
    from ..slide import Slide

    slides = _slide_files(args.slides)
    out = Path(args.out) if args.out else None
    single = out is not None and out.suffix.lower() == ".zarr" and not _folder_of_stores(out)
    if single and len(slides) > 1:
        raise TilescopeError(
            f"-o {out}: names one store, but {len(slides)} slides were given; pass a "
            "folder (-o DIR) to get one store per slide"
        )
    if out is None:
        out = default_store_dir()
        print(f"stores go to {out} (the default folder; -o DIR or $TILESCOPE_STORES to change)")
    if not single:
        out.mkdir(parents=True, exist_ok=True)
    status = 0
    todo: list[tuple[str, Path]] = []
    seen: dict[tuple[int, str], str] = {}
    for slide in slides:
        try:
            with Slide(slide, mpp=args.slide_mpp) as s:
                _ = s.mpp  # a slide without a pixel size fails here, not after the model loads
                grid.geometry(s)
            ident = file_identity(slide)
        except (TilescopeError, OSError) as exc:  # say so, and go on with the other slides
            _error(describe(exc))
            status = EXIT_ERROR
            continue
        key = (ident["size_bytes"], ident["header_sha256"])
        if key in seen:
            print(f"{slide}: the same file as {seen[key]}; embedded once")
            continue
        seen[key] = slide
        if single:
            target = out
            sig = read_signature(target)
            if sig is not None and not same_slide(sig.get("slide", {}), ident):
                _error(
                    f"{target}: holds the store of another slide "
                    f"({sig.get('slide', {}).get('name', '?')}); refusing to replace it, even "
                    "with --overwrite; choose another -o"
                )
                status = EXIT_ERROR
                continue
        else:
            target = store_path_for(slide, out, identity=ident, taken=[t for _, t in todo])
        todo.append((slide, target))
    return todo, status


def _slide_files(given: list[str]) -> list[str]:
    """The slides named on the command line, a folder standing for the slides in it."""
    from ..slide import SLIDE_SUFFIXES, find_slides

    slides: list[str] = []
    for arg in given:
        if not Path(arg).is_dir() or arg.lower().rstrip("/").endswith(".zarr"):
            slides.append(arg)  # a file (or a bad path: Slide says what is wrong with it)
            continue
        found = [str(p) for p in find_slides(arg)]
        if not found:
            raise TilescopeError(
                f"{arg}: a folder with no slide files in it or its sub-folders (looked for "
                f"{', '.join(SLIDE_SUFFIXES)}); pass slide files or a folder that holds them"
            )
        print(f"{arg}: {len(found)} slide file{'s' * (len(found) != 1)}")
        slides.extend(found)
    return slides


def _folder_of_stores(p: Path) -> bool:
    """An existing folder (named like a store) that is not one but holds stores."""
    return p.is_dir() and not (p / "zarr.json").exists() and any(p.glob("*.zarr"))


def run(args: argparse.Namespace) -> int:
    from ..embed import embed_slide
    from ..grid import TileGrid
    from ..models import load_encoder

    grid = TileGrid(
        target_mpp=args.mpp, tile_px=args.tile, overlap_px=args.overlap, min_tissue=args.min_tissue
    )
    roi = _roi(args)  # read and checked before the slides and the model
    if _cohort_embed.wanted(args):
        _cohort_embed.check(args)
    todo, status = plan(args, grid)
    if not todo:
        return status or EXIT_ERROR
    if _cohort_embed.wanted(args):  # one Dask task per slide (tilescope.cohort)
        return _cohort_embed.run(args, grid, todo, roi) or status
    encoder = load_encoder(
        args.model, device=args.device, backend=args.backend, compile=args.compile
    )
    if not encoder.trained:
        print(f"NOTE: {encoder.label}: embeddings are for testing the pipeline only.")
    batch = args.batch_size or encoder.default_batch_size
    print(f"image tower: {encoder.describe_tower()}, {batch} tiles per batch")
    for slide, target in todo:
        # embed_slide decides: it resumes a store made with these settings (a finished one is
        # a fast no-op), repairs a damaged one, and refuses one made with other settings
        bar = ProgressBar(Path(slide).name)
        try:
            with warnings.catch_warnings(record=True) as notes:
                warnings.simplefilter("always", StoreNotice)
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
            text = describe(exc, overwrite=OVERWRITE_FLAG)
            if isinstance(exc, NoTilesError):
                text += " (--min-tissue; or check --mpp and --tile)"
            _error(text)
            status = EXIT_ERROR
            continue
        bar.close()
        for note in notes:
            if issubclass(note.category, StoreNotice):
                print(f"  note: {note.message}")
            else:
                warnings.showwarning(note.message, note.category, note.filename, note.lineno)
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
    """``{"regions": [...]}`` from `--roi` (QuPath annotations) and `--region` boxes (level-0
    px), or ``{}``."""
    boxes = getattr(args, "region", None) or []
    if not args.roi and not boxes:
        return {}
    import inspect

    from ..embed import embed_slide

    flags = " and ".join(f for f, v in (("--roi", args.roi), ("--region", boxes)) if v)
    if len(args.slides) != 1 or Path(args.slides[0]).is_dir():
        raise TilescopeError(f"{flags}: regions of one slide; embed that slide alone")
    regions: list[Any] = [xywh(b) for b in boxes]  # checked: finite, positive size
    if args.roi:
        from ..qupath import annotation_regions

        regions.extend(annotation_regions(args.roi))
    if "regions" not in inspect.signature(embed_slide).parameters:
        raise TilescopeError(f"this Tilescope cannot restrict embedding to regions ({flags}) yet")
    return {"regions": regions}


def register(sub: Any) -> None:
    from ..models import BACKENDS

    p = sub.add_parser("embed", help="tile and embed slides into zarr stores (resumable)")
    p.add_argument("slides", nargs="+", metavar="SLIDE",
                   help="slide files to embed, or folders: every slide file in them and their "
                        "sub-folders")  # fmt: skip
    p.add_argument(
        "-o",
        "--out",
        default=None,
        help="OUT.zarr: the store of one slide; or a folder for one store per slide "
        "(default: $TILESCOPE_STORES or ~/tilescope/stores, where napari looks too)",
    )
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
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="what runs the image tower: torch, or openvino (CPU; bf16 where the CPU has it). "
        "auto (default): openvino on a CPU with native bf16, else torch",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the image tower (torch backend; pays off on GPUs for long runs)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="tiles per batch (default: 256 on a GPU with 12 GB or more, 64 on smaller GPUs "
        "and MPS, 16 on a CPU)",
    )
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        help="tile reader processes (default: 1 when the model runs on the CPU, else one per "
        "CPU but one; 0 reads in the main process)",
    )
    p.add_argument(
        "--region",
        action="append",
        metavar="X,Y,W,H",
        help="embed only the tiles that overlap this level-0 box (repeatable; one slide); the "
        "store stays partial until a whole-slide run completes it",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a store of the same slide made with other settings (the new store is "
        "built beside it and replaces it when finished; another slide's store is never "
        "replaced)",
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
    _cohort_embed.add_arguments(p)
    p.set_defaults(func=run)
