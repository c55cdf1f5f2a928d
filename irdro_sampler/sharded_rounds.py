"""Rounds of weighted draws planned from weights sharded over ranks (the streaming path at scale).

Each rank of the process group holds the weights of its virtual shards only
(:class:`~irdro_sampler.virtual_shards.VirtualShards`: ids ``[start, stop)``) and, for balanced
draws, their carried-rounding carry. :func:`plan_sharded_round` returns the round's ``round_size``
sample ids (ascending, as streaming's ``resample_streams`` groups them by shard) and the probability
each was drawn with, identical on every rank. What a rank holds is O(N / world) (its weights and
carry) plus O(round_size) (the round); nothing of length N exists anywhere.

* ``"iid"``: Multinomial(round_size, shard totals) over the virtual shards from ``(seed, round)``, then
  inside each shard inverse-CDF draws from ``(seed, round, shard)``: exactly i.i.d. draws from ``p``.
* ``"balanced"``: carried rounding (:func:`~irdro_sampler.carried_rounding.balanced_counts`) with the
  floors' deficit handed out by a global top-k selection (ties to the lower id): the unsharded counts
  for the same ``p`` and carry whenever the residuals have no ties (always, in practice).

Both depend on the shards and never on the world size, so a run draws the same rounds on 1, 2 or 8
ranks. ``p`` is the weights divided by their total summed in shard order (:func:`shard_totals`), so
that the total, too, is the same on every world size. Collectives: one max-reduction of S + world
numbers, about 64 scalar sum-reductions for the balanced deficit (a bisection), one all-gather of the
round's ids and probabilities.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from .distributed import process_group_up
from .distributed_fit import _all_gather_rows, fit_sharded, max_over_ranks
from .loss_table import LossTable
from .virtual_shards import VirtualShards
from .weights import DROWeighting, masses, mixture_probabilities

__all__ = [
    "ROUND_DRAWS", "ShardedRound", "initial_carry_of_range", "max_over_ranks", "plan_sharded_round", "shard_totals",
    "sharded_probabilities", "world_and_rank",
]

ROUND_DRAWS = ("balanced", "iid")
_IID_TAG = 0x5A4D
_BAD_SHAPE, _NOT_FINITE, _NEGATIVE = 1.0, 2.0, 3.0
_WHAT = {_BAD_SHAPE: "wrong length", _NOT_FINITE: "NaN or inf entries", _NEGATIVE: "negative entries"}


class ShardedRound(NamedTuple):
    """One planned round: the same ``ids`` and ``probabilities`` on every rank, this rank's ``carry``."""

    ids: np.ndarray  # int64, round_size sample ids, ascending
    probabilities: np.ndarray  # float64, p of each id in the round's distribution
    carry: np.ndarray | None  # balanced draws: this rank's carry after the round (None for i.i.d.)


def initial_carry_of_range(seed: int, start: int, stop: int) -> np.ndarray:
    """``initial_carry(N, seed)[start:stop]`` without the other ids' phases (the generator is advanced)."""
    rng = np.random.default_rng([int(seed), 0xBA1A])
    rng.bit_generator.advance(int(start))  # one 64-bit output per double
    return rng.random(int(stop) - int(start))


def _rows(local: np.ndarray, shards: VirtualShards, rank: int, world: int) -> np.ndarray:
    """This rank's values as one row per owned shard (zero-padded to the shard size)."""
    owned = shards.shards_of_rank(rank, world)
    size = shards.shard_size
    if local.size == len(owned) * size:
        return local.reshape(len(owned), size)
    rows = np.zeros((len(owned), size))
    rows.reshape(-1)[: local.size] = local
    return rows


def shard_totals(local: np.ndarray, shards: VirtualShards, rank: int, world: int) -> np.ndarray:
    """This rank's shard sums placed in a vector of all S shards (0 elsewhere). Each sum depends on its
    shard's values only, so the reduced vector is the same on every world size."""
    out = np.zeros(shards.num_shards)
    owned = shards.shards_of_rank(rank, world)
    out[owned.start : owned.stop] = _rows(local, shards, rank, world).sum(axis=1)
    return out


def _check_code(weights: np.ndarray, size: int) -> float:
    if weights.ndim != 1 or weights.shape[0] != size:
        return _BAD_SHAPE
    if not np.isfinite(weights).all():
        return _NOT_FINITE
    if (weights < 0).any():
        return _NEGATIVE
    return 0.0


def world_and_rank(group: Any = None) -> tuple[int, int]:
    """``(world size, rank)`` of ``group``, ``(1, 0)`` without a process group."""
    return (dist.get_world_size(group), dist.get_rank(group)) if process_group_up() else (1, 0)


