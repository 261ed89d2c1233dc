"""``tilescope score STORE --scores NAME``: a saved score set (prompt scores, a classifier's
probabilities, a similarity map) summarised, and drawn over the slide with ``--png``.

No model is loaded: the values are those saved. The PNG shows one class (``--show CLASS``;
default: the class that wins the most tiles) on the scale napari and the other PNGs use.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from ..errors import TilescopeError


def run(args: argparse.Namespace) -> int:
    from ..live import coverage_text
    from ..qupath import score_columns
    from ..store import EmbeddingStore
    from ._common import require_slide_for_png, require_store_slide

    for flag, value in (("--class", args.classes), ("--save", args.save)):
        if value:
            raise TilescopeError(f"{flag} scores with prompts; --scores {args.scores} reads a "
                                 "saved score set: give one or the other")  # fmt: skip
    require_slide_for_png(args)
    store = EmbeddingStore.open(args.store)
    require_store_slide(args, store)
    arrays, meta = store.read_scores(args.scores)  # a missing name lists the saved ones
    values, classes, what = score_columns(args.scores, arrays, meta)
    scored = np.isfinite(values).all(axis=1)
    n_scored = int(scored.sum())
    won = np.argmax(np.where(np.isfinite(values), values, -np.inf), axis=1)
    tiles_won = {c: int((scored & (won == j)).sum()) for j, c in enumerate(classes)}
    means = {c: float(np.nanmean(values[scored, j])) if n_scored else None
             for j, c in enumerate(classes)}  # fmt: skip
    shown = args.show or max(classes, key=lambda c: tiles_won[c])
    if shown not in classes:
        raise TilescopeError(f"--show {shown!r}: score set {args.scores!r} has no such class "
                             f"(classes: {', '.join(classes)})")  # fmt: skip
    coverage = coverage_text(n_scored, store.n_tiles, store.complete and n_scored >= store.n_done)
    kind = str(meta.get("kind") or ("prompts" if "prompts" in meta else "scores"))
    trained = bool(store.signature["model"].get("trained", True)) and bool(
        meta.get("trained", True)
    )
    if args.json:
        print(json.dumps({
            "store": str(store.path), "score_set": args.scores, "kind": kind,
            "quantity": what, "classes": classes, "tiles_won": tiles_won, "mean": means,
            "shown": shown, "n_tiles": store.n_tiles, "n_scored": n_scored,
            "partial": bool(coverage), "coverage": coverage, "trained_model": trained,
            "png": args.png,
        }, indent=2, allow_nan=False))  # fmt: skip
    else:
        if not trained:
            print(f"NOTE: {store.model_id} is untrained: these scores mean nothing.")
        flag = f" [{coverage}]" if coverage else ""
        print(f"score set {args.scores!r} ({kind}) of {store.path}{flag}")
        width = max(map(len, classes))
        for c in classes:
            mean = "-" if means[c] is None else f"{means[c]:.4f}"
            print(f"  {c:<{width}}  {tiles_won[c]:>7} tiles won  mean {what} {mean}")
    if args.png:
        _figure(args, store, values[:, classes.index(shown)], shown, what, kind, coverage,
                trained)  # fmt: skip
        print(f"wrote {args.png}")
    return 0


def _figure(args: argparse.Namespace, store: Any, column: np.ndarray, shown: str, what: str,
            kind: str, coverage: str, trained: bool) -> None:  # fmt: skip
    from ..figures import saved_scores_figure

    title = (f"{what} per tile (score set {args.scores})" if what == "similarity"
             else f"{what} of {shown} per tile (score set {args.scores}, {kind})")  # fmt: skip
    caption = [coverage] if coverage else []
    saved_scores_figure(args.slide, store, column, args.png, title=title, quantity=what,
                        caption=caption, slide_mpp=args.slide_mpp,
                        warning=None if trained else "UNTRAINED model: NOT A RESULT")  # fmt: skip
