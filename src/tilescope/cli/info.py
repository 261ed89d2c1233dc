"""``tilescope info``: print a slide's vendor, size, levels and pixel size."""

from __future__ import annotations

import argparse
import json
from typing import Any


def run(args: argparse.Namespace) -> int:
    from ..slide import Slide

    with Slide(args.slide, mpp=args.slide_mpp) as slide:
        info = slide.info()
    if args.json:
        print(json.dumps(info.as_dict(), indent=2))
        return 0
    w, h = info.dimensions
    if info.mpp_x is None:  # the same words as `embed`'s error: missing, or implausible
        why = "not recorded" if info.mpp_source == "missing" else info.mpp_source
        mpp = f"unknown ({why}; pass --slide-mpp to set it)"
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


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="print a slide's vendor, size, levels, mpp, magnification")
    p.add_argument("slide", help="slide file (anything OpenSlide reads)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--slide-mpp", type=float, default=None, help="override the slide's own µm/px")
    p.set_defaults(func=run)
