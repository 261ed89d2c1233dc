"""Export: embeddings, coordinates (px and µm), scores and provenance to zarr and GeoJSON.

    python examples/export.py [SLIDE] [--model M] [--headless]

Then reads the zarr back with plain zarr (no Tilescope), as another tool would. With a display
it opens napari with the slide and the Export widget docked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import zarr

from tilescope.demo import demo_encoder, demo_slide, has_display
from tilescope.embed import embed_slide, store_path_for
from tilescope.export import export_store

ap = argparse.ArgumentParser()
ap.add_argument("slide", nargs="?")
ap.add_argument("--model")
ap.add_argument("--out", default="tilescope-examples")
ap.add_argument("--headless", action="store_true")
args = ap.parse_args()

out = Path(args.out)
slide = demo_slide(args.slide, out)
encoder = demo_encoder(args.model)
store_path = store_path_for(slide, out)
embed_slide(slide, store_path, encoder=encoder)

zarr_out = export_store(store_path, out / "export.zarr", dtype="float16", overwrite=True)
geojson_out = export_store(store_path, out / "tiles.geojson", overwrite=True)

# What another tool sees: plain zarr, no Tilescope import needed.
g = zarr.open_group(str(zarr_out), mode="r")
print(
    f"{zarr_out}: embeddings {g['embeddings'].shape} {g['embeddings'].dtype}, "
    f"coords {g['coords'].shape}, coords_um {g['coords_um'].shape}"
)
prov = dict(g.attrs)
print("provenance keys:", sorted(prov))
features = json.loads(geojson_out.read_text())["features"]
print(f"{geojson_out}: {len(features)} tile polygons (open in QuPath: File > Import objects)")

if has_display() and not args.headless:
    import napari

    from tilescope._napari._reader import read_slides

    viewer = napari.Viewer(title="Tilescope: export")
    for data, kwargs, _ in read_slides(str(slide)):
        layer = viewer.add_image(data, **kwargs)
        layer.metadata["tilescope"]["store"] = str(store_path)
    viewer.window.add_plugin_dock_widget("tilescope", "Export embeddings")
    napari.run()
