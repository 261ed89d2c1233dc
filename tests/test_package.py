"""Packaging: the manifest is found installed, editable or from a wheel; the core stays Qt-free."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_valid_and_commands_resolve():
    from npe2 import PluginManifest

    pm = PluginManifest.from_distribution("tilescope")
    pm.validate_imports()  # every python_name imports
    assert pm.name == "tilescope"
    readers = {r.command for r in pm.contributions.readers}
    assert readers == {"tilescope.get_reader", "tilescope.get_geojson_reader"}


def test_wheel_carries_the_top_level_manifest(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("tilescope-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("tilescope/napari.yaml") == (ROOT / "napari.yaml").read_bytes()
        entry_points = next(n for n in zf.namelist() if n.endswith("entry_points.txt"))
        text = zf.read(entry_points).decode()
    assert "napari.manifest" in text and "tilescope:napari.yaml" in text


@pytest.mark.parametrize("module", ["tilescope", "tilescope.cli", "tilescope.slide"])
def test_core_imports_no_qt_no_napari_no_torch(module):
    code = (
        f"import sys, {module}; bad = [m for m in ('napari', 'qtpy', 'PyQt6', 'PyQt5', 'torch', "
        "'magicgui') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
