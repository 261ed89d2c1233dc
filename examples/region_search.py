"""Region search: the tiles inside a box are the query; every similar tile lights up.

    python examples/region_search.py [SLIDE] [--box X,Y,W,H] [--model M] [--headless]

The box is in level-0 pixels (default: a tile near the middle of the tissue). Headless it
writes search.png and prints the top matches; with a display it opens napari with the box
drawn on a shapes layer, the similarity map and the matches.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tilescope.demo import demo_encoder, demo_slide, has_display
from tilescope.embed import embed_slide, store_path_for
from tilescope.figures import similarity_figure
from tilescope.search import build_query, search_stores, similarity_map, tiles_in_shapes
from tilescope.store import EmbeddingStore

ap = argparse.ArgumentParser()
ap.add_argument("slide", nargs="?")
ap.add_argument("--box", help="x,y,w,h in level-0 pixels")
ap.add_argument("--model")
ap.add_argument("--out", default="tilescope-examples")
ap.add_argument("--headless", action="store_true")
args = ap.parse_args()

out = Path(args.out)
slide = demo_slide(args.slide, out)
encoder = demo_encoder(args.model)
store_path = store_path_for(slide, out)
embed_slide(slide, store_path, encoder=encoder)
store = EmbeddingStore.open(store_path)

if args.box:
    x, y, w, h = (float(v) for v in args.box.split(","))
else:  # the tissue tile closest to the centre of all tissue tiles
    centre = store.coords.mean(axis=0)
    i = int(np.argmin(np.linalg.norm(store.coords - centre, axis=1)))
    x, y = (float(v) for v in store.coords[i])
    w = h = float(store.tile_l0)
box = [[x, y], [x + w, y + h]]

positives = tiles_in_shapes(store.coords, store.tile_l0, [box])
query = build_query(store.embeddings, positives)
matches = search_stores(
    query, [store_path], model=store.signature["model"], k=10, exclude={store_path: positives}
)
if not encoder.trained:
    print("[UNTRAINED model: these matches are not a result]")
for rank, m in enumerate(matches, 1):
    print(f"{rank:>2}. x={m.x:<6} y={m.y:<6} similarity {m.similarity:.4f}")

png = similarity_figure(
    slide, store, similarity_map(store, query), out / "search.png",
    boxes=[(x, y, w, h)], marks=[(m.x, m.y, m.tile_l0, m.tile_l0) for m in matches],
    warning=None if encoder.trained else encoder.label,
)  # fmt: skip
print(f"wrote {png}")

if has_display() and not args.headless:
    import napari

    from tilescope._napari._demo import show_search

    viewer = napari.Viewer(title="Tilescope: region search")
    show_search(viewer, slide, store_path, (x, y, w, h))
    napari.run()
