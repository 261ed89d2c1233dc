"""The demo's headless path and the examples run as scripts and write non-blank figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _paths import CMU, need
from PIL import Image

from tilescope.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """No BiomedCLIP weights reachable: an empty HF cache, offline; the sample slide is local."""
    monkeypatch.setenv("TILESCOPE_SAMPLE_SLIDE", str(need(CMU)))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DISPLAY", raising=False)
    return tmp_path


def assert_figure(path: Path) -> None:
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.std() > 10, f"{path} is blank"
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    assert ((r - g > 25) | (b - g > 25)).mean() > 0.05, f"{path} shows no colour"


def test_demo_headless_falls_back_to_the_untrained_model_loudly(offline_env, capsys):
    out = offline_env / "demo"
    assert main(["demo", "--out", str(out)]) == 0  # no DISPLAY: headless
    captured = capsys.readouterr()
    assert "UNTRAINED" in captured.err and "UNTRAINED" in captured.out
    assert "slide label:" in captured.out
    for name in ("heatmap.png", "search.png"):
        assert_figure(out / name)
    assert (out / "export.zarr" / "zarr.json").exists()
    assert (out / "tiles.geojson").stat().st_size > 100


def test_untrained_notice_blames_missing_weights_only_after_trying_them(capsys, tmp_path):
    from tilescope import demo

    enc = demo.demo_encoder("tiny-random")  # asked for: no fallback, no banner
    assert not enc.trained and "were not found" not in capsys.readouterr().err
    result = demo.DemoResult(
        slide=tmp_path / "s.svs", store=tmp_path / "s.zarr", model=enc.model_id, trained=False,
        label="tumor", scores={"tumor": 1.0}, query_box_l0=(0, 0, 1, 1),
    )  # fmt: skip
    asked = demo.report(result, requested_model="tiny-random")
    assert "UNTRAINED" in asked and "BiomedCLIP weights were not found" not in asked
    fallback = demo.report(result)  # no model named: demo_encoder tried BiomedCLIP first
    assert "BiomedCLIP weights were not found" in fallback


@pytest.mark.parametrize("script", ["prompt_heatmap.py", "region_search.py", "export.py"])
def test_examples_run_headless(script, offline_env):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--headless", "--out",
         str(offline_env / "ex")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "UNTRAINED" in proc.stdout + proc.stderr
    pngs = list((offline_env / "ex").glob("*.png"))
    assert script == "export.py" or pngs
    for png in pngs:
        assert_figure(png)


@pytest.mark.napari
def test_demo_in_napari_shows_heatmaps_and_search(offline_env, monkeypatch, qtbot):
    """The display path: napari opens with the slide, heatmaps, query, matches and widgets."""
    import napari

    from tilescope._napari._demo import launch

    seen = {}

    def capture(*_, **__):
        viewer = napari.current_viewer()
        seen["layers"] = [layer.name for layer in viewer.layers]
        seen["docks"] = list(viewer.window.dock_widgets)
        seen["shot"] = viewer.screenshot(canvas_only=True, flash=False)
        viewer.close()

    monkeypatch.setattr(napari, "run", capture)
    assert launch(need(CMU), offline_env / "gui", None, None) == 0
    names = " ".join(seen["layers"])
    assert "CMU-1-Small-Region.svs" in names and "Tilescope query" in names
    assert "similarity · CMU-1-Small-Region [UNTRAINED]" in names
    assert "winning class · CMU-1-Small-Region [UNTRAINED]" in names
    assert any(n.startswith("p(") for n in seen["layers"])
    assert {"Prompt heatmap (tilescope)", "Region search (tilescope)"} <= set(seen["docks"])
    shot = seen["shot"][..., :3].astype(int)
    assert shot.std() > 10
