"""``tilescope score DIR --class ... [--csv labels.csv]``: a label for every store in a folder.

Two CSV files: ``labels.csv``, one row per store (slide, store, model, state, tile counts,
label, one ``score_<class>`` column per class, error), and ``labels_top_tiles.csv`` (or
``--tiles-csv``), the `--top` tiles of each class in each slide, ranked by the class's
cosine similarity (one row per tile: slide, store, class, rank, row, x, y, size_l0, cosine,
logit, prob, attention). Without ``--csv`` the labels are printed only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import TilescopeError
from ..figures import slide_call_line
from ._common import EXIT_ERROR, positive_int


def wanted(args: argparse.Namespace) -> bool:
    """True for a folder of stores (not itself a store), or when ``--csv`` is given."""
    from ..catalog import read_signature

    p = Path(args.store)
    return bool(args.csv) or (p.is_dir() and read_signature(p) is None)


def run(args: argparse.Namespace) -> int:
    from ..catalog import find_stores, read_signature
    from ..cohort import score_stores
    from ..cohort._score import model_key
    from ..models import load_encoder_for_store
    from ..score import PromptSet
    from .score import check_classes

    check_classes(args.classes)
    for flag, value in (("--png", args.png), ("--save", args.save)):
        if value:
            raise TilescopeError(f"{flag} works on one store; pass a store, not a folder")
    folder = Path(args.store)
    stores = [folder] if read_signature(folder) is not None else find_stores(folder, recursive=True)
    if not stores:
        raise TilescopeError(f"{folder}: no embedding stores here (tilescope embed ... -o DIR)")
    models = {model_key((read_signature(s) or {}).get("model", {})) for s in stores}
    if args.model and len(models) > 1:
        raise TilescopeError(
            f"--model {args.model}: the stores in {folder} were made by {len(models)} models "
            f"({', '.join(sorted(m for m, _ in models))}); --model names one; leave it out to "
            "score each store with its own model"
        )
    tiles_csv = _tiles_path(args)
    for path in (args.csv, tiles_csv):
        if path and not Path(path).parent.is_dir():
            raise TilescopeError(f"{path}: its folder does not exist")
    prompts = PromptSet.parse(args.classes, templates=args.template or ("{}",))
    options: dict[str, Any] = {} if args.temperature is None else {"temperature": args.temperature}

    def load(model: Mapping[str, Any]) -> Any:
        return load_encoder_for_store(dict(model), name=args.model, device=args.device)

    results = score_stores(
        stores, prompts, load, method=args.pooling, k=args.k, top=args.top, **options
    )
    if args.csv:
        _write_labels(Path(args.csv), results, prompts.class_names)
    if tiles_csv:
        _write_tiles(tiles_csv, results)
    if args.json:
        print(json.dumps([_row(r, prompts.class_names) for r in results], indent=2))
    else:
        _print(results, len(models))
        for path in (args.csv, tiles_csv):
            if path:
                print(f"wrote {path}")
    return EXIT_ERROR if any(r.state == "error" for r in results) else 0


def _tiles_path(args: argparse.Namespace) -> Path | None:
    if args.top == 0:
        return None
    if args.tiles_csv:
        return Path(args.tiles_csv)
    if args.csv:
        p = Path(args.csv)
        return p.with_name(f"{p.stem}_top_tiles.csv")
    return None


def _row(r: Any, classes: Sequence[str]) -> dict[str, Any]:
    row = {
        "slide": r.slide,
        "store": str(r.store),
        "model": r.model,
        "trained": r.trained,
        "state": r.state,
        "n_tiles": r.n_tiles,
        "n_done": r.n_done,
        "n_failed": r.n_failed,
        "pooling": r.pooling,
        "label": r.label,
    }
    for c in classes:
        row[f"score_{c}"] = r.scores.get(c)
    row["error"] = r.error
    return row


def _atomic_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


def _write_labels(path: Path, results: Sequence[Any], classes: Sequence[str]) -> None:
    rows = [_row(r, classes) for r in results]
    header = list(rows[0]) if rows else []
    _atomic_csv(path, header, [["" if v is None else _fmt(v) for v in r.values()] for r in rows])


def _write_tiles(path: Path, results: Sequence[Any]) -> None:
    header = [
        "slide",
        "store",
        "class",
        "rank",
        "row",
        "x",
        "y",
        "size_l0",
        "cosine",
        "logit",
        "prob",
        "attention",
    ]
    rows = [
        [
            r.slide,
            str(r.store),
            t.cls,
            t.rank,
            t.row,
            t.x,
            t.y,
            _fmt(t.size_l0),
            _fmt(t.cosine),
            _fmt(t.logit),
            _fmt(t.prob),
            "" if t.attention is None else _fmt(t.attention),
        ]
        for r in results
        for t in r.top
    ]
    _atomic_csv(path, header, rows)


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def _print(results: Sequence[Any], n_models: int) -> None:
    if any(r.trained is False for r in results):
        print("NOTE: stores embedded with an UNTRAINED model: their scores mean nothing.")
    if n_models > 1:
        print(
            f"NOTE: these stores were made by {n_models} models, each scored with its own; "
            "labels of different models are not comparable (see the model column)"
        )
    for r in results:
        name = r.slide or r.store.name
        if r.state in ("complete", "partial"):
            flag = "" if r.state == "complete" else f"  [PARTIAL: {r.n_done} of {r.n_tiles} tiles]"
            print(f"{name}: {slide_call_line(_Pooled(r))}{flag}")
        else:
            print(f"{name}: {r.state.upper()}: {r.error}")


class _Pooled:
    def __init__(self, r: Any) -> None:
        self.label, self.scores, self.method = r.label, r.scores, r.pooling


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a folder of stores (STORE may be a folder: one label per store)")
    g.add_argument(
        "--csv",
        metavar="LABELS.csv",
        help="write one row per store: slide, state, label and the class scores",
    )
    g.add_argument(
        "--top",
        type=_count,
        default=5,
        metavar="N",
        help="top tiles of each class in each slide, in a second CSV (5; 0: none)",
    )
    g.add_argument(
        "--tiles-csv",
        metavar="FILE",
        help="where the top tiles go (default: LABELS_top_tiles.csv beside --csv)",
    )


def _count(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)
