"""FanoutSumTree: sums, drift-free updates (bitwise equal to a rebuild), weighted search."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _core_helpers import P_THRESHOLD, chisquare_pvalue

from irdro_sampler.sum_tree import FanoutSumTree

# ------------------------------------------------------------------------------ FanoutSumTree
# The sampler's draw structure. Small frontiers force several group levels below the prefix top.
FANOUT_CONFIGS = [(8, 1 << 15), (8, 4), (3, 2), (2, 1), (16, 50)]


def _fanout(n, fanout, frontier):
    return FanoutSumTree(n, fanout=fanout, frontier=frontier)


@pytest.mark.parametrize(("fanout", "frontier"), FANOUT_CONFIGS)
@pytest.mark.parametrize("n", [1, 5, 64, 1000, 4099])
def test_fanout_build_totals(n, fanout, frontier):
    values = np.random.default_rng(n).exponential(size=n)
    tree = _fanout(n, fanout, frontier)
    assert tree.total == 0.0
    tree.build(values)
    assert math.isclose(tree.total, values.sum(), rel_tol=1e-12)
    np.testing.assert_array_equal(tree.leaves(), values)
    assert not tree.leaves().flags.writeable
    # Every group node is the sum of its children (up to rounding of the fixed pairwise fold).
    for k in range(len(tree.levels) - 1):
        child = tree.levels[k]
        parent = tree.levels[k + 1]
        np.testing.assert_allclose(parent[: child.size // fanout], child.reshape(-1, fanout).sum(axis=1), rtol=1e-12)
    assert tree.prefix[0] == 0.0 and np.all(np.diff(tree.prefix) >= 0)


@pytest.mark.parametrize(("fanout", "frontier"), FANOUT_CONFIGS)
def test_fanout_random_sets_equal_fresh_build_bitwise(fanout, frontier):
    rng = np.random.default_rng(fanout * 1000 + frontier)
    n = 2053
    tree = _fanout(n, fanout, frontier)
    tree.build(rng.exponential(size=n))
    for it in range(600):
        m = int(rng.choice([1, 3, 40, 600, 1500]))
        leaves = rng.integers(0, n, size=m)
        if rng.random() < 0.5:
            leaves = np.unique(leaves)  # the sampler passes sorted unique leaves; also test unsorted
        values = rng.exponential(size=leaves.size) * 10.0 ** rng.uniform(-30, 30, size=leaves.size)
        values[rng.random(leaves.size) < 0.1] = 0.0
        tree.set(leaves, values)
        if it % 100 == 0 or it == 599:
            fresh = _fanout(n, fanout, frontier)
            fresh.build(tree.leaves().copy())
            np.testing.assert_array_equal(tree.nodes, fresh.nodes)
    assert np.all(tree.nodes >= 0) and np.all(np.isfinite(tree.nodes))


def test_fanout_set_duplicates_and_bad_input():
    tree = _fanout(5, 2, 1)
    tree.build(np.ones(5))
    tree.set(np.array([2, 2, 4]), np.array([7.0, 3.0, 0.0]))
    np.testing.assert_array_equal(tree.leaves(), [1, 1, 3, 1, 0])
    assert tree.total == 6.0
    before = tree.nodes
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="masses"):
            tree.set(np.array([0, 1]), np.array([1.0, bad]))
    with pytest.raises(ValueError, match="leaves"):
        tree.set(np.array([5]), np.array([1.0]))
    with pytest.raises(ValueError, match="leaves"):
        tree.set(np.array([-1]), np.array([1.0]))
    np.testing.assert_array_equal(tree.nodes, before)
    with pytest.raises(ValueError, match="fanout"):
        FanoutSumTree(10, fanout=1)
    with pytest.raises(ValueError, match="num_leaves"):
        FanoutSumTree(0)
    empty = _fanout(4, 2, 1)
    empty.build(np.zeros(4))
    with pytest.raises(ValueError, match="total mass 0"):
        empty.find(np.array([0.0]))


@pytest.mark.parametrize(("fanout", "frontier"), FANOUT_CONFIGS)
@pytest.mark.parametrize("n", [1, 13, 500])
def test_fanout_find_chi_square(n, fanout, frontier):
    rng = np.random.default_rng(7 * n + fanout)
    values = rng.exponential(size=n) ** 3
    values[rng.random(n) < 0.3] = 0.0
    if values.sum() == 0:
        values[-1] = 1.0
    tree = _fanout(n, fanout, frontier)
    tree.build(values)
    found = tree.find(rng.random(100_000) * tree.total)
    assert found.min() >= 0 and found.max() < n
    counts = np.bincount(found, minlength=n)
    assert chisquare_pvalue(counts, values) > P_THRESHOLD  # also asserts zero-mass leaves are empty


@pytest.mark.parametrize(("fanout", "frontier"), FANOUT_CONFIGS)
def test_fanout_find_never_returns_zero_mass_even_at_edges(fanout, frontier):
    values = np.array([0.0, 1.0, 0.0, 0.0, 2.0, 0.0, 1e-300, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    tree = _fanout(values.size, fanout, frontier)
    tree.build(values)
    cum = np.cumsum(values)
    total = tree.total
    targets = np.concatenate([
        [0.0, total, np.nextafter(total, 0), np.nextafter(total, np.inf), total * 2],  # rounding overshoot
        cum, np.nextafter(cum, 0), np.nextafter(cum, np.inf),  # exactly on and around every boundary
        np.linspace(0, total, 5001),
    ])
    leaf = tree.find(targets)
    assert np.all(values[leaf] > 0), targets[values[leaf] == 0]
    # In-range targets land in the leaf whose range contains them (boundaries go to the next leaf).
    inside = np.linspace(0, total, 5001)[:-1]
    leaf = tree.find(inside)
    lo = np.concatenate([[0.0], cum])[leaf]
    assert np.all((lo <= inside + 1e-12) & (inside < cum[leaf] + 1e-12))
    # Output order follows the input order (targets are sorted internally).
    shuffled = np.random.default_rng(0).permutation(inside)
    np.testing.assert_array_equal(tree.find(shuffled), tree.find(inside)[np.searchsorted(inside, shuffled)])


def test_fanout_leaf_buffer_refresh_equals_build():
    rng = np.random.default_rng(3)
    values = rng.random(3001)
    a, b = _fanout(3001, 8, 16), _fanout(3001, 8, 16)
    a.build(values)
    b.leaf_buffer()[:] = values
    b.refresh()
    np.testing.assert_array_equal(a.nodes, b.nodes)
    assert a.nbytes > 8 * 3001


# ------------------------------------------------------------------------------ LeafMasses
# Balanced draws' masses: leaves plus a running total (no sums to search).
def test_leaf_masses_running_total_tracks_the_exact_sum():
    from irdro_sampler.sum_tree import LeafMasses

    n = 5000
    rng = np.random.default_rng(0)
    store = LeafMasses(n)
    store.leaf_buffer()[:] = rng.exponential(1.0, n)
    store.refresh()
    assert store.total == pytest.approx(math.fsum(store.leaves()), rel=1e-13)
    for _ in range(2000):
        idx = np.unique(rng.integers(0, n, 64))
        store._set(idx, rng.exponential(1.0, idx.size) * 10.0 ** rng.uniform(-3, 2, idx.size))
    # Rounding of ~2000 running additions: far below the 1e-9 the samplers' checks allow.
    assert store.total == pytest.approx(math.fsum(store.leaves()), rel=1e-12)
    assert store.nodes[-1] == store.total and np.array_equal(store.nodes[:-1], store.leaves())
    assert not store.leaves().flags.writeable


def test_leaf_masses_recompute_when_cancellation_would_dominate():
    """Large masses replaced by tiny ones: the running sum alone would keep ~1e-16 of the large ones
    as error, larger than the new total; the store recomputes it from the leaves instead."""
    from irdro_sampler.sum_tree import LeafMasses

    n = 1000
    store = LeafMasses(n)
    store.leaf_buffer()[:] = 1e6
    store.refresh()
    store._set(np.arange(n), np.full(n, 1e-9))
    assert store.total == pytest.approx(1e-6, rel=1e-12)
    assert store.moved == 0.0  # computed from the leaves just now


def test_leaf_masses_over_strided_records_and_restore():
    from irdro_sampler.sum_tree import LeafMasses

    records = np.zeros(300, dtype=[("mass", "<f8"), ("offset", "<f4"), ("draws", "<u4")])
    store = LeafMasses(300, leaves=records["mass"])
    store.leaf_buffer()[:] = np.arange(300.0)
    store.refresh()
    store._set(np.array([3, 7]), np.array([0.5, 0.25]))
    assert records["mass"][3] == 0.5 and store.total == pytest.approx(np.arange(300.0).sum() - 9.25, rel=1e-14)
    copy = LeafMasses(300)
    copy.leaf_buffer()[:] = records["mass"]
    copy.refresh()
    copy.restore_total(store.total, store.moved)  # what a sampler's load_state_dict does
    assert (copy.total, copy.moved) == (store.total, store.moved)
    with pytest.raises(ValueError, match="leaves must be float64 of shape"):
        LeafMasses(300, leaves=np.zeros(299))
    with pytest.raises(ValueError, match="leaves must be float64 of shape"):
        LeafMasses(300, leaves=np.zeros(300, dtype=np.float32))
    with pytest.raises(ValueError, match="num_leaves"):
        LeafMasses(0)
