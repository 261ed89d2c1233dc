"""Which store holds which slide: by file identity, never by file stem alone."""

from __future__ import annotations

import json
from pathlib import Path

from tilescope.catalog import (
    default_store_dir,
    file_identity,
    find_stores,
    read_signature,
    store_path_for,
    stores_for_slide,
)


def fake_store(path: Path, slide: Path, *, complete: bool = True, created: str = "2026") -> Path:
    """A folder whose zarr.json carries an embeddings signature for `slide`."""
    path.mkdir(parents=True)
    sig = {"format": "tilescope-embeddings", "slide": file_identity(slide), "complete": complete,
           "created": created}  # fmt: skip
    (path / "zarr.json").write_text(json.dumps({"attributes": {"tilescope": sig}}))
    return path


def two_slides(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "dA" / "slide.svs", tmp_path / "dB" / "slide.svs"
    for p, content in ((a, b"A" * 5000), (b, b"B" * 5000)):
        p.parent.mkdir()
        p.write_bytes(content)
    return a, b


def test_same_stem_gets_distinct_stores(tmp_path: Path) -> None:
    a, b = two_slides(tmp_path)
    out = tmp_path / "out"
    pa = store_path_for(a, out)
    assert pa == out / "slide.zarr"
    fake_store(pa, a)
    pb = store_path_for(b, out)
    assert pb != pa and pb.name.startswith("slide-") and pb.suffix == ".zarr"
    fake_store(pb, b)
    # each slide finds its own store again, whatever order it is asked in
    assert store_path_for(b, out) == pb
    assert store_path_for(a, out) == pa


def test_taken_names_are_not_given_twice(tmp_path: Path) -> None:
    a, b = two_slides(tmp_path)
    out = tmp_path / "out"
    pa = store_path_for(a, out)
    pb = store_path_for(b, out, taken=[pa])
    assert pa != pb


def test_renamed_slide_finds_its_store(tmp_path: Path) -> None:
    a, _ = two_slides(tmp_path)
    out = tmp_path / "out"
    fake_store(out / "slide.zarr", a)
    renamed = tmp_path / "renamed.svs"
    renamed.write_bytes(a.read_bytes())
    assert store_path_for(renamed, out) == out / "slide.zarr"
    assert stores_for_slide(renamed, [out]) == [out / "slide.zarr"]


def test_stores_for_slide_prefers_complete_then_newest(tmp_path: Path) -> None:
    a, b = two_slides(tmp_path)
    out = tmp_path / "out"
    old = fake_store(out / "x1.zarr", a, created="2026-01-01T00:00:00")
    new = fake_store(out / "x2.zarr", a, created="2026-06-01T00:00:00")
    partial = fake_store(out / "x3.zarr", a, complete=False, created="2026-12-01T00:00:00")
    fake_store(out / "other.zarr", b)
    assert stores_for_slide(a, [out, out]) == [new, old, partial]


def test_non_stores_are_ignored(tmp_path: Path) -> None:
    a, _ = two_slides(tmp_path)
    out = tmp_path / "out"
    (out / "export.zarr").mkdir(parents=True)
    (out / "export.zarr" / "zarr.json").write_text('{"attributes": {}}')
    (out / "broken.zarr").mkdir()
    (out / "broken.zarr" / "zarr.json").write_text("{not json")
    assert find_stores(out) == []
    assert read_signature(out / "broken.zarr") is None
    # a name taken by something that is not a store is not used
    (out / "slide.zarr").mkdir()
    (out / "slide.zarr" / "keep.txt").write_text("x")
    assert store_path_for(a, out).name.startswith("slide-")


def test_default_store_dir_follows_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TILESCOPE_STORES", str(tmp_path / "s"))
    assert default_store_dir() == tmp_path / "s"
    monkeypatch.delenv("TILESCOPE_STORES")
    assert default_store_dir() == Path.home() / "tilescope" / "stores"
