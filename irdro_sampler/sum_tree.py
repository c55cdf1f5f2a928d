"""The sampler's dynamic weighted-draw structure: a sum tree with O(log n) updates and draws, vectorised.

Why it cannot drift: a parent is always *recomputed* from its children, never adjusted by a delta, so
after any number of updates every node holds exactly the float64 value a fresh build from the same
leaves would give. Masses cannot go negative or NaN unless a leaf is set to such a value, which
:meth:`FanoutSumTree.set` refuses.
"""

from __future__ import annotations

import numpy as np
import torch


def _check_masses(values: np.ndarray) -> None:
    if values.size and not (np.all(np.isfinite(values)) and values.min() >= 0.0):
        bad = values[~(np.isfinite(values) & (values >= 0))][0]
        raise ValueError(f"sum tree masses must be finite and >= 0, got {bad}")


class FanoutSumTree:
    """A sum tree with ``fanout`` children per node and a flat prefix-sum "frontier" on top.

    This is the sampler's draw structure. It is built for large ``n`` (1e8 leaves) where every
    random memory access costs ~60-100 ns and every numpy call a few microseconds, so it minimises
    both the number of levels touched per draw and the number of numpy calls per level:

    * ``levels[0]`` holds the leaves (padded with zeros to a multiple of ``fanout``);
      ``levels[k + 1][g]`` is the sum of group ``g`` of ``levels[k]`` (``fanout`` adjacent nodes, one
      or two cache lines). The first level with at most ``frontier`` nodes is the top level: its
      inclusive prefix sums (``prefix``, recomputed after every :meth:`set`, O(frontier)) replace the
      upper tree, so a draw is one ``searchsorted`` followed by a short descent of group rows.
    * A group sum is a fixed pairwise fold (:func:`_fold`), computed identically by :meth:`build` and
      by :meth:`set`: after any sequence of updates every node is bitwise equal to a fresh build from
      the same leaves (no deltas, no drift). :attr:`total` is the last prefix sum.

    Memory: ``8 * n * fanout / (fanout - 1)`` bytes plus padding (about 9.1 bytes per leaf at
    fanout 8). ``set`` and ``find`` cost O(m * fanout * log_fanout(n / frontier) + frontier).
    """

    def __init__(self, num_leaves: int, *, fanout: int = 8, frontier: int = 1 << 15) -> None:
        if num_leaves < 1:
            raise ValueError(f"num_leaves must be >= 1, got {num_leaves}")
        if fanout < 2:
            raise ValueError(f"fanout must be >= 2, got {fanout}")
        self.num_leaves = int(num_leaves)
        self.fanout = int(fanout)
        self.levels: list[np.ndarray] = []
        size = self.num_leaves
        while size > frontier:
            padded = -(-size // self.fanout) * self.fanout
            self.levels.append(_zeros(padded))
            size = padded // self.fanout
        self.levels.append(_zeros(size))
        self._rows = [level.reshape(-1, self.fanout) for level in self.levels[:-1]]
        self.prefix = _zeros(size + 1)  # prefix[0] = 0, prefix[j + 1] = sum of top nodes 0..j

    @property
    def total(self) -> float:
        return float(self.prefix[-1])

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in self.levels) + self.prefix.nbytes

    @property
    def nodes(self) -> np.ndarray:
        """Every stored value (all levels, then the prefix sums) as one new array (for checks)."""
        return np.concatenate([*self.levels, self.prefix])

    def leaves(self) -> np.ndarray:
        """A read-only view of the leaf values."""
        view = self.levels[0][: self.num_leaves]
        view.flags.writeable = False
        return view

    # -- construction --------------------------------------------------------------------------------
    def build(self, values: np.ndarray) -> None:
        """Set every leaf at once (O(n))."""
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.num_leaves,):
            raise ValueError(f"values must have shape ({self.num_leaves},), got {values.shape}")
        _check_masses(values)
        self.levels[0][: self.num_leaves] = values
        self.refresh()

    def leaf_buffer(self) -> np.ndarray:
        """The writable leaf array (length ``num_leaves``): fill it in place, then call :meth:`refresh`.

        Lets the caller build 1e8 leaves chunk by chunk without a second O(n) temporary. The caller
        guarantees finite, non-negative values.
        """
        return self.levels[0][: self.num_leaves]

    def refresh(self) -> None:
        """Recompute every internal node and the prefix sums from the leaves (O(n))."""
        self.levels[0][self.num_leaves :] = 0.0
        chunk = 1 << 18  # groups per chunk: bounds the fold's temporaries
        for k, rows in enumerate(self._rows):
            out = self.levels[k + 1]
            for start in range(0, rows.shape[0], chunk):
                stop = min(start + chunk, rows.shape[0])
                out[start:stop] = _fold(np.ascontiguousarray(rows[start:stop].T))
            out[rows.shape[0] :] = 0.0
        self._refresh_prefix()

    def _refresh_prefix(self) -> None:
        self.prefix[0] = 0.0
        # torch's CPU cumsum: the same sequential float64 additions as np.cumsum (bitwise equal), ~3x
        # faster. Views are made per call (cached ones would not survive a copy of the tree).
        torch.cumsum(torch.from_numpy(self.levels[-1]), 0, out=torch.from_numpy(self.prefix[1:]))

    # -- updates -------------------------------------------------------------------------------------
    def set(self, leaves: np.ndarray, values: np.ndarray) -> None:
        """Set some leaves (duplicates allowed: the last value wins) and refresh their ancestors.

        Fastest with sorted ``leaves`` (the sampler passes sorted unique indices).
        """
        leaves = np.asarray(leaves, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        _check_masses(values)
        if leaves.size == 0:
            return
        if leaves.min() < 0 or leaves.max() >= self.num_leaves:
            raise ValueError(f"leaves must lie in [0, {self.num_leaves})")
        if leaves.size > 1 and not np.all(leaves[1:] >= leaves[:-1]):
            order = np.argsort(leaves, kind="stable")  # stable: the last value of a leaf still wins
            leaves, values = leaves[order], np.broadcast_to(values, leaves.shape)[order]
        self._set(leaves, values)

    def _set(self, leaves: np.ndarray, values: np.ndarray) -> None:
        """:meth:`set` without the checks (sorted int64 leaves in range, finite non-negative float64 values)."""
        self.levels[0][leaves] = values
        shift = self.fanout.bit_length() - 1
        pow2 = self.fanout == 1 << shift  # a shift is ~3x cheaper than an int64 division
        groups = leaves >> shift if pow2 else leaves // self.fanout
        for k, rows in enumerate(self._rows):
            groups = _dedupe_sorted(groups)
            if 2 * groups.size >= rows.shape[0]:
                # A small level: recomputing all of it is cheaper than a gather (same values).
                self.levels[k + 1][: rows.shape[0]] = _fold(np.ascontiguousarray(rows.T))
            else:
                # (children, groups) layout: the fold then runs on contiguous rows (~3x faster).
                self.levels[k + 1][groups] = _fold(np.ascontiguousarray(np.take(rows, groups, axis=0).T))
            groups = groups >> shift if pow2 else groups // self.fanout
        self._refresh_prefix()

    # -- search --------------------------------------------------------------------------------------
    def find(self, targets: np.ndarray) -> np.ndarray:
        """Leaf index whose cumulative range contains each target in ``[0, total)``.

        Never returns a leaf of mass 0: a child is taken only where the running prefix strictly
        increases, i.e. where its mass is positive; a target that rounding pushes past the last
        positive child of a node (or past ``total``) goes to that child. Targets are processed in
        sorted order (nearby memory for nearby targets, ~2x fewer cache misses at large n).
        """
        t = np.array(targets, dtype=np.float64, copy=True).reshape(-1)
        m = t.size
        if m == 0:
            return np.zeros(0, dtype=np.int64)
        if self.prefix[-1] <= 0.0:
            raise ValueError("cannot search a sum tree of total mass 0")
        order = None
        sort = self.levels[0].size > _SORT_ABOVE or (m >= 64 and self.prefix.size > _SORT_PREFIX_ABOVE)
        if m > 1 and sort and not np.all(t[1:] >= t[:-1]):
            order = _approx_order(t)
            t = t[order]
        # Frontier: node j with prefix[j] <= t < prefix[j + 1].
        prefix = self.prefix
        node = np.searchsorted(prefix, t, side="right") - 1
        top = prefix.size - 1
        over = node >= top
        if over.any():  # t >= total by rounding: the last node with positive mass, from its start
            node[over] = np.searchsorted(prefix, prefix[-1], side="left") - 1
            t[over] = prefix[node[over]]
        t -= prefix[node]
        fan = self.fanout
        pos = np.arange(m, dtype=np.int64)
        buf = np.empty((fan + 1, m), dtype=np.float64)  # row 0: zeros; row i: prefix of children < i
        buf[0] = 0.0
        flat = buf.reshape(-1)
        le = np.empty((fan, m), dtype=bool)
        count_dtype = np.uint8 if fan < 256 else np.int64
        for rows in reversed(self._rows):
            # Inclusive prefix sums of each target's child row, laid out (child, target) so every
            # operation below runs on contiguous rows of length m.
            buf[1:] = np.take(rows, node, axis=0).T
            for i in range(2, fan + 1):
                buf[i] += buf[i - 1]
            np.less_equal(buf[1:], t, out=le)
            child = np.add.reduce(le.view(np.uint8) if fan < 256 else le, axis=0, dtype=count_dtype)
            child = child.astype(np.int64)  # count(prefix <= t): the child whose range holds t
            if child.max() >= fan:  # rounding put t at/after the row's sum: take the last positive child
                bad = np.flatnonzero(child >= fan)
                child[bad] = np.add.reduce(buf[1:, bad] < buf[fan, bad], axis=0, dtype=np.int64)
                t[bad] = flat[child[bad] * m + bad]
            at = child * m
            at += pos
            t -= flat[at]
            node *= fan
            node += child
        if order is not None:
            out = np.empty_like(node)
            out[order] = node
            return out
        return node


# Above this many leaves (32 MB, more than the last-level cache) searching the targets in sorted order
# pays: neighbouring targets share tree paths and pages.
_SORT_ABOVE = 1 << 22
# Above this many prefix sums, sorting pays for the frontier's searchsorted alone: with sorted keys its
# binary searches are far better predicted (~3x faster for 4k targets over 16k-32k sums).
_SORT_PREFIX_ABOVE = 1 << 10


def _approx_order(t: np.ndarray) -> np.ndarray:
    """A permutation sorting non-negative ``t`` up to its low mantissa bits (for memory locality only).

    The bits of a non-negative float64 order like the float, so the position can be packed into the
    low bits of each key and one SIMD int64 sort replaces a (3x slower) argsort.
    """
    shift = max(1, (t.size - 1).bit_length())
    key = t.view(np.int64) >> shift
    key <<= shift
    key |= np.arange(t.size, dtype=np.int64)
    key.sort()
    return key & ((1 << shift) - 1)


def _zeros(size: int) -> np.ndarray:
    # np.empty + fill rather than np.zeros: the pages are touched now (not faulted in one by one by
    # random updates later) and large arrays get transparent huge pages (fewer TLB misses).
    # Aligned to 64 bytes: a row of 8 float64 is then exactly one cache line (malloc's 16-byte offset
    # made every row straddle two lines, doubling the cache misses of a row gather).
    raw = np.empty(size + 8, dtype=np.float64)
    skip = (-raw.ctypes.data % 64) // 8
    arr = raw[skip : skip + size]
    arr.fill(0.0)
    return arr


def _fold(x: np.ndarray) -> np.ndarray:
    """Sum along axis 0 by a fixed pairwise pattern (row j + row j + h, halving, odd row into row 0).

    The same pattern on the same values gives the same bits whatever the memory layout of ``x``,
    which is what keeps incremental updates bitwise equal to a rebuild.
    """
    while x.shape[0] > 1:
        h = x.shape[0] // 2
        y = x[:h] + x[h : 2 * h]
        if x.shape[0] % 2:
            y[0] += x[2 * h]
        x = y
    return x[0]


def _dedupe_sorted(a: np.ndarray) -> np.ndarray:
    if a.size < 2:
        return a
    keep = np.empty(a.size, dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


class LeafMasses:
    """The masses and their total, without a search structure: what balanced draws need.

    Balanced draws find samples through the stride scheduler's key tree and only read the masses and
    their total, so keeping :class:`FanoutSumTree`'s sums up to date would be wasted work (a quarter of
    a step at 1e8). The total is a running sum: :meth:`refresh` computes it from the leaves (a fixed
    chunked pairwise sum, so the same leaves give the same bits), :meth:`_set` adds each update's
    change. It is a pure function of the refresh and the updates since, not of the leaves alone; so a
    saved state carries it (:meth:`restore_total`). Rounding leaves it within ~1e-15 of the
    updates' magnitudes; if cancellation could make that error large relative to the total, the total
    is recomputed from the leaves (O(n), deterministic).
    """

    def __init__(self, num_leaves: int, *, leaves: np.ndarray | None = None) -> None:
        if num_leaves < 1:
            raise ValueError(f"num_leaves must be >= 1, got {num_leaves}")
        self.num_leaves = int(num_leaves)
        if leaves is None:
            leaves = _zeros(self.num_leaves)
        elif leaves.dtype != np.float64 or leaves.shape != (self.num_leaves,):
            got = f"{leaves.dtype}{leaves.shape}"
            raise ValueError(f"leaves must be float64 of shape ({self.num_leaves},), got {got}")
        # One level, the leaves (the sum tree's layout); ``leaves`` may be a strided view into the
        # caller's records (the balanced draws keep each mass beside its credit).
        self.levels = [leaves]
        self._total = 0.0
        self._moved = 0.0  # sum of the magnitudes added and removed since the last exact total

    @property
    def total(self) -> float:
        return self._total

    @property
    def nbytes(self) -> int:
        """Bytes of the leaves (for a view into records: of the mass field only)."""
        return self.levels[0].nbytes

    @property
    def nodes(self) -> np.ndarray:
        """The leaves, then the total (for checks)."""
        return np.append(self.levels[0], self._total)

    def leaves(self) -> np.ndarray:
        """A read-only view of the leaf values."""
        view = self.levels[0][: self.num_leaves]
        view.flags.writeable = False
        return view

    def leaf_buffer(self) -> np.ndarray:
        """The writable leaves: fill in place (finite, >= 0), then call :meth:`refresh`."""
        return self.levels[0]

    def refresh(self) -> None:
        """Recompute the total from the leaves (O(n))."""
        total = 0.0
        for start in range(0, self.num_leaves, _SUM_CHUNK):
            total += float(np.sum(self.levels[0][start : start + _SUM_CHUNK]))
        self._total, self._moved = total, 0.0

    @property
    def moved(self) -> float:
        """The magnitudes added and removed since the total was last computed from the leaves."""
        return self._moved

    def restore_total(self, total: float, moved: float) -> None:
        """Take the running total of a saved state (after the leaves were rebuilt and refreshed)."""
        self._total, self._moved = float(total), float(moved)

    def _set(self, leaves: np.ndarray, values: np.ndarray, old: np.ndarray | None = None) -> None:
        """Set leaves (sorted, distinct, in range; values finite and >= 0: checked by the caller);
        ``old``: their current values, when the caller has them."""
        old = self.levels[0][leaves] if old is None else old
        self.levels[0][leaves] = values
        added, removed = float(np.sum(values)), float(np.sum(old))
        self._total += added - removed
        self._moved += added + removed
        if self._total < self._moved * _CANCEL_LIMIT:  # the rounding error could matter: recompute
            self.refresh()


_SUM_CHUNK = 1 << 22
# Recompute the running total when it falls below this fraction of the magnitudes moved since the last
# exact one: its rounding error (~1e-16 of those per update) then stays below ~1e-9 of the total.
_CANCEL_LIMIT = 2.0**-20
