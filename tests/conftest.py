"""Shared fixtures: synthetic slides written once per session.

Synthetic slides come from `tilescope.synthetic.SyntheticSlide`; each fixture returns a
`SynthFile` (the path and the spec, whose `region` / `tissue_truth` give exact references).
Paths to the real shared slides are in `_paths.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

# model fixtures (tiny_encoder, snapshot_dir, offline_hub, no_network) for every test module
from model_fixtures import *  # noqa: E402,F403,I001

from tilescope._torch_env import preload_triton
from tilescope.synthetic import Blob, SyntheticSlide

# Tests import torch directly too, some after a napari canvas loaded Mesa's LLVM: see _torch_env.
preload_triton()

# The same physical tissue (blobs in µm) over a 1536 x 1024 µm slide, at two base resolutions.
PHYSICAL_BLOBS = (
    Blob(cx=420.0, cy=380.0, rx=300.0, ry=250.0),
    Blob(cx=1130.0, cy=600.0, rx=260.0, ry=330.0),
)


@dataclass(frozen=True)
class SynthFile:
    """A synthetic slide on disk and the spec that describes its content exactly."""

    path: Path
    spec: SyntheticSlide


def _write(factory: pytest.TempPathFactory, name: str, spec: SyntheticSlide, kind: str = "tiff"):
    suffix = ".svs" if kind == "svs" else ".tif"
    path = factory.mktemp("slides") / f"{name}{suffix}"
    return SynthFile(spec.write(path, kind=kind), spec)


@pytest.fixture(scope="session")
def synth_05(tmp_path_factory: pytest.TempPathFactory) -> SynthFile:
    """3072 x 2048 px at 0.5 µm/px (generic TIFF, levels 1/4/16) with `PHYSICAL_BLOBS`."""
    spec = SyntheticSlide(3072, 2048, mpp=0.5, blobs=PHYSICAL_BLOBS)
    return _write(tmp_path_factory, "synth_05", spec)


@pytest.fixture(scope="session")
def synth_025(tmp_path_factory: pytest.TempPathFactory) -> SynthFile:
    """6144 x 4096 px at 0.25 µm/px (Aperio SVS, levels 1/4/16): same tissue as `synth_05`."""
    spec = SyntheticSlide(6144, 4096, mpp=0.25, blobs=PHYSICAL_BLOBS)
    return _write(tmp_path_factory, "synth_025", spec, kind="svs")


@pytest.fixture(scope="session")
def synth_0263(tmp_path_factory: pytest.TempPathFactory) -> SynthFile:
    """2000 x 1500 px at 0.2631 µm/px: a base resolution that is no power of two of 0.5."""
    blobs = (Blob(cx=263.0, cy=197.0, rx=200.0, ry=160.0),)
    spec = SyntheticSlide(2000, 1500, mpp=0.2631, blobs=blobs, n_levels=2)
    return _write(tmp_path_factory, "synth_0263", spec)


@pytest.fixture(scope="session")
def synth_blank(tmp_path_factory: pytest.TempPathFactory) -> SynthFile:
    """1024 x 768 px of glass only."""
    return _write(tmp_path_factory, "synth_blank", SyntheticSlide(1024, 768, mpp=0.5, n_levels=2))


@pytest.fixture(scope="session")
def synth_tiny(tmp_path_factory: pytest.TempPathFactory) -> SynthFile:
    """150 x 120 px at 0.5 µm/px, almost all tissue: smaller than one 224 px tile."""
    spec = SyntheticSlide(150, 120, mpp=0.5, blobs=(Blob(37.5, 30.0, 60.0, 50.0),), n_levels=1)
    return _write(tmp_path_factory, "synth_tiny", spec)
