"""ShardForest: stacked per-shard sum trees whose bits depend on a shard's masses alone."""

from __future__ import annotations

import numpy as np
import pytest
from _core_helpers import P_THRESHOLD, chisquare_pvalue

from irdro_sampler.shard_forest import ShardForest


def _masses(rows: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.gamma(0.5, 1.0, (rows, width))
    m[rng.random((rows, width)) < 0.3] = 0.0  # cut samples: never found
    m[:, 0] += 0.1  # every row searchable
    return m


def _built(m: np.ndarray) -> ShardForest:
    forest = ShardForest(*m.shape)
    forest.leaf_buffer()[:, : m.shape[1]] = m
    forest.refresh()
    return forest


@pytest.mark.parametrize("width", [1, 5, 8, 9, 64, 65, 1000, 4097])
def test_updates_in_any_order_equal_a_fresh_build_bit_for_bit(width):
    m = _masses(5, width)
    forest, rng = ShardForest(5, width), np.random.default_rng(1)
    for _ in range(3):  # partial updates with stale values first, then the final values
        key = np.unique(rng.integers(0, m.size, 40))
        forest.set(key // width, key % width, rng.random(key.size))
    forest.set(*np.divmod(np.arange(m.size), width), m.ravel())
    fresh = _built(m)
    for a, b in zip(forest.levels, fresh.levels, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(forest.totals, fresh.totals)
    np.testing.assert_allclose(forest.totals, m.sum(axis=1), rtol=1e-12)


def test_a_rows_sums_do_not_depend_on_the_other_rows():
    """What makes the sharded draw world-size independent: a shard held among 2 or among 7 rows."""
    m = _masses(7, 300)
    alone = _built(m[2:4])
    together = _built(m)
    for a, b in zip(alone.levels, together.levels, strict=True):
        np.testing.assert_array_equal(a, b[2:4])
    rows, fractions = np.array([0, 1, 1, 0]), np.array([0.0, 0.3, 0.9999, 0.5])
    np.testing.assert_array_equal(alone.find(rows, fractions), together.find(rows + 2, fractions))


def test_find_follows_the_masses_and_never_returns_a_zero_mass_leaf():
    m = _masses(3, 200, seed=4)
    forest = _built(m)
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 3, 60_000)
    offsets = forest.find(rows, rng.random(rows.size))
    assert np.all(m[rows, offsets] > 0)
    for r in range(3):
        counts = np.bincount(offsets[rows == r], minlength=200)
        assert chisquare_pvalue(counts, m[r] / m[r].sum()) > P_THRESHOLD
    # Fractions at the ends land on the first and the last positive leaf.
    ends = forest.find(np.array([1, 1]), np.array([0.0, np.nextafter(1.0, 0.0)]))
    positive = np.flatnonzero(m[1] > 0)
    assert ends.tolist() == [positive[0], positive[-1]]


def test_bad_input_is_refused():
    forest = _built(_masses(2, 10))
    with pytest.raises(ValueError, match="masses must be finite"):
        forest.set(np.array([0]), np.array([1]), np.array([np.nan]))
    with pytest.raises(ValueError, match=r"leaves must lie in \[0, 2\) x \[0, 10\)"):
        forest.set(np.array([2]), np.array([0]), np.array([1.0]))
    empty = ShardForest(1, 4)
    with pytest.raises(ValueError, match="total mass 0"):
        empty.find(np.array([0]), np.array([0.5]))
