"""Prompt heatmaps: embed a slide, score it against text prompts, show the heatmap.

    python examples/prompt_heatmap.py [SLIDE] [--model tiny-random] [--headless]

Headless (or without a display) it writes heatmap.png and prints the slide label; with a
display it opens napari with the slide, one heatmap layer per class and the widgets docked.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tilescope.demo import TEMPLATES, demo_encoder, demo_slide, has_display
from tilescope.embed import embed_slide, store_path_for
from tilescope.figures import score_figure
from tilescope.score import PromptSet, score_store
from tilescope.store import EmbeddingStore

PROMPTS = """
tumor: invasive carcinoma; malignant epithelium
stroma: fibrous connective tissue
inflammation: dense lymphocytic infiltrate
"""

ap = argparse.ArgumentParser()
ap.add_argument("slide", nargs="?")
ap.add_argument("--model")
ap.add_argument("--out", default="tilescope-examples")
ap.add_argument("--headless", action="store_true")
args = ap.parse_args()

out = Path(args.out)
slide = demo_slide(args.slide, out)
encoder = demo_encoder(args.model)  # BiomedCLIP if reachable, else tiny-random + notice
store_path = store_path_for(slide, out)
embed_slide(slide, store_path, encoder=encoder)  # resumes / skips if already done
store = EmbeddingStore.open(store_path)

prompts = PromptSet.parse(PROMPTS, templates=TEMPLATES)
scores, pooled = score_store(
    store, prompts, encoder.encode_text, encoder.logit_scale, method="attention"
)
note = "" if encoder.trained else "  [UNTRAINED model: not a result]"
print(f"slide label: {pooled.label}{note}")
for name, value in pooled.scores.items():
    print(f"  {name:<14} {value:.4f}")

png = score_figure(
    slide, store, scores, pooled, out / "heatmap.png",
    warning=None if encoder.trained else encoder.label,
)  # fmt: skip
print(f"wrote {png}")

if has_display() and not args.headless:
    import napari

    from tilescope._napari._demo import show_heatmaps

    viewer = napari.Viewer(title="Tilescope: prompt heatmap")
    show_heatmaps(viewer, slide, store_path, encoder, PROMPTS)
    napari.run()
