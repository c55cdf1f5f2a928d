"""A binary sum tree over non-negative float64 leaves: O(log n) updates and weighted draws, vectorised.

Layout: a power-of-two heap. ``nodes[1]`` is the root, node ``k`` has children ``2k`` and ``2k + 1``,
leaf ``i`` lives at ``nodes[P + i]`` where ``P`` is the smallest power of two >= the number of leaves.

Why it cannot drift: a parent is always *recomputed* as ``left + right`` from its children, never
adjusted by a delta, so after any number of updates every node holds exactly the float64 value a
fresh :meth:`build` from the same leaves would give (the same single addition, in the same order).
Masses cannot go negative or NaN unless a leaf is set to such a value, which :meth:`set` refuses.
"""

from __future__ import annotations

import numpy as np


class SumTree:
    """Sum tree over ``num_leaves`` float64 leaves, all 0 initially."""

    def __init__(self, num_leaves: int) -> None:
        if num_leaves < 1:
            raise ValueError(f"num_leaves must be >= 1, got {num_leaves}")
        self.num_leaves = int(num_leaves)
        self.capacity = 1 << max(0, (self.num_leaves - 1).bit_length())
        self.depth = self.capacity.bit_length() - 1
        self.nodes = np.zeros(2 * self.capacity, dtype=np.float64)

    @property
    def total(self) -> float:
        return float(self.nodes[1])

    def leaves(self) -> np.ndarray:
        """A read-only view of the leaf values."""
        view = self.nodes[self.capacity : self.capacity + self.num_leaves]
        view.flags.writeable = False
        return view

    def build(self, values: np.ndarray) -> None:
        """Set every leaf at once (O(n))."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.num_leaves,):
            raise ValueError(f"values must have shape ({self.num_leaves},), got {values.shape}")
        _check_masses(values)
        p = self.capacity
        self.nodes[p : p + self.num_leaves] = values
        self.nodes[p + self.num_leaves :] = 0.0
        size = p // 2
        while size >= 1:
            self._recompute_level(size)
            size //= 2

    def set(self, leaves: np.ndarray, values: np.ndarray) -> None:
        """Set some leaves (duplicates allowed: the last value wins) and refresh their ancestors."""
        leaves = np.asarray(leaves, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        _check_masses(values)
        if leaves.size == 0:
            return
        p = self.capacity
        self.nodes[p + leaves] = values
        nodes = (p + leaves) >> 1
        size = p // 2
        while size >= 1:
            if size <= 2 * nodes.size:
                # Small levels: recomputing the whole level is cheaper than a scatter (same values).
                self._recompute_level(size)
            else:
                self.nodes[nodes] = self.nodes[2 * nodes] + self.nodes[2 * nodes + 1]
            nodes >>= 1
            size //= 2

    def _recompute_level(self, size: int) -> None:
        below = self.nodes[2 * size : 4 * size]
        self.nodes[size : 2 * size] = below[0::2] + below[1::2]

    def find(self, targets: np.ndarray) -> np.ndarray:
        """Leaf index whose cumulative range contains each target in ``[0, total)``.

        A target is routed left while it is below the left subtree's mass, so a leaf of mass 0 is
        never chosen unless rounding pushes a target to the very end of a subtree; callers that need
        the guarantee check the returned leaves (``IRDROSampler`` redraws such rare cases).
        """
        t = np.array(targets, dtype=np.float64, copy=True)
        node = np.ones(t.shape, dtype=np.int64)
        nodes = self.nodes
        for _ in range(self.depth):
            node <<= 1
            left = nodes[node]
            go_right = t >= left
            t -= left * go_right
            node += go_right
        return node - self.capacity


def _check_masses(values: np.ndarray) -> None:
    if values.size and not (np.all(np.isfinite(values)) and values.min() >= 0.0):
        bad = values[~(np.isfinite(values) & (values >= 0))][0]
        raise ValueError(f"sum tree masses must be finite and >= 0, got {bad}")
