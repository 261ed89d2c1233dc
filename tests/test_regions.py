"""tilescope.regions: the tiles a set of regions touches."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

from tilescope.errors import TilescopeError
from tilescope.regions import tiles_overlapping


def _grid(n: int = 10, t: float = 100.0) -> np.ndarray:
    r, c = np.divmod(np.arange(n * n), n)
    return np.stack([c * t, r * t], axis=1).astype(np.int64)


def test_small_region_selects_the_tiles_it_overlaps() -> None:
    coords = _grid()
    np.testing.assert_array_equal(tiles_overlapping(coords, 100, [(150, 150, 2, 2)]), [11])
    # straddling a corner: the four tiles around it
    np.testing.assert_array_equal(tiles_overlapping(coords, 100, [(195, 195, 10, 10)]),
                                  [11, 12, 21, 22])  # fmt: skip


def test_touching_an_edge_is_not_overlapping() -> None:
    coords = _grid()
    assert tiles_overlapping(coords, 100, [(100, 100, 100, 100)]).tolist() == [11]
    assert tiles_overlapping(coords, 100, [(1000, 0, 50, 50)]).tolist() == []  # past the grid


def test_polygon_holes_are_respected() -> None:
    coords = _grid()
    outer = [(0, 0), (1000, 0), (1000, 1000), (0, 1000)]
    hole = [(250, 250), (750, 250), (750, 750), (250, 750)]  # tiles 3..6 x 3..6 inside it
    got = tiles_overlapping(coords, 100, [shapely.Polygon(outer, [hole])])
    inside_hole = {r * 10 + c for r in range(3, 7) for c in range(3, 7)}
    assert set(got.tolist()) == set(range(100)) - inside_hole
    assert got.dtype == np.int64 and np.all(np.diff(got) > 0)


def test_union_of_boxes_and_polygons_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    coords = _grid(20, 50.0)
    regions = [tuple(rng.uniform(0, 900, 2)) + tuple(rng.uniform(1, 200, 2)) for _ in range(5)]
    regions.append(shapely.Point(500, 500).buffer(120))
    want = set()
    for i, (x, y) in enumerate(coords):
        tile = shapely.box(x, y, x + 50, y + 50)
        for r in regions:
            geom = shapely.box(r[0], r[1], r[0] + r[2], r[1] + r[3]) if isinstance(r, tuple) else r
            if tile.intersection(geom).area > 0:
                want.add(i)
    assert tiles_overlapping(coords, 50.0, regions).tolist() == sorted(want)


def test_bad_regions_are_refused() -> None:
    coords = _grid()
    with pytest.raises(TilescopeError, match="positive width"):
        tiles_overlapping(coords, 100, [(0, 0, 0, 10)])
    with pytest.raises(TilescopeError, match="a region is a box"):
        tiles_overlapping(coords, 100, ["0,0,10,10"])
    with pytest.raises(TilescopeError, match="no area"):
        tiles_overlapping(coords, 100, [shapely.Point(5, 5)])
    assert tiles_overlapping(coords, 100, []).tolist() == []
