"""``tilescope score``: score a store's tiles against text prompts."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from ..errors import TilescopeError
from . import _score_cohort, _score_saved
from ._common import (
    add_png_args,
    check_save_name,
    positive_int,
    require_slide_for_png,
    require_store_slide,
    state_text,
)


def check_classes(items: list[str]) -> None:
    """Refuse a ``--class`` that reads two ways ("a:b=x") or has no name or prompt."""
    for item in items:
        m = re.search(r"[:=]", item)
        if m is None:
            if not item.strip():
                raise TilescopeError('--class "": give a class and its prompts, NAME=PROMPT')
            continue  # a class named by its only prompt
        name, rest = item[: m.start()].strip(), item[m.end() :]
        if re.search(r"[:=]", rest):
            raise TilescopeError(
                f"--class {item!r}: reads two ways; write one '=' between the class name and "
                "its prompts, NAME=PROMPT|PROMPT (names and prompts cannot contain ':' or '=')"
            )
        if not name or not rest.strip(" |;"):
            raise TilescopeError(f"--class {item!r}: write NAME=PROMPT|PROMPT")


def run(args: argparse.Namespace) -> int:
    from ..live import coverage_text
    from ..models import load_encoder_for_store
    from ..score import PromptSet, save_scores, score_store
    from ..store import EmbeddingStore

    if args.scores is not None:  # a saved score set: summarised, drawn with --png
        if _score_cohort.wanted(args):
            raise TilescopeError("--scores NAME reads one store's saved score set; pass a store")
        return _score_saved.run(args)
    if args.show is not None:
        raise TilescopeError("--show CLASS draws a class of a saved score set: add --scores NAME")
    if not args.classes:
        raise TilescopeError('give the classes, --class "NAME=PROMPT|PROMPT" (repeat for each '
                             "class), or draw a saved score set with --scores NAME")  # fmt: skip
    if _score_cohort.wanted(args):  # a folder of stores, or --csv: one row per store
        return _score_cohort.run(args)
    # everything a user typed is checked before the model loads and before any work
    require_slide_for_png(args)
    check_classes(args.classes)
    check_save_name(args, "the scores")
    store = EmbeddingStore.open(args.store)
    require_store_slide(args, store)
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
    if args.save is not None:
        save_scores(store, args.save, scores, prompts, {"pooling": args.pooling})
    coverage = coverage_text(store.n_done, store.n_tiles, store.complete)
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
                    "n_done": store.n_done,
                    "n_failed": store.n_failed,
                    "n_not_embedded": store.n_todo,
                    "complete": store.complete,
                    "partial": bool(coverage),
                    "coverage": coverage,  # "partial: n of N tiles", or "" when whole
                    "saved_as": args.save,
                },
                indent=2,
                allow_nan=False,  # never invalid JSON: damaged stores are refused on reading
            )
        )
    else:
        if not encoder.trained:
            print(f"NOTE: {encoder.label}: these scores mean nothing.")
        if store.n_todo:
            print(
                f"NOTE: the store is partial ({store.state_text()}); the label pools the "
                "embedded tiles only: run `tilescope embed` again to finish it"
            )
        flag = f" [{coverage}]" if coverage else ""
        print(f"slide label: {pooled.label}{flag}  ({pooled.method} pooling over "
              f"{state_text(store)})")  # fmt: skip
        for name, value in sorted(pooled.scores.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<24} {value:.4f}")
        if args.save is not None:
            print(f"saved the scores as {args.save!r} in {store.path}")
    if args.png:
        from ..figures import score_figure

        warn = None if encoder.trained else f"{encoder.label}: NOT A RESULT"
        score_figure(args.slide, store, scores, pooled, args.png, slide_mpp=args.slide_mpp,
                     warning=warn)  # fmt: skip
        print(f"wrote {args.png}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("score", help="score a store's tiles against text prompts")
    p.add_argument("store", help="a store made by `tilescope embed`, or a folder of stores")
    p.add_argument(
        "--class",
        dest="classes",
        action="append",
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
        "-k", "--k", dest="k", type=positive_int, default=50, help="tiles for topk pooling (50)"
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
    p.add_argument(
        "--save",
        metavar="NAME",
        help="save the scores into the store under NAME (A-Z a-z 0-9 _ . -), replacing a "
        "set of that name",
    )
    p.add_argument(
        "--scores",
        metavar="NAME",
        help="instead of prompts: a score set saved in the store (score --save, classify "
        "--save, search --save), summarised and drawn with --png; no model is loaded",
    )
    p.add_argument(
        "--show",
        metavar="CLASS",
        help="with --scores and --png: the class to draw (default: the one winning most tiles)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_png_args(p, "the winning class's heatmap")
    _score_cohort.add_arguments(p)
    p.set_defaults(func=run)
