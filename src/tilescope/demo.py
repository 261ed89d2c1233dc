"""The demo: embed the sample slide, score prompts, search a region, export; PNGs when headless.

``tilescope demo`` (and ``bash examples/demo.sh``) runs this. With a display it opens napari
with the widgets instead (see ``tilescope._napari._demo``). BiomedCLIP is used when its weights
are reachable; otherwise the tiny untrained model, with a loud notice on every output.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import WeightsNotFoundError

DEFAULT_PROMPTS = """\
tumor: invasive carcinoma; malignant epithelium
epidermis: benign squamous epithelium; keratinocytes
stroma: fibrous connective tissue; collagen
inflammation: dense lymphocytic infiltrate
adipose: adipose tissue; fat cells
"""
TEMPLATES = ("an H&E image of {}", "a histopathology image of {}")
UNTRAINED_BANNER = (
    "NOTICE: BiomedCLIP weights were not found (offline, not cached), so this demo runs the "
    "tiny UNTRAINED model. Its heatmaps, labels and matches show how Tilescope works, and "
    "mean nothing. See README 'Using BiomedCLIP offline' to supply the real weights."
)
#: The notice when an untrained model was asked for (``--model tiny-random``).
UNTRAINED_NOTE = (
    "NOTICE: this demo runs an UNTRAINED model, as asked. Its heatmaps, labels and matches "
    "show how Tilescope works, and mean nothing."
)


def untrained_notice(requested_model: str | None) -> str:
    """The notice for results of an untrained model: BiomedCLIP was missing (`demo_encoder`
    fell back, which it only does when no model was named), or the model was asked for."""
    return UNTRAINED_NOTE if requested_model else UNTRAINED_BANNER


@dataclass
class DemoResult:
    slide: Path
    store: Path
    model: str
    trained: bool
    label: str
    scores: dict[str, float]
    query_box_l0: tuple[int, int, int, int]
    matches: list[dict[str, Any]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    exports: list[Path] = field(default_factory=list)


def demo_slide(explicit: str | None = None, workdir: Path | None = None) -> Path:
    """The slide to show: `explicit`, else the sample slide (env var, cache, or download unless
    offline), else a synthetic slide written to `workdir` when the sample cannot be had (offline:
    ``TILESCOPE_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``, or unreachable), with a notice."""
    from .sample import sample_or_synthetic

    if explicit:
        return Path(explicit)
    slide, why = sample_or_synthetic(workdir or Path.cwd())
    if why:
        print(f"NOTICE: {why}", file=sys.stderr)
    return slide


def demo_encoder(model: str | None = None, device: str | None = None) -> Any:
    """BiomedCLIP if reachable (or `model` if named), else the tiny untrained model + notice."""
    from .models import DEFAULT_MODEL, TINY_MODEL, load_encoder

    if model:
        return load_encoder(model, device=device)
    try:
        return load_encoder(DEFAULT_MODEL, device=device)
    except WeightsNotFoundError as exc:  # its message says where it looked and how to fix it
        bar = "!" * 80
        print(f"\n{bar}\n{UNTRAINED_BANNER}\n\n{exc}\n{bar}\n", file=sys.stderr)
        return load_encoder(TINY_MODEL, device=device)


def query_box(store: Any, scores_col: np.ndarray) -> tuple[int, int, int, int]:
    """A level-0 box (x, y, w, h) around the tile scoring highest for the slide label."""
    i = int(np.argmax(scores_col))
    x, y = (int(v) for v in store.coords[i])
    t = int(round(store.tile_l0))
    return x, y, t, t


def run_headless(
    slide: Path, out_dir: Path, encoder: Any, *, prompts: str = DEFAULT_PROMPTS, k: int = 10
) -> DemoResult:
    """Embed, score, search and export without a display; writes PNGs and exports to out_dir."""
    from .embed import embed_slide, store_path_for
    from .export import export_store
    from .figures import score_figure, similarity_figure
    from .score import PromptSet, save_scores, score_store
    from .search import query_from_regions, search_stores, similarity_map
    from .store import EmbeddingStore

    out_dir.mkdir(parents=True, exist_ok=True)
    store_path = store_path_for(slide, out_dir)
    print(f"embedding {slide.name} with {encoder.label} ...")
    embed_slide(slide, store_path, encoder=encoder, progress=_print_progress)
    store = EmbeddingStore.open(store_path)
    warning = None if encoder.trained else f"{encoder.label}: NOT A RESULT"

    ps = PromptSet.parse(prompts, templates=TEMPLATES)
    scores, pooled = score_store(store, ps, encoder.encode_text, encoder.logit_scale)
    save_scores(store, "demo", scores, ps, {"pooling": pooled.method})
    fig_heat = score_figure(slide, store, scores, pooled, out_dir / "heatmap.png", warning=warning)

    box = query_box(store, scores.probs[:, ps.class_names.index(pooled.label)])
    x, y, w, h = box
    query, pos, _ = query_from_regions(store, [[[x, y], [x + w, y + h]]])
    found = search_stores(query, [store_path], model=store.signature["model"], k=k,
                          exclude={store_path: pos})  # fmt: skip
    fig_sim = similarity_figure(
        slide, store, similarity_map(store, query), out_dir / "search.png", boxes=[box],
        marks=[(m.x, m.y, m.tile_l0, m.tile_l0) for m in found], warning=warning,
    )  # fmt: skip
    exports = [
        export_store(store_path, out_dir / "export.zarr", overwrite=True),
        export_store(store_path, out_dir / "tiles.geojson", overwrite=True),
    ]
    return DemoResult(
        slide=slide, store=store_path, model=encoder.model_id, trained=encoder.trained,
        label=pooled.label, scores=pooled.scores, query_box_l0=box,
        matches=[m.__dict__ for m in found], figures=[fig_heat, fig_sim], exports=exports,
    )  # fmt: skip


def report(result: DemoResult, requested_model: str | None = None) -> str:
    """The headless demo's summary; `requested_model` is the model the user named, if any."""
    lines = []
    if not result.trained:
        lines.append(untrained_notice(requested_model))
    lines.append(f"slide:        {result.slide}")
    lines.append(f"model:        {result.model}{'' if result.trained else ' (UNTRAINED)'}")
    lines.append(f"slide label:  {result.label}")
    for name, v in sorted(result.scores.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<14} {v:.4f}")
    lines.append(f"query tile (level-0 x, y, w, h): {result.query_box_l0}")
    for rank, m in enumerate(result.matches[:5], 1):
        lines.append(f"  match {rank}: x={m['x']} y={m['y']} similarity {m['similarity']:.4f}")
    lines += [f"wrote {p}" for p in [*result.figures, *result.exports]]
    lines.append(f"store:        {result.store}")
    return "\n".join(lines)


def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _print_progress(p: Any) -> None:
    if p.stage == "done":
        print(f"  {p.done} tiles in {p.elapsed:.1f} s ({p.rate:.1f} patches/s)")
