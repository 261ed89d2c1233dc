"""``tilescope demo``: embed the sample slide, score prompts, search a region."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def run(args: argparse.Namespace) -> int:
    from .. import demo

    out = Path(args.out).absolute()  # printed in full: demo.sh runs in the checkout
    out.mkdir(parents=True, exist_ok=True)
    slide = demo.demo_slide(args.slide, out)
    if not args.headless and demo.has_display():
        from .._napari._demo import launch

        return launch(slide, out, args.model, args.device)
    encoder = demo.demo_encoder(args.model, args.device)
    result = demo.run_headless(slide, out, encoder)
    print(demo.report(result, requested_model=args.model))
    return 0


def register(sub: Any) -> None:
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
    p.set_defaults(func=run)
