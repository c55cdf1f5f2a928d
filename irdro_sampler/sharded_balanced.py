"""Balanced draws with the per-sample state sharded over the ranks of a process group (issue 17).

The scheme is :mod:`irdro_sampler.stride`'s (read its docstring first): per-sample credits
``E_i - D_i + theta_i`` kept lazily as float32 offsets beside the masses and draw counts, global clock
scalars, a float32 key tree finding the due samples, and each batch taking the ``G_b`` largest copies
``r_i - j`` of the ranks ``r_i = E_i - D_i + theta_i / 4``. Here every rank keeps the records and the key
tree of its own contiguous id range only (:meth:`VirtualShards.ids_of_rank`: 16 + 4.6 bytes per owned
sample); the clock scalars are replicated (every rank computes them from the same reduced numbers).

**Candidates, world-independent.** The unsharded key tree returns every sample with key ``<= due`` and
"at least ``G`` of them", a set its descent decides. Here the candidate set is the smallest that
contract allows, ``{i : K_i <= max(clock, K_(G))}`` with ``K_(G)`` the ``G``-th smallest key over *all*
samples. Each rank sends its own ``G`` smallest keys; the ``G``-th smallest of the union is ``K_(G)``.

**Selection, world-independent.** Each rank takes its candidates' ``G`` largest copies in the order
(value descending, id ascending) -- the unsharded tie-break -- and sends them; the global batch is the
first ``G`` of the union in that order (a rank's copies outside its own first ``G`` cannot be among the
global first ``G``). Every rank receives every copy, so no further collective hands out the ids;
each owner then commits its own draws (new phases, keys) and defers its due candidates that were not
drawn to the level, the smallest copy value drawn (as :mod:`irdro_sampler.stride`, "Deferral").

**The total.** ``S_b`` (the masses' sum) is kept per virtual shard: a running sum per shard, updated
in the shard's id order, so the same whichever rank owns it, and summed over the shard vector in shard
order. The global total is therefore a function of the shards' masses and updates, not of the world
size.

Per draw: two all-gathers (``ceil(S / world) + 1 + G`` float64 per rank, then ``3 G``: each copy's
value, id and mass, so every rank also learns the drawn masses), a third (``G`` keys) only on draws
that re-key; O(G log(N / world)) work per rank, nothing O(N). A re-key
(rare: at refreshes and when the total drifts by 1/8) is O(N / world) per rank.

**Against the unsharded ``BalancedDraws``.** Bit for bit the same batches (ids, counts and, through the
shared shuffle stream ``(seed, b)``, order) when the unsharded key tree has one level (``N <= 2**15``:
its candidate set is then the one above) and the masses' sums are exact in float64 (the running totals
agree), as long as no mass change overflows an offset. Otherwise the candidate sets or the totals' last
bits can differ, and with them, rarely, a batch; the count bound holds globally either way (tested).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .sharded_balanced_state import CONFIG_FIELDS, SCALAR_FIELDS, slice_state
from .stride import (
    _KEY_FANOUT,
    _OFFSET_LIMIT,
    _RANK_PHASE_OFF,
    _RECORD,
    CreditModel,
    KeyMinTree,
    _copies,
    phases,
)
from .sum_tree import _CANCEL_LIMIT, _dedupe_sorted
from .virtual_shards import VirtualShards

__all__ = ["ShardedBalancedDraws"]

_CHUNK = 1 << 22


class ShardedBalancedDraws(CreditModel):
    """This rank's part of the balanced draws over ``shards``: records of ids ``[start, stop)`` only.

    Collective calls (every rank of ``group`` calls them in the same order with the same arguments):
    :meth:`draw` and :meth:`rebuild` (which communicates nothing but moves the replicated clocks).
    :meth:`set_masses` communicates nothing and may get the global update or just the owned part.
    """

    def __init__(
        self, shards: VirtualShards, rank: int, world_size: int, *, global_batch: int, uniform_mix: float,
        seed: int, group: Any = None,
    ) -> None:
        if dist.is_initialized() and dist.get_world_size(group) != world_size:
            raise ValueError(f"world_size {world_size} is not the group's size {dist.get_world_size(group)}")
        self.shards, self.rank, self.world_size, self.group = shards, int(rank), int(world_size), group
        self.dataset_size, self.num_shards = shards.dataset_size, shards.num_shards
        self.global_batch, self.uniform_mix, self.seed = int(global_batch), float(uniform_mix), int(seed)
        self.start, self.stop = shards.ids_of_rank(rank, world_size)
        self.owned_shards = shards.shards_of_rank(rank, world_size)
        n = self.stop - self.start
        self._records = np.zeros(n, dtype=_RECORD)
        self.masses, self.offsets, self.draws = (self._records[f] for f in ("mass", "offset", "draws"))
        for lo in range(0, n, _CHUNK):
            ids = np.arange(self.start + lo, min(self.start + lo + _CHUNK, self.stop), dtype=np.int64)
            self.offsets[lo : lo + ids.size] = phases(self.seed, ids, self.draws[lo : lo + ids.size])
        self.shard_totals = np.zeros(len(self.owned_shards))
        self.shard_moved = np.zeros(len(self.owned_shards))
        self.clock = self.drift1 = self.drift2 = 0.0
        self.alpha = self.beta = self.ref_total = 0.0
        self.rekeys = 0
        self.total = 0.0  # the global total of the last draw
        self.needs_reference = False  # a rebuild or an overflowing mass change asks the next draw to re-key
        self._keys = KeyMinTree(n, fanout=_KEY_FANOUT) if n else None
        self._stale: list[np.ndarray] = []
        self._due: tuple[np.ndarray, ...] = (np.empty(0, dtype=np.int64), np.empty(0), np.empty(0))
        # Credits of samples whose offset a mass change would overflow: exact until the next re-key.
        self._held_ids = np.empty(0, dtype=np.int64)
        self._held_credits = np.empty(0, dtype=np.float64)
        # Every rank's payload has the same length: room for the largest run of shards.
        self._slots = max(len(shards.shards_of_rank(r, world_size)) for r in range(world_size))

    # -- masses -----------------------------------------------------------------------------------------
    def owns(self, ids: np.ndarray) -> np.ndarray:
        """Which of the global ``ids`` this rank owns."""
        ids = np.asarray(ids, dtype=np.int64)
        return (ids >= self.start) & (ids < self.stop)

    def mass_of(self, ids: np.ndarray) -> np.ndarray:
        """Masses of owned global ``ids``."""
        return self.masses[np.asarray(ids, dtype=np.int64) - self.start]

    def set_masses(self, ids: np.ndarray, mass: np.ndarray) -> None:
        """Set the masses of distinct global ``ids`` (finite, >= 0); ids owned elsewhere are ignored.

        Credits are kept across the change (as :meth:`StrideScheduler.mass_changed`); a sample whose
        offset would leave +-1024 keeps its exact credit aside and makes the next draw re-key.
        """
        ids, mass = np.asarray(ids, dtype=np.int64), np.asarray(mass, dtype=np.float64)
        if ids.shape != mass.shape:
            raise ValueError(f"ids and mass must have the same shape, got {ids.shape} and {mass.shape}")
        if mass.size and not (np.isfinite(mass).all() and mass.min() >= 0):
            raise ValueError("masses must be finite and >= 0")
        own = self.owns(ids)
        order = np.argsort(ids[own], kind="stable")  # shard totals add in id order: owner-independent
        ids, mass = ids[own][order], mass[own][order]
        if ids.size == 0:
            return
        local = ids - self.start
        old = self.masses[local]
        with np.errstate(over="ignore", invalid="ignore"):  # a huge new mass: held aside below
            delta = (self.rates(old) - self.rates(mass)) * self.clock + (old - mass) * self.drift1
            offsets = self.offsets[local] + delta
        fits = np.abs(offsets) <= _OFFSET_LIMIT
        if not fits.all():
            self._hold(ids[~fits], self._credits(self.offsets[local[~fits]], old[~fits]))
        self.offsets[local[fits]] = offsets[fits]
        self.masses[local] = mass
        self._add_to_shards(ids, mass - old, mass + old)
        self._stale.append(local)

    def rebuild(self, mass: np.ndarray) -> None:
        """Replace every owned mass (``mass``: length ``stop - start``) and re-key at the next draw.

        Collective by contract (it resets the replicated clocks; it communicates nothing).
        """
        mass = np.asarray(mass, dtype=np.float64)
        if mass.shape != self.masses.shape:
            raise ValueError(f"mass must have shape {self.masses.shape}, got {mass.shape}")
        if mass.size and not (np.isfinite(mass).all() and mass.min() >= 0):
            raise ValueError("masses must be finite and >= 0")
        self._fold()  # under the masses the credits accrued with
        self.masses[:] = mass
        for k in range(len(self.owned_shards)):
            self._sum_shard(k)
        self.needs_reference = True

    def _hold(self, ids: np.ndarray, credits: np.ndarray) -> None:
        fresh = ~np.isin(ids, self._held_ids)  # a sample held already keeps its first credit
        self._held_ids = np.concatenate([self._held_ids, ids[fresh]])
        self._held_credits = np.concatenate([self._held_credits, credits[fresh]])

    def _add_to_shards(self, ids: np.ndarray, change: np.ndarray, moved: np.ndarray) -> None:
        k = len(self.owned_shards)
        shard = self.shards.shard_of(ids) - self.owned_shards.start
        self.shard_totals += np.bincount(shard, weights=change, minlength=k)
        self.shard_moved += np.bincount(shard, weights=moved, minlength=k)
        # As LeafMasses: recompute a shard's sum where cancellation could have eaten its precision.
        for s in np.flatnonzero(self.shard_totals < self.shard_moved * _CANCEL_LIMIT):
            self._sum_shard(int(s))

    def _sum_shard(self, k: int) -> None:
        lo, hi = self.shards.shard_range(self.owned_shards.start + k)
        self.shard_totals[k] = float(np.sum(self.masses[lo - self.start : hi - self.start]))
        self.shard_moved[k] = 0.0

    # -- credits and keys (as StrideScheduler, on the owned range) --------------------------------------
    def credits_of(self, ids: np.ndarray) -> np.ndarray:
        """Exact credits ``E - D + theta`` of owned global ``ids`` after the last draw."""
        local = np.asarray(ids, dtype=np.int64) - self.start
        return self._credits(self.offsets[local], self.masses[local])

    def _fold(self) -> None:
        """Fold the clocks into the offsets (and the held credits in), as ``StrideScheduler.rekey``."""
        if self.clock or self.drift1 or self.drift2:
            for lo in range(0, self.masses.size, _CHUNK):
                m = self.masses[lo : lo + _CHUNK]
                self.offsets[lo : lo + _CHUNK] = self._credits(self.offsets[lo : lo + _CHUNK], m)
        self.clock = self.drift1 = self.drift2 = 0.0
        self.offsets[self._held_ids - self.start] = self._held_credits
        self._held_ids, self._held_credits = self._held_ids[:0], self._held_credits[:0]

    def _set_reference(self, total: float) -> None:
        self._predict_rates(total, self.global_batch, self.dataset_size)
        self.rekeys += 1
        self._rebuild_keys()

    def _rebuild_keys(self) -> None:
        self._stale = []
        if self._keys is not None:
            keys = self._keys.leaf_buffer()
            for lo in range(0, keys.size, _CHUNK):
                keys[lo : lo + _CHUNK] = self._keys_of(self.offsets[lo : lo + _CHUNK], self.masses[lo : lo + _CHUNK])
            self._keys.refresh()

    def _rekey(self, total: float) -> None:
        self._fold()
        self._set_reference(total)

    def _update_keys(self) -> None:
        if not self._stale or self._keys is None:
            self._stale = []
            return
        stale = _dedupe_sorted(np.sort(np.concatenate(self._stale), kind="stable"))
        self._stale = []
        records = self._records[stale]
        self._keys.set(stale, self._keys_of(records["offset"], records["mass"]))

    def _advance(self, size: int, total: float) -> None:
        u = self.uniform_mix
        if total > 0:
            tilted, floor = size * (1.0 - u) / total, size * u / self.dataset_size
            step = (size / self.global_batch) * ((1.0 - u) * self.ref_total / total + u)
        else:
            tilted, floor = 0.0, size / self.dataset_size
            step = size / self.global_batch
        self.clock += step
        self.drift1 += tilted - self.alpha * step
        self.drift2 += floor - self.beta * step

    # -- one global batch -------------------------------------------------------------------------------
    def draw(self, b: int, size: int, *, commit: bool = True) -> np.ndarray:
        """Global batch ``b`` of ``size`` ids (a collective): the same array on every rank.

        A pure function of the seed, ``b`` and the state (masses, credits, clocks), whatever the world
        size. The ``size`` largest copies of the ranks among the candidates (module docstring), in the
        order of the shuffle stream ``(seed, b)`` (the unsharded sampler's). ``commit=False`` (a stale
        replay, as the unsharded ``draw(commit=False)``) neither advances the clocks nor records the draws.
        """
        return self.draw_with_masses(b, size, commit=commit)[0]

    def draw_with_masses(self, b: int, size: int, *, commit: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`draw`, and the masses of the drawn ids (handed out by their owners in the same collective)."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self._update_keys()
        head = np.zeros(self._slots + 1)
        head[: self.shard_totals.size] = self.shard_totals
        head[-1] = float(self.needs_reference or self._held_ids.size > 0)
        rows = self._all_gather(np.concatenate([head, self._smallest_keys(size)]))
        total = self._total_of(rows[:, : self._slots])
        rekey = bool(rows[:, self._slots].max() > 0)
        if rekey:  # a rebuild (the unsharded end_rebuild) or an overflowing mass change
            self._rekey(total)
            self.needs_reference = False
        if self.needs_rekey(total):  # the total drifted (the unsharded keep_fresh)
            self._rekey(total)
            rekey = True
        self.total = total
        smallest = self._all_gather(self._smallest_keys(size)) if rekey else rows[:, self._slots + 1 :]
        kth = float(np.partition(smallest.ravel(), size - 1)[size - 1])  # inf: fewer than size finite keys
        if commit:
            self._advance(size, total)
        ids, values, mass = self._top_copies(max(self.clock, kth), size)
        gathered = self._all_gather(np.concatenate([values, ids.astype(np.float64), mass]))
        ids, counts, mass, low = self._merge(gathered, size)
        if commit:
            self._commit(ids, counts)
            self._defer(ids, low)
        out = np.repeat(ids, counts)
        np.random.default_rng([self.seed, b]).shuffle(out)  # ranks take slices: spread repeats over them
        return out, mass[np.searchsorted(ids, out)]

    def _all_gather(self, values: np.ndarray) -> np.ndarray:
        """Every rank's ``values`` (equal lengths), one row per rank."""
        mine = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
        rows = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(rows, mine, group=self.group)
        return torch.stack(rows).numpy()

    def _total_of(self, rows: np.ndarray) -> float:
        """The masses' total from every rank's shard totals, summed in shard order (world-independent)."""
        totals = np.concatenate(
            [rows[r, : len(self.shards.shards_of_rank(r, self.world_size))] for r in range(self.world_size)]
        )
        return float(np.sum(totals))

    def _smallest_keys(self, size: int) -> np.ndarray:
        """This rank's ``size`` smallest keys as float64, padded with inf."""
        out = np.full(size, np.inf)
        if self._keys is None:
            return out
        keys = self._keys.levels[0][self._keys.candidates(-math.inf, size)]
        keys = keys if keys.size <= size else np.partition(keys, size - 1)[:size]
        out[: keys.size] = keys
        return out

    def _top_copies(self, limit: float, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's ``size`` largest copies among keys ``<= limit``: (global ids, values, masses), padded
        (-1, -inf, 0)."""
        ids, values, masses = np.full(size, -1, dtype=np.int64), np.full(size, -np.inf), np.zeros(size)
        if self._keys is None:
            return ids, values, masses
        cand = self._keys.candidates(limit, 1)  # a superset of keys <= limit
        cand = cand[self._keys.levels[0][cand] <= limit]
        self._due = (cand[:0], np.empty(0), np.empty(0))
        if cand.size == 0:
            return ids, values, masses
        records = self._records[cand]
        glob = cand + self.start
        theta = phases(self.seed, glob, records["draws"])
        rank = self._credits(records["offset"], records["mass"]) - _RANK_PHASE_OFF * theta
        due = self._keys.levels[0][cand] <= self.clock  # the candidates a loss defers (:meth:`_defer`)
        self._due = (cand[due], rank[due], records["mass"][due])
        top_ids, top_values = _largest_copies(glob, rank, size)
        ids[: top_ids.size], values[: top_values.size] = top_ids, top_values
        masses[: top_ids.size] = self.masses[top_ids - self.start]
        return ids, values, masses

    @staticmethod
    def _merge(rows: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """The first ``size`` of every rank's copies (value descending, id ascending): sorted ids, counts,
        masses and the smallest value drawn (the level)."""
        values, ids = rows[:, :size].ravel(), rows[:, size : 2 * size].ravel().astype(np.int64)
        masses = rows[:, 2 * size :].ravel()
        valid = ids >= 0
        if np.count_nonzero(valid) < size:  # every rank sees the same rows: all raise together
            raise RuntimeError("balanced draws: no sample has a positive probability")
        values, ids, masses = values[valid], ids[valid], masses[valid]
        keep = np.lexsort((ids, -values))[:size]
        uniq, first, counts = np.unique(ids[keep], return_index=True, return_counts=True)
        return uniq, counts, masses[keep][first], float(values[keep].min())

    def _commit(self, ids: np.ndarray, counts: np.ndarray) -> None:
        """Record the owned draws: credits drop by the count, phases are replaced (as ``StrideScheduler.commit``)."""
        own = self.owns(ids)
        if not own.any():
            return
        glob, counts = ids[own], counts[own]
        local = glob - self.start
        records = self._records[local]
        before = records["draws"]
        after = before + counts.astype(np.uint32)
        change = counts + phases(self.seed, glob, before) - phases(self.seed, glob, after)
        records["offset"] = records["offset"] - change
        records["draws"] = after
        self._records[local] = records
        self._stale.append(local)

    def _defer(self, ids: np.ndarray, low: float) -> None:
        """Defer this rank's due candidates of the last draw that were not drawn (global ``ids`` were) until
        their rank reaches ``low``, the draw's level (as ``StrideScheduler.commit``)."""
        cand, rank, mass = self._due
        self._due = (cand[:0], np.empty(0), np.empty(0))
        if not self.defer or cand.size == 0:
            return
        lost = ~np.isin(cand + self.start, ids)
        if lost.any():
            self._keys.set(cand[lost], self._deferred_keys(low - rank[lost], mass[lost]))

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self, copy: bool = True) -> dict[str, Any]:
        """This rank's state: per-sample arrays over global ids ``[start, stop)``, per-shard arrays over
        ``[first_shard, stop_shard)``, the replicated scalars and the configuration. Plain numpy and Python
        values, copies unless ``copy=False`` (the live arrays, for a save that writes them at once);
        :func:`~irdro_sampler.sharded_balanced_state.merge_states` and
        :func:`~irdro_sampler.sharded_balanced_state.slice_state` re-cut them for another world size."""
        own = (lambda a: a.copy()) if copy else (lambda a: a)
        self._update_keys()  # as the next draw would: the saved keys are the ones it searches
        keys = self._keys.leaf_buffer() if self._keys is not None else np.empty(0, dtype=np.float32)
        return {
            **{name: getattr(self, name) for name in CONFIG_FIELDS},
            "start": self.start, "stop": self.stop,
            "first_shard": self.owned_shards.start, "stop_shard": self.owned_shards.stop,
            "masses": own(self.masses), "offsets": own(self.offsets), "draws": own(self.draws),
            "shard_totals": own(self.shard_totals), "shard_moved": own(self.shard_moved),
            "held_ids": own(self._held_ids), "held_credits": own(self._held_credits),
            **{name: getattr(self, name) for name in SCALAR_FIELDS},
            **({"keys": own(keys)} if self.defer else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a state (of any world size) covering this rank's ids; refused before any change
        if its configuration differs or it does not cover them (``ValueError`` naming the field)."""
        for name in CONFIG_FIELDS:
            mine = getattr(self, name)
            if state.get(name) != mine:
                raise ValueError(f"state['{name}'] is {state.get(name)!r}, this sampler has {mine!r}")
        part = slice_state(state, self.shards, self.rank, self.world_size)
        self.masses[:] = part["masses"]
        self.offsets[:] = part["offsets"]
        self.draws[:] = part["draws"]
        self.shard_totals[:], self.shard_moved[:] = part["shard_totals"], part["shard_moved"]
        self._held_ids, self._held_credits = part["held_ids"].copy(), part["held_credits"].copy()
        for name in ("clock", "drift1", "drift2", "alpha", "beta", "ref_total"):
            setattr(self, name, float(part[name]))
        self.rekeys, self.needs_reference = int(part["rekeys"]), bool(part["needs_reference"])
        # Deferred keys are not a function of the records: saved. A state saved before deferral has none
        # and keeps drawing without it (as it did).
        self.defer = part.get("keys") is not None
        if self.defer and self._keys is not None:
            self._stale = []
            self._keys.leaf_buffer()[:] = part["keys"]
            self._keys.refresh()
        elif not self.defer:
            self._rebuild_keys()  # from the restored records and reference scalars


def _largest_copies(ids: np.ndarray, rank: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` largest copies ``rank_i - j`` (j = 0, 1, ...) of candidates ``ids`` (sorted), in the
    order (value descending, id ascending): (ids, values). As ``StrideScheduler.select``: the level is
    the ``size``-th largest rank, lowered by whole draws until it holds ``size`` copies."""
    k = min(size, ids.size)
    level = float(np.partition(rank, ids.size - k)[ids.size - k])
    counts = _copies(rank, level)
    while counts.sum() < size:
        level -= 1.0
        counts = _copies(rank, level)
    pos = np.repeat(np.arange(ids.size), counts)
    j = np.arange(pos.size) - np.repeat(np.cumsum(counts) - counts, counts)
    value = rank[pos] - j
    keep = np.lexsort((ids[pos], -value))[:size]
    return ids[pos[keep]], value[keep]
