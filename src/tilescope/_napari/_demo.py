"""The demo in napari: the slide, prompt heatmaps and a region search, with the widgets docked.

`launch` embeds first (terminal progress bar), then opens the viewer with everything computed,
so the user starts from a full picture and carries on with the widgets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._torch_env import preload_triton
from ..demo import DEFAULT_PROMPTS, TEMPLATES, demo_encoder, query_box, untrained_notice
from ..embed import embed_slide, store_path_for
from ..models import DEFAULT_MODEL
from ._common import open_store, register_encoder
from ._layers import SlideFrame
from ._messages import notify_warning
from ._reader import read_slides

PLUGIN = "tilescope"


def slide_layer(viewer: Any, slide: Path, store_path: Path) -> Any:
    """The slide's layer in `viewer` (opened if needed), linked to its embedding store."""
    for layer in viewer.layers:
        if layer.metadata.get("tilescope", {}).get("path") == str(slide):
            break
    else:
        data, kwargs, _ = read_slides(str(slide))[0]
        layer = viewer.add_image(data, **kwargs)
    layer.metadata["tilescope"]["store"] = str(store_path)
    return layer


def show_heatmaps(
    viewer: Any, slide: Path, store_path: Path, encoder: Any, prompts: str = DEFAULT_PROMPTS
) -> Any:
    """Dock *Prompt heatmap*, fill in `prompts`, and score: heatmaps and the slide label."""
    register_encoder(encoder)
    layer = slide_layer(viewer, slide, store_path)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Prompt heatmap")
    widget.reset_choices()
    widget._slide.value = layer
    widget._prompts.value = prompts
    widget._templates.value = "; ".join(TEMPLATES)
    widget.apply(widget.compute(widget.request()))
    return widget


def show_search(
    viewer: Any, slide: Path, store_path: Path, box_l0: tuple[float, float, float, float]
) -> Any:
    """Dock *Region search*, draw `box_l0` (level-0 x, y, w, h) as the query and search."""
    layer = slide_layer(viewer, slide, store_path)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Region search")
    widget.reset_choices()
    widget._slide.value = layer
    x, y, w, h = box_l0
    corners = SlideFrame.of_layer(layer).l0_to_world([[x, y], [x + w, y + h]])
    widget.query_layer().add_rectangles([corners])
    widget.apply(widget.compute(widget.request()))
    return widget


def _show_heatmap_first(viewer: Any, heat: Any, search: Any) -> None:
    """The winning class of every tile (in the colours of the score table) under the query and
    its matches; the heatmaps and the similarity map stay one click away. The Tilescope docks
    are tabs of one dock: the heatmaps' in front (once Qt has placed the docks)."""
    from qtpy.QtCore import QTimer

    for layer in viewer.layers:
        meta = layer.metadata.get("tilescope", {})
        if meta.get("role") in ("prompt-heatmap", "region-search") and "local" in meta:
            if layer.name.startswith("winning class"):
                layer.visible = True
            elif getattr(layer, "colorbar", None) is not None:  # heatmaps, similarity
                layer.visible = layer.colorbar.visible = False
    QTimer.singleShot(0, heat.native.parent().raise_)


def _demo_query(store_path: Path, encoder: Any) -> tuple[int, int, int, int]:
    """The demo's query: the tile most typical of the slide label (as in the headless demo)."""
    from ..score import PromptSet, score_store

    store = open_store(store_path)
    prompts = PromptSet.parse(DEFAULT_PROMPTS, templates=TEMPLATES)
    scores, pooled = score_store(store, prompts, encoder.encode_text, encoder.logit_scale)
    return query_box(store, scores.probs[:, prompts.class_names.index(pooled.label)])


def launch(slide: Path, out: Path, model: str | None, device: str | None) -> int:
    """Embed `slide` into `out`, open napari with heatmaps and a search; blocks until closed."""
    import napari

    from ..cli._common import ProgressBar

    preload_triton()  # before torch: see tilescope._torch_env
    encoder = demo_encoder(model, device)
    store_path = store_path_for(slide, out)
    bar = ProgressBar(f"embedding {slide.name}")  # the CLI's terminal bar (this run's rate)
    try:
        embed_slide(slide, store_path, encoder=encoder, progress=bar.update)
    finally:
        bar.close()
    viewer = napari.Viewer(title="Tilescope demo" + ("" if encoder.trained else " [UNTRAINED]"))
    viewer.window.add_plugin_dock_widget(PLUGIN, "Export embeddings")
    _, embed = viewer.window.add_plugin_dock_widget(PLUGIN, "Embed slide", tabify=True)
    heat = show_heatmaps(viewer, slide, store_path, encoder)
    search = show_search(viewer, slide, store_path, _demo_query(store_path, encoder))
    _show_heatmap_first(viewer, heat, search)
    embed._out_dir.value = out  # embedding again from the widget reuses the demo's store
    embed._model.value = "biomedclip" if encoder.model_id == DEFAULT_MODEL else encoder.model_id
    viewer.reset_view()  # the whole slide with the matches (Next/Previous zoom in)
    if not encoder.trained:
        notify_warning(untrained_notice(model))
    napari.run()
    return 0
