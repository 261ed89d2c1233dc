"""``tilescope score``: score a store's tiles against text prompts."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._common import add_png_args, label_line, positive_int, require_slide_for_png


def run(args: argparse.Namespace) -> int:
    from ..models import load_encoder_for_store
    from ..score import PromptSet, TileGeometry, heatmap, save_scores, score_store
    from ..store import EmbeddingStore

    require_slide_for_png(args)
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
        from ..figures import heatmap_figure

        c = prompts.class_names.index(pooled.label)
        hm = heatmap(scores.probs[:, c], TileGeometry.from_store(store))
        warn = None if encoder.trained else f"{encoder.label}: NOT A RESULT"
        heatmap_figure(
            args.slide,
            hm,
            args.png,
            [f"P({pooled.label}) per tile", label_line(pooled)],
            slide_mpp=args.slide_mpp,
            warning=warn,
        )
        print(f"wrote {args.png}")
    return 0


def register(sub: Any) -> None:
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
    p.add_argument("--save", metavar="NAME", help="save the scores into the store")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_png_args(p, "the winning class's heatmap")
    p.set_defaults(func=run)
