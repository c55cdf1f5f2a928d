"""Balanced draws for the map-style sampler: stride scheduling on lazily tracked per-sample credits.

Sample ``i`` is owed ``E_i(b) = sum_{b' <= b} G_b' p_i(b')`` draws by global batch ``b`` (``G_b`` the
global batch size, ``p(b)`` the sampler's distribution) and has been drawn ``D_i`` times. Its *credit*
is ``c_i = E_i - D_i + theta_i`` with a phase ``theta_i`` in ``[0, 1 - 2**-10]``; it falls *due* when
``c_i >= 1``. Each batch draws the ``G_b`` largest "copies" ``r_i - j`` (``j = 0, 1, ...``; a sample
owed several draws in one batch is drawn several times) of the rank ``r_i = E_i - D_i + theta_i / 4``
among the due samples (and the next due, when fewer than ``G_b`` are), and after ``k`` draws of sample
``i`` its credit drops by ``k`` and its phase is *replaced* by a fresh one, ``theta = hash(seed, i,
D_i)``. Consequences:

* **Flat weights give epochs.** With equal probabilities ``1 / N`` and ``N`` draws per epoch, every
  sample not yet drawn in the epoch ranks at least 3/4 above every one already drawn, so each epoch
  draws every sample exactly once, in the order of its phase: a new seeded permutation per epoch, the
  same on every rank.
* **Changing weights are tracked.** Drawing the most overdue keeps ``|E_i - D_i|`` small whatever the
  weights do between batches (``tests/test_sampler_balanced.py`` asserts < 2 with weights changing every
  batch and measured at most 1.5 there, 1.84 for weights that swing between an ESS of 1% and 36% every
  few dozen batches; ranking by the full credit ``c_i`` reached 2.01 there); a sample of probability 0
  is never drawn.

**Lazy credits.** ``p_i(b) = (1 - u) m_i / S_b + u / N`` (``m_i`` the tilted mass, ``S_b`` their
total, a running sum kept by :class:`~irdro_sampler.sum_tree.LeafMasses`). Between changes of ``m_i``
the credit is ``a_i + w_i V + m_i D1 + D2`` with a per-sample offset ``a_i`` (float32) and global
scalars: the model clock ``V`` and two drift sums ``D1``, ``D2``, where ``w_i = alpha m_i + beta`` is
the rate predicted from the total ``S_ref`` at the last re-key (``alpha = G (1 - u) / S_ref``,
``beta = G u / N``, ``G`` the full global batch). The credit is exact;
the *key* ``K_i = (1 - a_i) / w_i`` -- the model time at which the credit reaches 1 ignoring drift --
is static between events and indexes a min-tree (:class:`KeyMinTree`), so the samples due now are found
in O(G log N). The exact ranks of those candidates (plus, when fewer than ``G`` are due, the ``G``
next due) are then compared. Keys are recomputed for samples that are drawn or change mass, and
all of them (an O(N) "re-key", which also folds the clocks into the offsets) at every refresh of the
sampler and whenever ``S`` leaves ``[S_ref / (1 + eps), S_ref (1 + eps)]`` (``eps = 1/8``): a sample's
predicted due time is then off by at most ~``eps`` of the time since its last event, which bounds the
extra lag to about ``eps`` draws.

**Deferral.** A due sample that a draw passes over (its rank below the draw's *level*, the smallest copy
value drawn) gets the key ``V + (level - r_i) / w_i``: the model time at which its rank reaches that
level. Without it every due sample is a candidate of every draw; with skewed weights that move after
refits, due samples of high phase (credit >= 1, rank low) kept losing, so the pool a draw ranks grew from
one batch to the next (measured at N = 1e7, G = 4096: 4.6k candidates before the second refit, 95k
after 600 draws). Deferred, the pool stays near ``2 G`` between re-keys and the draws barely move: the
count bound and the epochs are unchanged (tests), and a deferred sample can only be passed over while
the level stays above its rank. Keying the tree on the rank instead (no credit >= 1 test) keeps the
pool at ``G`` but reached ``|E - D|`` of 3.7 in the tests (a sample of low rate waits for its rank,
heavy ones are drawn early); deferring to the level plus a margin (0.05 draws) already broke the
bound (2.1). A re-key rebuilds every key from the records, so the draw after it searches every due
sample once. Deferred keys are not a function of the records: states save the keys (4 bytes per
sample); a state saved before deferral has none, rebuilds them and draws without deferral (as it did).

State: the float32 offsets and uint32 draw counts (8 bytes per sample) plus a few scalars. They share
a 16-byte record per sample with the float64 mass (a draw or a mass change touches one cache line,
not two); no sum tree is kept, since nothing searches it. The key tree (float32, 4.6 bytes per
sample) is rebuilt from them at re-keys; its leaf keys are saved (deferral). A mass change that would
leave an offset beyond +-1024 (float32 would lose the credit) re-keys instead.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .sum_tree import _dedupe_sorted

__all__ = ["KeyMinTree", "StrideScheduler", "phases"]

_PHASE_MAX = 1.0 - 2.0**-10  # phases lie in [0, _PHASE_MAX]: a gap of 2**-10 between epochs' credits
_RANK_PHASE_OFF = 0.75  # a draw ranks E - D + (1 - this) * theta
_REKEY_DRIFT = 0.125  # re-key when the tree total drifts by this factor from the one keys assume
_CHUNK = 1 << 22
_KEY_FANOUT = 8  # measured at N = 1e8: 8 beats 16 (0.78 vs 1.0 ms per draw for descent + updates)
# Largest offset a mass change may leave (float32 keeps ~1e-4 of a draw there); beyond it, re-key.
_OFFSET_LIMIT = 1024.0
# A sample's record: its mass, credit offset and draw count (16 bytes, so never across two cache lines).
_RECORD = np.dtype([("mass", "<f8"), ("offset", "<f4"), ("draws", "<u4")])


def phases(seed: int, indices: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The phase of each sample after ``draws`` draws: a splitmix64 hash of (seed, index, draws) in [0, 1)."""
    with np.errstate(over="ignore"):
        x = indices.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= draws.astype(np.uint64) * np.uint64(0xD1B54A32D192ED03)
        x += np.uint64((int(seed) * 0xBF58476D1CE4E5B9 + 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * (2.0**-53 * _PHASE_MAX)


class KeyMinTree:
    """Float32 keys of ``num_leaves`` leaves, the minimum of every ``fanout`` adjacent ones, and so on up.

    ``levels[0]`` holds the keys (padded with +inf to a multiple of ``fanout``); ``levels[k + 1][g]`` is
    the minimum of group ``g`` of ``levels[k]``, up to the first level with at most ``frontier``
    nodes. Minima are exact, so incremental updates equal a rebuild bit for bit. Memory: about
    ``4 * fanout / (fanout - 1)`` bytes per leaf (4.6 at fanout 8). Keys only pick the candidates of
    a draw (the draw ranks exact credits), so float32 suffices.
    """

    def __init__(self, num_leaves: int, *, fanout: int = 8, frontier: int = 1 << 15) -> None:
        self.num_leaves, self.fanout = int(num_leaves), int(fanout)
        if self.fanout < 2 or self.fanout & (self.fanout - 1):
            raise ValueError(f"fanout must be a power of 2 >= 2, got {fanout}")
        self._shift = self.fanout.bit_length() - 1  # a shift is ~3x cheaper than an int64 division
        self.sizes = [self.num_leaves]
        while self.sizes[-1] > frontier:
            self.sizes.append(-(-self.sizes[-1] // self.fanout))
        self.levels = [_aligned_inf(-(-size // self.fanout) * self.fanout) for size in self.sizes]
        self._rows = [level.reshape(-1, self.fanout) for level in self.levels[:-1]]

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in self.levels)

    def leaf_buffer(self) -> np.ndarray:
        """The writable keys (length ``num_leaves``): fill in place, then call :meth:`refresh`."""
        return self.levels[0][: self.num_leaves]

    def refresh(self) -> None:
        """Recompute every minimum from the keys (O(N))."""
        for k, rows in enumerate(self._rows):
            np.minimum.reduce(rows, axis=1, out=self.levels[k + 1][: rows.shape[0]])

    def set(self, leaves: np.ndarray, keys: np.ndarray) -> None:
        """Set the keys of ``leaves`` (sorted, distinct) and refresh their ancestors."""
        self.levels[0][leaves] = keys
        groups = leaves
        for k, rows in enumerate(self._rows):
            groups = _dedupe_sorted(groups >> self._shift)
            if 2 * groups.size >= rows.shape[0]:  # a small level: recomputing all of it is cheaper
                np.minimum.reduce(rows, axis=1, out=self.levels[k + 1][: rows.shape[0]])
            else:
                block = np.ascontiguousarray(np.take(rows, groups, axis=0).T)  # (fanout, groups): contiguous rows
                self.levels[k + 1][groups] = np.minimum.reduce(block, axis=0)

    def candidates(self, due: float, count: int) -> np.ndarray:
        """Sorted leaves whose key is finite and ``<= max(due, t)``, ``t`` at least the ``count``-th smallest key.

        Every leaf with a key ``<= due`` is returned, and at least ``count`` leaves when that many have
        finite keys. Descends from the top level, keeping the nodes whose minimum is below the
        threshold and tightening it with the ``count``-th smallest minimum seen (each minimum belongs
        to a distinct leaf, so that bounds the ``count``-th smallest key from above).
        """
        top = self.levels[-1][: self.sizes[-1]]
        limit = _tighten(top, math.inf, due, count)
        nodes = np.flatnonzero(_below(top, limit))
        for k in range(len(self._rows) - 1, -1, -1):
            block = np.take(self._rows[k], nodes, axis=0)  # the children of `nodes`, one row each
            keep = _below(block, limit)
            if np.count_nonzero(keep) > 2 * count:  # the bound from above is loose here: tighten it
                limit = _tighten(block[keep], limit, due, count)
                keep &= block <= limit
            flat = np.flatnonzero(keep)  # row-major: the result stays sorted
            nodes = (nodes[flat >> self._shift] << self._shift) | (flat & (self.fanout - 1))
        return nodes


def _aligned_inf(size: int) -> np.ndarray:
    """float32 +inf, 64-byte aligned: a row of 8 keys never straddles two cache lines."""
    raw = np.empty(size + 16, dtype=np.float32)
    skip = (-raw.ctypes.data % 64) // 4
    arr = raw[skip : skip + size]
    arr.fill(np.inf)
    return arr


def _below(values: np.ndarray, limit: float) -> np.ndarray:
    """``values <= limit``, never true for inf (padding, or a leaf of rate 0)."""
    return values <= limit if limit < math.inf else values < math.inf


def _tighten(values: np.ndarray, limit: float, due: float, count: int) -> float:
    """``min(limit, max(due, the count-th smallest finite value))`` (unchanged with too few values)."""
    if np.count_nonzero(values <= due) > count:  # the count-th smallest is <= due: no partition needed
        return min(limit, due)
    finite = values if np.all(np.isfinite(values)) else values[np.isfinite(values)]
    if finite.size > count:
        kth = float(np.partition(finite, count - 1)[count - 1])
        return min(limit, max(due, kth))
    return limit


class CreditModel:
    """The credit arithmetic shared by :class:`StrideScheduler` and the sharded balanced draws: a sample's
    exact credit ``E - D + theta`` from its stored offset, its mass and the model clock, its key (the
    model time at which the credit reaches 1) and the key of a due sample that lost a draw. One copy, so
    both give the same bits.

    Needs the attributes ``alpha``, ``beta`` (rate ``w = alpha m + beta``), ``clock``, ``drift1``, ``drift2``,
    ``uniform_mix`` and ``ref_total`` (set by :meth:`_predict_rates`).
    """

    alpha: float
    beta: float
    clock: float
    #: Whether a due sample that loses a draw is deferred (module docstring, "Deferral"); False only
    #: for states saved before deferral, which keep drawing as they did.
    defer: bool = True
    drift1: float
    drift2: float

    def rates(self, mass: np.ndarray) -> np.ndarray:
        """Predicted draws per unit of the model clock (``w = alpha m + beta``)."""
        return self.alpha * mass + self.beta

    def _credits(self, offsets: np.ndarray, mass: np.ndarray) -> np.ndarray:
        """Exact credits ``E - D + theta`` (after the last advanced batch) of samples with these fields."""
        return offsets + (self.rates(mass) * self.clock + (mass * self.drift1 + self.drift2))

    def _time_to_accrue(self, credit: np.ndarray, mass: np.ndarray) -> np.ndarray:
        """Model time for samples of ``mass`` to accrue ``credit`` at the predicted rates (float64), inf
        where the rate is 0."""
        rate = self.rates(mass)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            time = credit / rate
        time[rate <= 0.0] = np.inf
        return time

    def _keys_of(self, offsets: np.ndarray, mass: np.ndarray) -> np.ndarray:
        return self._time_to_accrue(1.0 - offsets.astype(np.float64), mass).astype(np.float32)

    def _deferred_keys(self, gap: np.ndarray, mass: np.ndarray) -> np.ndarray:
        """Keys of due samples that lost a draw by ``gap`` (level minus rank, after :meth:`advance`): the
        model time at which the rank reaches the level (ignoring drift), inf for rate 0."""
        return (self.clock + self._time_to_accrue(np.maximum(gap, 0.0), mass)).astype(np.float32)

    def _predict_rates(self, total: float, batch: int, num_samples: int) -> None:
        """Rates predicted from the masses' total ``total`` (``ref_total``): ``batch`` draws per batch,
        ``uniform_mix`` of them uniform over ``num_samples``."""
        self.ref_total = float(total)
        u = self.uniform_mix
        self.alpha = batch * (1.0 - u) / total if total > 0 else 0.0
        self.beta = batch * u / num_samples if total > 0 else batch / num_samples

    def needs_rekey(self, total: float) -> bool:
        """Whether ``total`` left the band around ``ref_total`` within which the predicted rates hold."""
        ref = self.ref_total
        return not (ref > 0 and ref / (1 + _REKEY_DRIFT) <= total <= ref * (1 + _REKEY_DRIFT))


class StrideScheduler(CreditModel):
    """Credits, phases and the key tree of the balanced draws (see the module docstring).

    Each sample's mass is kept beside its credit, in one 16-byte record (``masses``: float64, written
    by the sampler through :class:`~irdro_sampler.sum_tree.LeafMasses`, only read here): a draw or a
    mass change then costs one cache miss per sample at 1e8 samples, not two.
    """

    def __init__(self, num_samples: int, full_batch: int, uniform_mix: float, seed: int, *,
                 initial_phases: bool = True) -> None:
        self.num_samples, self.full_batch = int(num_samples), int(full_batch)
        self.uniform_mix, self.seed = float(uniform_mix), int(seed)
        self._records = np.zeros(self.num_samples, dtype=_RECORD)
        self.masses, self.offsets, self.draws = (self._records[f] for f in ("mass", "offset", "draws"))
        for start in range(0, self.num_samples if initial_phases else 0, _CHUNK):
            idx = np.arange(start, min(start + _CHUNK, self.num_samples), dtype=np.int64)
            self.offsets[start : start + idx.size] = phases(self.seed, idx, self.draws[idx])
        self.clock = self.drift1 = self.drift2 = 0.0
        self.alpha, self.beta, self.ref_total = 0.0, 0.0, 0.0
        self.rekeys = 0
        self.keys = KeyMinTree(self.num_samples, fanout=_KEY_FANOUT)
        self._selected: tuple[np.ndarray, ...] | None = None  # the last select(), for commit()
        self._lost: tuple[np.ndarray, ...] = ()  # due samples the last select() passed over, for commit()
        self._stale: list[np.ndarray] = []  # samples whose key changed since the key tree last saw them

    def leaf_keys(self, indices: np.ndarray | slice) -> np.ndarray:
        """Model time at which each credit (ignoring drift) reaches 1, as float32; inf for rate 0."""
        return self._keys_of(self.offsets[indices], self.masses[indices])

    def _rebuild_keys(self) -> None:
        self._stale = []
        keys = self.keys.leaf_buffer()
        for start in range(0, self.num_samples, _CHUNK):
            stop = min(start + _CHUNK, self.num_samples)
            keys[start:stop] = self.leaf_keys(slice(start, stop))
        self.keys.refresh()

    def rekey(self, *, fold: bool = True) -> None:
        """Fold the clocks into the offsets (with the masses the credits accrued under), then re-key.

        Call with ``fold=True`` *before* the masses change and :meth:`set_reference` after.
        """
        if fold and (self.clock or self.drift1 or self.drift2):
            masses = self.masses
            for start in range(0, self.num_samples, _CHUNK):
                stop = min(start + _CHUNK, self.num_samples)
                m = masses[start:stop]
                credit = self.offsets[start:stop] + (self.rates(m) * self.clock + (m * self.drift1 + self.drift2))
                self.offsets[start:stop] = credit
        self.clock = self.drift1 = self.drift2 = 0.0

    def set_reference(self, total: float) -> None:
        """Predict rates from tree total ``total`` and rebuild every key (after :meth:`rekey`)."""
        self._predict_rates(total, self.full_batch, self.num_samples)
        self.rekeys += 1
        self._rebuild_keys()

    def mass_changed(self, indices: np.ndarray, old: np.ndarray, new: np.ndarray) -> bool:
        """Keep the credits of ``indices`` (sorted, distinct) across a mass change ``old -> new``.

        Call before the new masses are stored, and :meth:`keys_changed` after. Returns False
        (changing nothing) when an offset would grow so large that float32 loses the credit (a mass
        jumped by orders of magnitude): the caller then re-keys (:meth:`rekey` before the change,
        which zeroes the clocks so that no offset moves, :meth:`set_reference` after).
        """
        with np.errstate(over="ignore", invalid="ignore"):  # a huge new mass: refused below
            delta = (self.rates(old) - self.rates(new)) * self.clock + (old - new) * self.drift1
            offsets = self.offsets[indices] + delta
        if offsets.size and not np.abs(offsets).max() <= _OFFSET_LIMIT:
            return False
        self.offsets[indices] = offsets
        return True

    def keys_changed(self, indices: np.ndarray) -> None:
        """Mark the keys of ``indices`` (sorted, distinct) stale; the next draw updates them all at once."""
        self._stale.append(indices)

    def _update_keys(self) -> None:
        if not self._stale:
            return
        if len(self._stale) == 1:
            stale = self._stale[0]
        else:  # each part is sorted: a stable sort merges them in O(n) (np.unique's sort does not see runs)
            stale = _dedupe_sorted(np.sort(np.concatenate(self._stale), kind="stable"))
        self._stale = []
        records = self._records[stale]  # one gather of whole records, not one per field
        self.keys.set(stale, self._keys_of(records["offset"], records["mass"]))

    # -- one batch ------------------------------------------------------------------------------------
    def advance(self, size: int, total: float) -> None:
        """Add batch ``size``'s expected draws ``size * p_i`` to every credit (O(1): three scalars)."""
        u = self.uniform_mix
        if total > 0:
            tilted, floor = size * (1.0 - u) / total, size * u / self.num_samples
            step = (size / self.full_batch) * ((1.0 - u) * self.ref_total / total + u)
        else:  # no tilted mass: the distribution is uniform
            tilted, floor = 0.0, size / self.num_samples
            step = size / self.full_batch
        self.clock += step
        self.drift1 += tilted - self.alpha * step
        self.drift2 += floor - self.beta * step

    def select(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``size`` largest copies ``r_i - j`` among the due candidates: (sorted samples, counts).

        ``r_i = E_i - D_i + theta_i / 4`` (see the module docstring).
        """
        self._update_keys()
        cand = self.keys.candidates(self.clock, size)
        if cand.size == 0:
            raise RuntimeError("balanced draws: no sample has a positive probability")
        # Rank by E - D + theta / 4: the most overdue first, the phase only breaking near-ties (ranking
        # by the full credit let samples of phase ~0 wait up to 2.01 draws in a backlog; this, 1.84).
        records = self._records[cand]  # one gather (mass, credit, draws): commit reuses it
        mass = records["mass"]
        theta = phases(self.seed, cand, records["draws"])
        credit = self._credits(records["offset"], mass) - _RANK_PHASE_OFF * theta
        k = min(size, cand.size)
        level = float(np.partition(credit, cand.size - k)[cand.size - k])  # k-th largest credit
        counts = _copies(credit, level)
        while counts.sum() < size:  # fewer candidates than draws: take further copies
            level -= 1.0
            counts = _copies(credit, level)
        if counts.sum() > size:
            # Ties at the level: keep the largest copy values, equal values by candidate order.
            pos = np.repeat(np.arange(cand.size), counts)
            j = np.arange(pos.size) - np.repeat(np.cumsum(counts) - counts, counts)
            value = credit[pos] - j
            keep = np.argsort(-value, kind="stable")[:size]
            counts = np.bincount(pos[keep], minlength=cand.size)
        chosen = counts > 0
        # Due samples that lost wait for their rank to reach the draw's level (the smallest copy drawn).
        lost = ~chosen & (self.keys.levels[0][cand] <= self.clock) if self.defer else np.zeros_like(chosen)
        low = float(np.min(credit[chosen] - (counts[chosen] - 1))) if lost.any() else 0.0
        self._lost = (cand[lost], low - credit[lost], mass[lost])
        self._selected = (cand[chosen], counts[chosen], records[chosen], theta[chosen])
        return cand[chosen], counts[chosen]

    def commit(self) -> None:
        """Record the draws of the last :meth:`select` (before any other change): new phases and keys."""
        indices, counts, records, theta = self._selected
        self._selected = None
        before = records["draws"]
        after = before + counts.astype(np.uint32)
        change = counts + theta - phases(self.seed, indices, after)
        records["offset"] = records["offset"] - change
        records["draws"] = after
        self._records[indices] = records
        self.keys_changed(indices)
        lost, gap, mass = self._lost
        if lost.size:  # disjoint from the drawn (stale) ones: their keys are set now
            self.keys.set(lost, self._deferred_keys(gap, mass))

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._update_keys()  # as the next draw would: the saved keys are the ones it searches
        return {
            "offsets": torch.from_numpy(self.offsets.copy()),
            "draws": torch.from_numpy(self.draws.view(np.int32).copy()),
            "clock": self.clock, "drift1": self.drift1, "drift2": self.drift2,
            "ref_total": self.ref_total, "alpha": self.alpha, "beta": self.beta, "rekeys": self.rekeys,
            **({"keys": torch.from_numpy(self.keys.leaf_buffer().copy())} if self.defer else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (validated by the caller); rebuild the keys from the restored offsets and masses."""
        self.offsets[:] = np.asarray(state["offsets"], dtype=np.float32)
        self.draws[:] = np.asarray(state["draws"]).astype(np.int32).view(np.uint32)
        for name in ("clock", "drift1", "drift2", "ref_total", "alpha", "beta"):
            setattr(self, name, float(state[name]))
        self.rekeys = int(state["rekeys"])
        # Deferred keys are not a function of the records: saved. A state saved before deferral has none
        # and keeps drawing without it (as it did).
        self.defer = "keys" in state
        if self.defer:
            self._stale = []
            self.keys.leaf_buffer()[:] = np.asarray(state["keys"], dtype=np.float32)
            self.keys.refresh()
        else:
            self._rebuild_keys()


def _copies(credit: np.ndarray, level: float) -> np.ndarray:
    """How many copies ``credit - j`` (j = 0, 1, ...) of each candidate are ``>= level``."""
    counts = np.floor(credit - level) + 1.0
    np.maximum(counts, 0.0, out=counts)
    return counts.astype(np.int64)
