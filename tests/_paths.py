"""Where the shared real data lives (never copied into the repo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED = Path(os.environ.get("TILESCOPE_SHARED_DATA", _DEFAULT))
CMU = SHARED / "slides" / "CMU-1-Small-Region.svs"
TCGA = SHARED / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
PATCHES = SHARED / "patches" / "crc_val_he_7k"


def need(path: Path) -> Path:
    """Skip (with the reason) when the shared data is not beside the repo."""
    if not path.exists():
        pytest.skip(f"shared test data not found: {path}")
    return path