def _sum_int(value: int, group: Any) -> int:
    t = torch.tensor([int(value)], dtype=torch.int64)
    if process_group_up():
        dist.all_reduce(t, group=group)
    return int(t.item())


def _gather(rows: np.ndarray, group: Any) -> np.ndarray:
    return _all_gather_rows(rows, group) if process_group_up() else np.asarray(rows)


def _global_totals(weights: Any, shards: VirtualShards, rank: int, world: int, group: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checked weights (float64) and the S shard totals; bad weights on any rank raise on every rank."""
    start, stop = shards.ids_of_rank(rank, world)
    w = np.asarray(weights.detach().cpu().numpy() if isinstance(weights, torch.Tensor) else weights)
    code = _check_code(w, stop - start) if np.issubdtype(w.dtype, np.number) else _BAD_SHAPE
    w = w.astype(np.float64, copy=False) if code == 0.0 else np.zeros(stop - start)  # read only: no copy
    flags = np.zeros(world)
    flags[rank] = code
    reduced = max_over_ranks(np.concatenate([shard_totals(w, shards, rank, world), flags]), group)
    totals, flags = reduced[: shards.num_shards], reduced[shards.num_shards :]
    bad = np.flatnonzero(flags)
    if bad.size:
        r = int(bad[0])
        mine = f" (this rank holds ids [{start}, {stop}), got shape {np.shape(weights)})" if r == rank else ""
        raise ValueError(f"weights: rank {r} passed {_WHAT[float(flags[r])]}{mine}; nothing was planned")
    if not totals.sum() > 0.0:
        raise ValueError("weights: all weights are zero on every rank; at least one sample needs a positive weight")
    return w, totals


def _sortable(key: np.ndarray) -> np.ndarray:
    """int64 keys ordered like the float64 ``key`` (IEEE bits, negatives flipped; no -0.0 in ``key``)."""
    bits = key.view(np.int64)
    return np.where(bits < 0, bits ^ np.int64(0x7FFFFFFFFFFFFFFF), bits)


def _float_of(sortable: int) -> float:
    """The float64 whose :func:`_sortable` key is ``sortable``."""
    bits = np.array([sortable], dtype=np.int64)
    bits = np.where(bits < 0, bits ^ np.int64(0x7FFFFFFFFFFFFFFF), bits)
    return float(bits.view(np.float64)[0])


def _top_k(key: np.ndarray, k: int, group: Any, rank: int, world: int) -> np.ndarray:
    """Mask of this rank's entries among the ``k`` largest keys over all ranks (ties: lower id first;
    ranks hold ascending id ranges). ``key`` (float64, no NaN) is modified: -0.0 becomes 0.0.

    A bisection on the keys' bits, counting on this rank's candidates only: the global top k lies in the
    union of the ranks' local top k, and a rank with more than k keys above a bound counts k, still >= k,
    so each count decides as the full one would. Full-length work: one partition and two comparisons.
    """
    key += 0.0  # -0.0 -> 0.0: the bit order below must agree with float comparison
    top = key if key.size <= k else np.partition(key, key.size - k)[key.size - k :]
    cand = np.sort(_sortable(np.ascontiguousarray(top)))
    lo, hi = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)
    while lo < hi:  # the largest t with count(key >= t) >= k
        mid = (lo + hi + 1) // 2
        if _sum_int(cand.size - np.searchsorted(cand, mid, side="left"), group) >= k:
            lo = mid
        else:
            hi = mid - 1
    threshold = _float_of(lo)
    above = key > threshold
    ties = np.flatnonzero(key == threshold)
    counts = np.zeros(world)
    counts[rank] = ties.size
    before = int(max_over_ranks(counts, group)[:rank].sum())  # ties held by lower ranks (lower ids)
    need = k - _sum_int(int(np.count_nonzero(above)), group)
    above[ties[: max(0, min(ties.size, need - before))]] = True
    return above


def _balanced_counts(p: np.ndarray, carry: np.ndarray, round_size: int, group: Any, rank: int, world: int):
    """:func:`~irdro_sampler.carried_rounding.balanced_counts` over the ranks' slices of ``p`` and ``carry``."""
    eligible = p > 0
    x = p * float(round_size)
    x += carry  # a sample of probability 0 keeps its carry
    fl = np.floor(x)
    np.maximum(fl, 0.0, out=fl)
    fl[~eligible] = 0.0
    counts = fl.astype(np.int64)
    del fl
    x -= counts
    deficit = int(round_size) - _sum_int(int(counts.sum()), group)
    while deficit > 0:
        k = min(deficit, _sum_int(int(np.count_nonzero(eligible)), group))
        pick = _top_k(np.where(eligible, x, -np.inf), k, group, rank, world)
        counts[pick] += 1
        x[pick] -= 1.0
        deficit -= k
    while deficit < 0:
        drawn = counts > 0
        k = min(-deficit, _sum_int(int(np.count_nonzero(drawn)), group))
        pick = _top_k(np.where(drawn, -x, -np.inf), k, group, rank, world)
        counts[pick] -= 1
        x[pick] += 1.0
        deficit += k
    return counts, x


