"""TileSchedule: blocks best first, re-ordering and restriction while a stream runs."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tilescope.errors import TilescopeError
from tilescope.grid import TileGrid
from tilescope.schedule import TileSchedule, view_keys
from tilescope.slide import Slide
from tilescope.tiles import stream_tiles
from tilescope.tissue import tissue_mask


class _Layout:
    def __init__(self, n_rows: int = 6, n_cols: int = 8, tile: float = 100.0) -> None:
        self.r, self.c = np.divmod(np.arange(n_rows * n_cols), n_cols)
        self.coords = np.stack([self.c * tile, self.r * tile], axis=1).astype(np.int64)
        self.tile_l0 = tile
        self.n_cols = n_cols

    def __len__(self) -> int:
        return len(self.coords)

    def groups(self, k: int = 2) -> np.ndarray:
        """Blocks of k x k cells, numbered in grid order."""
        cols = -(-self.n_cols // k)
        return (self.r // k) * cols + self.c // k


def _drain(s: TileSchedule, size: int = 100) -> list[np.ndarray]:
    out = []
    while (got := s.take(size)) is not None:
        out.append(got)
    return out


def test_grid_order_by_default_block_by_block() -> None:
    lay = _Layout()
    s = TileSchedule()
    s.bind(lay, np.arange(len(lay)), lay.groups())
    blocks = _drain(s)
    assert [len(b) for b in blocks] == [4] * 12
    np.testing.assert_array_equal(blocks[0], [0, 1, 8, 9])  # a 2 x 2 block, in grid order
    np.testing.assert_array_equal(np.sort(np.concatenate(blocks)), np.arange(len(lay)))
    assert s.take(4) is None and s.n_remaining == 0 and len(s.remaining()) == 0


def test_prioritize_reorders_what_is_left_but_not_what_was_handed_out() -> None:
    lay = _Layout()
    s = TileSchedule()
    s.bind(lay, np.arange(len(lay)), lay.groups())
    first = s.take(4)
    far = lay.coords[-1] + 50.0  # centre of the last tile
    s.prioritize_near(tuple(far))
    nxt = s.take(4)
    np.testing.assert_array_equal(nxt, [47, 39, 46, 38])  # far corner first; ties: grid order
    rest = _drain(s)
    got = np.concatenate([first, nxt, *rest])
    np.testing.assert_array_equal(np.sort(got), np.arange(len(lay)))  # exactly once
    assert 0 not in np.concatenate([nxt, *rest])  # a handed-out block is not handed again
    # a block's priority is its best remaining tile: blocks come nearest first
    d = [np.hypot(*(lay.coords[b] + 50 - far).T).min() for b in rest]
    assert d == sorted(d)


def test_partial_take_leaves_the_rest_of_the_block() -> None:
    lay = _Layout()
    s = TileSchedule()
    s.bind(lay, np.arange(len(lay)), lay.groups())
    np.testing.assert_array_equal(s.take(3), [0, 1, 8])
    np.testing.assert_array_equal(s.take(3), [9])  # the same block first: it is still best


def test_a_block_across_the_view_edge_waits_with_its_tiles_outside() -> None:
    """View first: the tiles in the view come before the rest of the blocks they share."""
    lay = _Layout(8, 8)  # tiles of 100 px, blocks of 4 x 4 tiles
    s = TileSchedule()
    s.prioritize_view((250, 250, 550, 550))  # tiles (2..5, 2..5): across all four blocks
    s.bind(lay, np.arange(len(lay)), lay.groups(4))
    view = {r * 8 + c for r in range(2, 6) for c in range(2, 6)}
    got = _drain(s, 16)
    first = np.concatenate(got)[:16]
    assert set(first.tolist()) == view, "a tile outside the view came before the view's"
    keys = [np.hypot(*(lay.coords[t] + 50 - 400.0)) for t in first]
    assert np.all(np.diff(np.floor(np.array(keys) / 100)) >= 0)  # nearest the centre first
    rest = np.concatenate(got)[16:]
    ring = np.maximum(np.abs(lay.coords[rest] + 50 - 400.0).max(axis=1) - 150, 0)
    assert np.all(np.diff(np.floor((ring / 100 - 0.5) / 2)) >= 0)  # then outward, in rings
    np.testing.assert_array_equal(np.sort(np.concatenate(got)), np.arange(len(lay)))
    # the view moves: what is left is ordered for the new view
    s2 = TileSchedule()
    s2.prioritize_view((250, 250, 550, 550))
    s2.bind(lay, np.arange(len(lay)), lay.groups(4))
    s2.take(16)
    s2.prioritize_view((600, 600, 800, 800))  # the bottom-right corner: tiles 54, 55, 62, 63
    np.testing.assert_array_equal(np.sort(s2.take(16)[:4]), [54, 55, 62, 63])  # in key order
    with pytest.raises(TilescopeError, match="finite"):
        s2.prioritize_view((0, 0, np.nan, 5))


def test_view_keys_in_view_then_rings_outward() -> None:
    centres = np.array([[500, 500], [650, 500], [740, 500], [500, 900], [2000, 500]], float)
    keys = view_keys(centres, (300, 300, 700, 700), 100.0)
    assert keys[0] == 0 and keys[1] == 1  # the centre, then one tile out
    assert keys[2] < keys[3] < keys[4]  # half a tile past the edge is still in view
    assert keys[2] == 2  # in the view: rings around the centre
    assert keys[3] > keys[1] + 2  # past the view's own keys


def test_restrict_and_lift() -> None:
    lay = _Layout()
    s = TileSchedule()
    s.bind(lay, np.arange(len(lay)), lay.groups())
    s.take(4)  # block 0: tiles 0, 1, 8, 9
    s.restrict([1, 2, 3, 40])
    np.testing.assert_array_equal(s.remaining(), [2, 3, 40])  # 1 was handed out already
    got = np.concatenate(_drain(s))
    np.testing.assert_array_equal(np.sort(got), [2, 3, 40])
    s.restrict(None)
    assert s.n_remaining == len(lay) - 4 - 3


def test_restrict_to_regions_before_and_after_binding() -> None:
    lay = _Layout()  # tiles of 100 px, 8 columns
    s = TileSchedule()
    s.restrict_to_regions([(150, 150, 10, 10)])  # inside tile (1, 1) = 9
    s.bind(lay, np.arange(len(lay)), lay.groups())
    np.testing.assert_array_equal(s.remaining(), [9])
    s.restrict_to_regions([(0, 0, 100, 100), (700, 500, 100, 100)])
    np.testing.assert_array_equal(s.remaining(), [0, 47])
    with pytest.raises(TilescopeError, match="positive width"):
        s.restrict_to_regions([(0, 0, -1, 5)])


def test_indices_keys_and_from_order() -> None:
    lay = _Layout()
    s = TileSchedule.from_order([47, 1, 47, 0])  # duplicates count once
    s.bind(lay, np.arange(len(lay)), lay.groups())
    got = _drain(s)
    assert [b.tolist() for b in got] == [[47], [1, 0]]  # 1 and 0 share a block, 1 is due first
    s2 = TileSchedule(indices=[3, 4, 5], keys=-np.arange(len(lay), dtype=float))
    s2.bind(lay, np.arange(4, len(lay)), lay.groups())  # a resume: 3 is done already
    np.testing.assert_array_equal(np.concatenate(_drain(s2)), [5, 4])


def test_keys_before_binding_and_errors() -> None:
    lay = _Layout()
    s = TileSchedule()
    s.prioritize(np.arange(len(lay))[::-1].astype(float))  # applied when bound
    assert not s.bound and s.n_remaining == 0
    s.bind(lay, np.arange(len(lay)), lay.groups())
    assert s.bound and s.wait_bound(0)
    # strictly by key across blocks: the last block gives 47, 46 (keys 0, 1), then the block to
    # its left has the next key (45: 2)
    assert [s.take(4).tolist() for _ in range(3)] == [[47, 46], [45, 44], [43, 42]]
    with pytest.raises(TilescopeError, match="one value per tile"):
        s.prioritize(np.zeros(3))
    with pytest.raises(TilescopeError, match="already bound"):
        s.bind(lay, np.arange(len(lay)), lay.groups())
    nan_last = TileSchedule(keys=np.where(np.arange(len(lay)) < 40, np.nan, 0.0))
    nan_last.bind(lay, np.arange(len(lay)), lay.groups())
    np.testing.assert_array_equal(nan_last.take(4), [40, 41])  # NaN keys go last: 32, 33
    got = [nan_last.take(4).tolist() for _ in range(4)]  # they wait for every 0 key
    # the last block's 38, 39 come with its 46, 47: no other block is better than them
    assert got == [[42, 43], [44, 45], [46, 47, 38, 39], [0, 1, 8, 9]]


def test_concurrent_reprioritising_hands_out_every_tile_once() -> None:
    lay = _Layout(40, 40)
    s = TileSchedule()
    s.bind(lay, np.arange(len(lay)), lay.groups(4))
    rng = np.random.default_rng(0)
    stop = threading.Event()

    def gui() -> None:  # a camera moving around
        while not stop.is_set():
            s.prioritize_near(tuple(rng.uniform(0, 4000, 2)))
            if rng.random() < 0.2:
                s.restrict(None)

    t = threading.Thread(target=gui)
    t.start()
    try:
        got = np.concatenate(_drain(s, 7))
    finally:
        stop.set()
        t.join()
    np.testing.assert_array_equal(np.sort(got), np.arange(len(lay)))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_follows_a_schedule_changed_while_it_runs(synth_05, workers: int) -> None:
    """After the batches already read ahead, a stream serves the new priority: view first."""
    with Slide(synth_05.path) as slide:
        layout = TileGrid(min_tissue=0.0).layout(slide, tissue_mask(slide))
    s = TileSchedule()
    prefetch = 2
    stream = stream_tiles(synth_05.path, layout, target_mpp=0.5, tile_px=224, batch_size=4,
                          num_workers=workers, prefetch_batches=prefetch, order=s)  # fmt: skip
    first = next(stream)
    assert 0 in first.indices  # grid order until told otherwise
    corner = layout.coords.max(axis=0) + layout.tile_l0 / 2  # the last tile's centre
    s.prioritize_near(tuple(corner))
    later = [b.indices for _, b in zip(range(prefetch + 3), stream, strict=False)]
    stream.close()
    dist = np.hypot(*(layout.coords + layout.tile_l0 / 2 - corner).T)
    served = np.concatenate(later[prefetch + 1 :])  # past what was in hand when it changed
    assert dist[served].max() < np.median(dist), "the new priority was not followed"
