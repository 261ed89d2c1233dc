"""``tilescope classify``: train a tissue classifier from annotations, or apply a saved one."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from ..errors import TilescopeError
from ._common import EXIT_ERROR, describe


def run(args: argparse.Namespace) -> int:
    from ..catalog import find_stores, read_signature
    from ..classify import Classifier

    if bool(args.train) == bool(args.classifier):
        raise TilescopeError("give either --train ANNOTATIONS.geojson or --classifier CLF.json")
    target = Path(args.store)
    is_folder = target.is_dir() and read_signature(target) is None
    stores = find_stores(target) if is_folder else [target]
    if is_folder and not stores:
        raise TilescopeError(f"{target}: no Tilescope embedding stores (*.zarr) in this folder")
    if args.train:
        if is_folder:
            raise TilescopeError(
                f"{target}: train on the store the annotations belong to (one slide), then "
                "apply the classifier to the folder with --classifier"
            )
        return _train(args, target)
    clf = Classifier.load(args.classifier)
    name = args.save or Path(args.classifier).stem
    return _apply(args, clf, stores, name)


def _train(args: argparse.Namespace, path: Path) -> int:
    from ..classify import predict, save_prediction, train, training_set_from_geojson
    from ..store import EmbeddingStore

    store = EmbeddingStore.open(path)
    data = training_set_from_geojson(store, args.train, classes=args.classes)
    clf = train(store, data, c=args.C)
    pred = predict(store, clf)
    if args.save:
        save_prediction(store, args.save, clf, pred)
    if args.write_classifier:
        clf.save(args.write_classifier)
    if args.json:
        print(
            json.dumps(
                {
                    **clf.summary(),
                    "classes": clf.classes,
                    "store": str(store.path),
                    "saved_as": args.save,
                    "area_mm2": pred.area_mm2,
                    **_coverage(pred),
                },
                indent=2,
            )
        )
        return 0
    if not pred.trained_model:
        print(f"NOTE: {store.model_id} is untrained: this classifier means nothing.")
    if pred.coverage:
        print(f"NOTE: the store is partial ({store.state_text()}): only embedded tiles are "
              "trained on and classified; run `tilescope embed` again to finish it")  # fmt: skip
    flag = f" [{pred.coverage}]" if pred.coverage else ""
    print(f"{store.slide_name}: trained on {len(data.indices)} tiles from {args.train}{flag}")
    regions, tiles = data.regions_per_class(), data.tiles_per_class()
    width = max(map(len, clf.classes))
    for c in clf.classes:
        print(f"  {c:<{width}}  {regions[c]:>3} region(s) {tiles[c]:>6} tiles")
    if data.n_ambiguous or data.n_not_embedded:
        print(
            f"  left out: {data.n_ambiguous} tiles inside two classes' regions, "
            f"{data.n_not_embedded} not embedded"
        )
    if clf.cv is not None:
        print(
            f"cross-validated by region ({clf.cv.n_folds} folds): accuracy "
            f"{clf.cv.accuracy:.3f}, balanced accuracy {clf.cv.balanced_accuracy:.3f}"
        )
    else:
        print(f"accuracy {clf.cv_note}")
    _print_areas(pred)
    if args.save:
        print(f"saved scores/{args.save} in {store.path}")
    else:
        print("(not saved: --save NAME keeps the probabilities in the store)")
    if args.write_classifier:
        print(f"wrote {args.write_classifier}")
    return 0


def _apply(args: argparse.Namespace, clf: Any, stores: list[Path], name: str) -> int:
    from ..classify import classify_store

    status, results = 0, []
    for path in stores:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                pred = classify_store(path, clf, name, where=str(args.classifier))
        except (TilescopeError, OSError) as exc:  # say so, and go on with the other stores
            print(f"tilescope: error: {describe(exc)}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        results.append(
            {
                "store": str(path),
                "saved_as": name,
                "area_mm2": pred.area_mm2,
                "tiles": pred.n_predicted,
                "trained_model": pred.trained_model,
                **_coverage(pred),
            }
        )
        if not args.json:
            note = "" if pred.trained_model else "  [UNTRAINED model: means nothing]"
            flag = f" [{pred.coverage}]" if pred.coverage else ""
            print(f"{path}: {pred.n_predicted} tiles{flag} -> scores/{name}{note}")
            _print_areas(pred)
    if args.json:
        print(json.dumps(results, indent=2))
    return status


def _coverage(pred: Any) -> dict[str, Any]:
    """What `--json` says of how much of the slide was classified (as `score --json`)."""
    return {"n_tiles": pred.n_tiles, "n_done": pred.n_predicted, "partial": bool(pred.coverage),
            "coverage": pred.coverage}  # fmt: skip


def _print_areas(pred: Any) -> None:
    total = sum(pred.area_mm2.values()) or 1.0
    width = max(map(len, pred.area_mm2))
    for c, a in pred.area_mm2.items():
        print(f"  {c:<{width}}  {a:9.3f} mm²  {100 * a / total:5.1f} %")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "classify",
        help="train a tissue classifier from QuPath annotations, or apply a saved one",
        description="Train: tilescope classify STORE --train annotations.geojson --save NAME "
        "[--write-classifier clf.json]. Apply: tilescope classify STORE|FOLDER --classifier "
        "clf.json [--save NAME]. Results are saved in each store as scores/NAME.",
    )
    p.add_argument("store", help="a store made by `tilescope embed`, or a folder of stores")
    p.add_argument(
        "--train",
        metavar="GEOJSON",
        help="QuPath annotations with classes (level-0 pixels) to train on",
    )
    p.add_argument(
        "--classifier",
        metavar="CLF.json",
        help="a classifier saved with --write-classifier, to apply to the store(s)",
    )
    p.add_argument(
        "--save",
        metavar="NAME",
        help="save the class probabilities in the store as scores/NAME (default with "
        "--classifier: the classifier file's name)",
    )
    p.add_argument(
        "--write-classifier",
        metavar="CLF.json",
        help="with --train: save the classifier to apply to other slides",
    )
    p.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="NAME",
        help="with --train: only annotations of this class (repeatable; default: every class)",
    )
    p.add_argument(
        "--C",
        dest="C",
        type=float,
        default=0.1,
        help="inverse regularisation strength of the logistic regression (0.1)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