def _iid_ids(rows: np.ndarray, totals: np.ndarray, shards: VirtualShards, owned: range, *, seed: int,
             round_idx: int, round_size: int) -> np.ndarray:
    """I.i.d. draws: shard counts from the replicated totals, then each owned shard's draws from its
    own generator (so they do not depend on which rank owns the shard)."""
    shard_counts = np.random.default_rng([seed, round_idx, _IID_TAG]).multinomial(round_size, totals / totals.sum())
    out = []
    for row, s in enumerate(owned):
        c = int(shard_counts[s])
        if not c:
            continue
        cdf = np.cumsum(rows[row])
        u = np.random.default_rng([seed, round_idx, _IID_TAG, s]).random(c) * cdf[-1]
        u = np.minimum(u, np.nextafter(cdf[-1], -np.inf))  # strictly inside: never a sample of weight 0
        u.sort()
        out.append(np.searchsorted(cdf, u, side="right") + shards.shard_range(s)[0])
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def plan_sharded_round(
    draws: str, weights: Any, shards: VirtualShards, *, seed: int, round_idx: int, round_size: int,
    carry: np.ndarray | None = None, group: Any = None,
) -> ShardedRound:
    """Plan round ``round_idx`` of ``round_size`` draws from the ranks' sharded ``weights``.

    ``weights``: this rank's non-negative finite weights of ids ``shards.ids_of_rank(rank, world)``
    (any scale: normalized by the total over all ranks). ``carry``: this rank's balanced-draws carry
    at the round's start (default: the seeded initial phases, :func:`initial_carry_of_range`).
    A collective over ``group``: bad weights on any rank raise ``ValueError`` on every rank, naming the
    rank, and nothing is planned.
    """
    if draws not in ROUND_DRAWS:
        raise ValueError(f"draws: expected one of {ROUND_DRAWS}, got {draws!r}")
    world, rank = world_and_rank(group)
    start, stop = shards.ids_of_rank(rank, world)
    w, totals = _global_totals(weights, shards, rank, world, group)
    total = float(totals.sum())
    p = w / total
    if draws == "iid":
        ids = _iid_ids(_rows(w, shards, rank, world), totals, shards, shards.shards_of_rank(rank, world),
                       seed=int(seed), round_idx=int(round_idx), round_size=int(round_size))
        next_carry = None
    else:
        if carry is None:
            carry = initial_carry_of_range(seed, start, stop)
        counts, next_carry = _balanced_counts(p, np.asarray(carry, np.float64), round_size, group, rank, world)
        drawn = np.flatnonzero(counts)  # O(round) from here on
        ids = np.repeat(drawn + start, counts[drawn])
    local_p = p[ids - start]
    return ShardedRound(_gather(ids, group), _gather(local_p, group), next_carry)



def sharded_probabilities(rule: DROWeighting, table: LossTable, shards: VirtualShards, group: Any = None) -> np.ndarray:
    """``rule.probabilities`` of the whole data set, for this rank's ids only (float64; over all ranks they
    sum to 1), from ``table``: the running losses of this rank's ids ``shards.ids_of_rank(rank, world)``.

    The rule is fitted over all ranks (:func:`~irdro_sampler.distributed_fit.fit_sharded`: the unsharded
    fit bit for bit) and the masses' total summed in shard order, so the result does not depend on the
    world size. A collective; what each rank passes to ``ShardedWeightedStreamingDataset.set_weights``.
    """
    world, rank = world_and_rank(group)
    start, stop = shards.ids_of_rank(rank, world)
    if table.dataset_size != stop - start:
        raise ValueError(f"table: holds {table.dataset_size} rows; rank {rank} of {world} owns ids [{start}, {stop})")
    params = fit_sharded(rule, table, start, shards.dataset_size, group) if process_group_up() else rule.fit(table)
    mass = masses(table.losses, params, table.groups, first=table.first_losses)[0]
    total = float(max_over_ranks(shard_totals(mass, shards, rank, world), group).sum())
    return mixture_probabilities(mass, total, shards.dataset_size, rule.uniform_mix)
