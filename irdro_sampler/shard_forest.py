"""ShardForest: one sum tree per virtual shard, stacked so that a rank's shards are updated and searched at once.

The sharded table needs, per shard, a total and a weighted search whose bits depend on the shard's
masses alone (not on which rank owns it, nor on how many shards that rank holds), so that the global
batch is the same for every world size. One :class:`~irdro_sampler.sum_tree.FanoutSumTree` per shard has
that property but costs a Python call per shard in every update and draw (a step touches up to B
shards). Here every owned shard is a row of the same padded shape, level by level:

* ``levels[0]`` is ``(rows, r0)``: row ``j`` holds the masses of shard ``j``, zero-padded to ``r0``, the
  shard width rounded up to a multiple of ``fanout``; ``levels[k + 1][j, g]`` is the
  :func:`~irdro_sampler.sum_tree._fold` of the ``fanout`` nodes of group ``g`` of ``levels[k][j]``
  (rows padded to a multiple of ``fanout`` again), up to a top level of at most ``fanout`` nodes whose
  fold is the row's total.
* Every parent is recomputed from its children by the same fold (never adjusted by a delta), so after
  any updates each node equals a fresh build from the same leaves, bit for bit, and a row's nodes and
  total are a function of its shard's masses and the (global) width only.

Memory: ``8 * r0 * fanout / (fanout - 1)`` bytes per row (about 9.1 bytes per sample at fanout 8).
"""

from __future__ import annotations

import numpy as np

from .sum_tree import _check_masses, _dedupe_sorted, _fold


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


class ShardForest:
    """The masses of ``rows`` shards of at most ``width`` samples each, with per-row totals and search.

    Args:
        rows: number of shards held (rows); may be 0.
        width: the largest shard's size (the same on every rank, so rows have the same shape everywhere).
        fanout: children per node (>= 2).
    """

    def __init__(self, rows: int, width: int, *, fanout: int = 8) -> None:
        if rows < 0 or width < 1 or fanout < 2:
            raise ValueError(f"ShardForest needs rows >= 0, width >= 1, fanout >= 2; got {rows}, {width}, {fanout}")
        self.rows, self.width, self.fanout = int(rows), int(width), int(fanout)
        widths = [_round_up(self.width, self.fanout)]
        while widths[-1] > self.fanout:
            nodes = widths[-1] // self.fanout
            widths.append(nodes if nodes <= self.fanout else _round_up(nodes, self.fanout))
        self.widths = widths
        self.levels = [np.zeros((self.rows, w), dtype=np.float64) for w in widths]
        self.totals = np.zeros(self.rows, dtype=np.float64)

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in self.levels) + self.totals.nbytes

    def leaves(self) -> np.ndarray:
        """The ``(rows, r0)`` leaf array (read-only view; padding columns are 0)."""
        view = self.levels[0].view()
        view.flags.writeable = False
        return view

    # -- construction --------------------------------------------------------------------------------
    def leaf_buffer(self) -> np.ndarray:
        """The writable ``(rows, r0)`` leaves: fill rows in place (keeping padding at 0), then :meth:`refresh`."""
        return self.levels[0]

    def refresh(self) -> None:
        """Recompute every internal node and total from the leaves (O(rows * r0))."""
        f = self.fanout
        for k in range(len(self.levels) - 1):
            child, parent = self.levels[k], self.levels[k + 1]
            groups = child.shape[1] // f
            for a in range(0, self.rows, 256):  # row chunks bound the fold's temporaries
                block = child[a : a + 256].reshape(-1, groups, f)
                parent[a : a + 256, :groups] = _fold(np.ascontiguousarray(np.moveaxis(block, 2, 0)))
        top = self.levels[-1]
        self.totals[:] = _fold(np.ascontiguousarray(top.T)) if self.rows else 0.0

    # -- updates -------------------------------------------------------------------------------------
    def set(self, rows: np.ndarray, offsets: np.ndarray, values: np.ndarray) -> None:
        """Set leaves ``(rows, offsets)`` (distinct pairs) to ``values`` (finite, >= 0) and refresh their ancestors."""
        rows = np.asarray(rows, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        _check_masses(values)
        if rows.size == 0:
            return
        if rows.min() < 0 or rows.max() >= self.rows or offsets.min() < 0 or offsets.max() >= self.width:
            raise ValueError(f"leaves must lie in [0, {self.rows}) x [0, {self.width})")
        # Flat positions, sorted: a position's group key at every level is then flat // fanout, and
        # keys come out sorted, so duplicates are adjacent.
        flat = rows * self.widths[0] + offsets
        order = np.argsort(flat, kind="stable")
        flat = flat[order]
        self.levels[0].reshape(-1)[flat] = values[order] if values.ndim else values
        f = self.fanout
        for k in range(len(self.levels) - 1):
            key = _dedupe_sorted(flat // f)
            children = np.take(self.levels[k].reshape(-1, f), key, axis=0)
            row, col = np.divmod(key, self.widths[k] // f)
            flat = row * self.widths[k + 1] + col
            self.levels[k + 1].reshape(-1)[flat] = _fold(np.ascontiguousarray(children.T))
        touched = _dedupe_sorted(flat // self.widths[-1])
        self.totals[touched] = _fold(np.ascontiguousarray(self.levels[-1][touched].T))

    # -- search --------------------------------------------------------------------------------------
    def find(self, rows: np.ndarray, fractions: np.ndarray) -> np.ndarray:
        """The leaf offset in row ``rows[i]`` whose cumulative range holds ``fractions[i] * totals[rows[i]]``.

        ``fractions`` lie in ``[0, 1)``; every row searched must have a positive total. Never returns a
        leaf of mass 0: at each node the child taken is the number of children's inclusive prefix sums
        ``<= t`` (a zero-mass child does not raise the prefix, so it is skipped); a ``t`` that rounding
        pushes past a node's last positive child goes to that child, from its start.
        """
        rows = np.asarray(rows, dtype=np.int64)
        m = rows.size
        if m == 0:
            return np.zeros(0, dtype=np.int64)
        if np.any(self.totals[rows] <= 0.0):
            raise ValueError("cannot search a shard of total mass 0")
        # Searched in (row, fraction) order: neighbouring draws share paths and cache lines.
        order = np.argsort(rows + np.asarray(fractions, dtype=np.float64) * 0.5, kind="stable")
        rows = rows[order]
        t = np.asarray(fractions, dtype=np.float64)[order] * self.totals[rows]
        node = np.zeros(m, dtype=np.int64)
        pos = np.arange(m)
        top = len(self.levels) - 1
        for k in range(top, -1, -1):
            fan = self.widths[k] if k == top else self.fanout
            groups = self.levels[k].reshape(-1, fan)  # a node's children are one row of this view
            # Inclusive prefix sums laid out (child, draw), so every operation runs on rows of length m.
            prefix = np.take(groups, rows * (self.widths[k] // fan) + node, axis=0).T.copy()
            for i in range(1, fan):
                prefix[i] += prefix[i - 1]
            child = np.count_nonzero(prefix <= t, axis=0)
            over = np.flatnonzero(child >= fan)
            if over.size:  # rounding put t at/after the node's sum: the last positive child, from its start
                child[over] = np.count_nonzero(prefix[:, over] < prefix[-1, over], axis=0)
                t[over] = np.where(child[over] > 0, prefix[np.maximum(child[over] - 1, 0), over], 0.0)
            t -= np.where(child > 0, prefix[np.maximum(child - 1, 0), pos], 0.0)
            node = node * fan + child
        out = np.empty_like(node)
        out[order] = node
        return out
