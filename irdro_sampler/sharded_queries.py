"""Queries of a :class:`~irdro_sampler.sharded_sampler.ShardedIRDROSampler`: draw probabilities, importance
weights and diagnostics, computed from the ranks' rows through small collectives.

The unsharded :class:`~irdro_sampler.IRDROSampler` answers these from its whole table; here every rank
holds the rows of its ids only, so each answer is a collective (every rank of the group calls it, in
the same order) that moves O(S + ids asked) numbers (S virtual shards) or O(1), never O(N):

* :func:`point_probabilities`: ``p_i`` of any ids under the current distribution. The ids asked by
  all ranks are all-gathered, each owner fills in their masses, and one max-reduction hands every rank
  every mass together with the shard totals.
* :func:`local_probabilities`: ``p_i`` of this rank's ids ``[start, stop)`` (O(N / world) memory).
* :func:`stats`: the keys of :meth:`IRDROSampler.stats` from reduced per-rank sums.

Before the first draw the rule is fitted afresh (:func:`~irdro_sampler.distributed_fit.fit_sharded`, a
collective) and the masses' total is summed from the table, as the unsharded sampler does then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._validation import as_indices, batch_losses
from .distributed_fit import fit_sharded, max_over_ranks
from .screening import screen_table_rows
from .weights import WeightParams, mixture_probabilities

_CHUNK = 1 << 22  # rows per pass of the O(N / world) loops: bounded temporaries


def current_params(sampler: Any) -> WeightParams:
    """The parameters in force, or (before the first draw) a fresh global fit: then a collective."""
    if sampler.params is not None:
        return sampler.params
    return fit_sharded(sampler.rule, sampler.table, sampler.start, sampler.dataset_size, sampler.group)


def _local_shard_totals(sampler: Any, params: WeightParams) -> np.ndarray:
    """This rank's length-S vector of shard totals (0 elsewhere): the scheme's, or before the first
    draw summed from the table under ``params`` (O(N / world))."""
    if sampler.params is not None:
        return sampler.scheme.totals()
    out = np.zeros(sampler.shards.num_shards, dtype=np.float64)
    for s in sampler.shards.shards_of_rank(sampler.rank, sampler.world):
        a, z = sampler.shards.shard_range(s)
        out[s] = float(_masses(sampler, a, z, params).sum())
    return out


def _masses(sampler: Any, a: int, z: int, params: WeightParams) -> np.ndarray:
    """The masses of owned ids ``[a, z)`` under ``params`` (from the table)."""
    return sampler.rule.masses_at(sampler.table, slice(a - sampler.start, z - sampler.start), params)[0]


def _total(reduced_totals: np.ndarray) -> float:
    """The global mass in shard order, as :func:`~irdro_sampler.sharded_draws.draw_global_batch` sums it."""
    return float(np.cumsum(reduced_totals)[-1]) if reduced_totals.size else 0.0


def _gather_ids(indices: Any, n: int, group: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """``(this rank's ids, the ids of all ranks in rank order, this rank's offset in them)``.

    Bad ``indices`` on any rank raise ``ValueError`` on every rank (the check is part of the first
    collective, so no rank is left waiting)."""
    error = ""
    try:
        idx = as_indices(indices, n)
    except (TypeError, ValueError) as e:
        idx, error = np.zeros(0, dtype=np.int64), f"{type(e).__name__}: {e}"
    counts = _checked_counts(idx.size, error, group, "importance_weights", "indices")
    return idx, _all_gather_parts(idx, counts, group, torch.int64), sum(counts[: dist.get_rank(group)])


def _checked_counts(count: int, error: str, group: Any, query: str, what: str) -> list[int]:
    """How many ids each rank asks about (one all-gather, which also carries whether a rank's input was bad:
    then every rank raises, ``error`` on the rank that found it)."""
    world = dist.get_world_size(group)
    sizes = [torch.zeros(2, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([count, int(bool(error))], dtype=torch.int64), group=group)
    bad = [r for r in range(world) if int(sizes[r][1])]
    if bad:
        raise ValueError(error or f"{query}: rank {bad[0]} passed bad {what} (nothing was computed)")
    return [int(s[0]) for s in sizes]


def _all_gather_parts(values: np.ndarray, counts: list[int], group: Any, dtype: torch.dtype) -> np.ndarray:
    """Every rank's ``values`` (``counts[r]`` on rank ``r``) concatenated in rank order: one all-gather."""
    most = max(counts)
    if most == 0:
        return np.zeros(0, dtype=values.dtype)
    padded = torch.zeros(most, dtype=dtype)
    padded[: values.size] = torch.from_numpy(values)
    parts = [torch.empty(most, dtype=dtype) for _ in range(len(counts))]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).numpy()


def point_probabilities(sampler: Any, indices: Any) -> np.ndarray:
    """``p_i`` of ``indices`` (this rank's; any ids, any length per rank) under the current distribution.

    A collective: two all-gathers (sizes, then the ids of all ranks) and one max-reduction of
    ``ids of all ranks + S`` float64 (every owner's masses, non-negative and 0 elsewhere, and the shard
    totals); before the first draw also the fresh fit's collectives."""
    params = current_params(sampler)
    idx, every, offset = _gather_ids(indices, sampler.dataset_size, sampler.group)
    packed = np.zeros(every.size + sampler.shards.num_shards, dtype=np.float64)
    own = np.flatnonzero((every >= sampler.start) & (every < sampler.stop))
    packed[own] = sampler.rule.masses_at(sampler.table, every[own] - sampler.start, params)[0]
    packed[every.size :] = _local_shard_totals(sampler, params)
    out = max_over_ranks(packed, sampler.group)
    mass = out[offset : offset + idx.size]
    return mixture_probabilities(mass, _total(out[every.size :]), sampler.dataset_size, sampler.rule.uniform_mix)


def screen(sampler: Any, indices: Any, losses: Any, block_only: bool = False) -> np.ndarray:
    """:meth:`IRDROSampler.screen <irdro_sampler.IRDROSampler.screen>` over the ranks' rows: which of this rank's
    samples to learn from (``False`` for a first visit whose loss the cut of the last refit would take).

    A collective once the sampler has refitted: two all-gathers (sizes, then every rank's ids and losses packed as
    float64 pairs: ids below 2**53 are exact) and one max-reduction (each owner judges the ids it holds). Before
    the first refit nothing is screened and only the sizes are exchanged (every rank alike: the params are
    replicated). Bad input on any rank raises on every rank. Read-only."""
    error = ""
    try:
        idx, val = batch_losses(indices, losses, sampler.dataset_size)
    except (TypeError, ValueError) as e:
        idx, val, error = np.zeros(0, dtype=np.int64), np.zeros(0), f"{type(e).__name__}: {e}"
    counts = _checked_counts(idx.size, error, sampler.group, "screen", "indices or losses")
    if sampler.params is None or sum(counts) == 0:  # the same on every rank: all return here, or none
        return np.ones(idx.size, dtype=bool)
    pairs = np.empty(2 * idx.size, dtype=np.float64)
    pairs[0::2], pairs[1::2] = idx, val
    every_pairs = _all_gather_parts(pairs, [2 * c for c in counts], sampler.group, torch.float64)
    every, every_loss = every_pairs[0::2].astype(np.int64), every_pairs[1::2]
    offset = sum(counts[: dist.get_rank(sampler.group)])
    screened = np.zeros(every.size, dtype=np.float64)
    own = np.flatnonzero((every >= sampler.start) & (every < sampler.stop))
    screened[own] = ~screen_table_rows(sampler.table, every[own] - sampler.start, every_loss[own], sampler.params,
                                       block_only)
    out = max_over_ranks(screened, sampler.group)
    return out[offset : offset + idx.size] == 0.0


def importance_weights(sampler: Any, indices: Any, step: int | None) -> np.ndarray:
    """``1 / (N p_i)``: with ``step`` buffered, ``p_i`` as drawn (local); otherwise :func:`point_probabilities`.

    Whether ``step`` is buffered is the same on every rank (the buffer follows the replicated draws and
    :meth:`update` calls), so every rank takes the same path. With ``step`` buffered an id the batch did
    not draw is a ``ValueError`` (raised on that rank alone: no collective is involved)."""
    if step is not None and sampler.drawn.get(step) is not None:
        idx = as_indices(indices, sampler.dataset_size)
        p = sampler.drawn.probabilities_of(step, idx) if idx.size else np.zeros(0)
        if p is None:
            raise ValueError(f"importance_weights: some indices were not drawn in buffered batch {step}")
    else:
        p = point_probabilities(sampler, indices)
    with np.errstate(divide="ignore"):
        return 1.0 / (sampler.dataset_size * p)


def local_probabilities(sampler: Any) -> np.ndarray:
    """``p_i`` of this rank's ids ``[start, stop)`` (float64; over all ranks they sum to 1). A collective:
    one max-reduction of the S shard totals (and the fresh fit's before the first draw); O(N / world)."""
    params = current_params(sampler)
    total = _total(max_over_ranks(_local_shard_totals(sampler, params), sampler.group))
    u, n = sampler.rule.uniform_mix, sampler.dataset_size
    out = np.empty(sampler.stop - sampler.start)
    for a, z in _chunks(sampler):
        out[a - sampler.start : z - sampler.start] = mixture_probabilities(_masses(sampler, a, z, params), total, n, u)
    return out


def _chunks(sampler: Any) -> list[tuple[int, int]]:
    return [(a, min(a + _CHUNK, sampler.stop)) for a in range(sampler.start, sampler.stop, _CHUNK)]


def _over_rows(sampler: Any, params: WeightParams, each: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Sum of ``each(masses, kept)`` over this rank's rows, chunk by chunk."""
    acc = None
    for a, z in _chunks(sampler):
        mass, kept = sampler.rule.masses_at(sampler.table, slice(a - sampler.start, z - sampler.start), params)
        part = each(mass, kept)
        acc = part if acc is None else acc + part
    return acc


def stats(sampler: Any) -> dict[str, float]:
    """The keys of :meth:`IRDROSampler.stats` (see :func:`~irdro_sampler.diagnostics.weighting_diagnostics`),
    for the whole distribution, from reduced per-rank sums. A collective: a max-reduction of ``S + 1``
    numbers (shard totals, largest mass) and a sum-reduction of 8 (and the fresh fit's before the first
    draw); O(N / world) work in chunks. Sums are taken in another order than the unsharded sampler's,
    so values agree to rounding (relative ~1e-12), not bit for bit."""
    params = current_params(sampler)
    table = sampler.table
    first = _over_rows(sampler, params, lambda m, k: np.array([m.max(initial=0.0), np.count_nonzero(k)], float))
    first = np.zeros(2) if first is None else first  # a rank owns at least one shard, so never in practice
    reduced = max_over_ranks(np.concatenate([_local_shard_totals(sampler, params), first[:1]]), sampler.group)
    total, max_mass = _total(reduced[:-1]), float(reduced[-1])
    n, u = sampler.dataset_size, sampler.rule.uniform_mix

    def distribution_sums(mass: np.ndarray, kept: np.ndarray) -> np.ndarray:
        p = mixture_probabilities(mass, total, n, u)
        nz = p[p > 0]
        log_nz = np.log(nz)
        return np.array([np.dot(p, p), np.sum(nz * (log_nz + np.log(n))), -np.sum(nz * log_nz)])

    sums = _over_rows(sampler, params, distribution_sums)
    seen_sum = float(np.nansum(table.losses, dtype=np.float64))
    local = np.array([*sums, first[1], table.num_seen, seen_sum, sampler.remeasured_cut, sampler.readmitted])
    tensor = torch.from_numpy(local)
    dist.all_reduce(tensor, group=sampler.group)
    sum_p2, kl, entropy, kept, seen, loss_sum, remeasured, readmitted = tensor.numpy().tolist()
    max_prob = float(mixture_probabilities(np.array([max_mass]), total, n, u)[0])
    return {
        "ess_fraction": 1.0 / sum_p2 / n, "kl_to_uniform": kl, "entropy": entropy,
        "max_prob": max_prob, "max_prob_ratio": max_prob * n,
        "seen_fraction": seen / n, "truncated_fraction": 1.0 - kept / n,
        "temperature": params.temperature, "threshold": params.threshold, "prior": params.prior,
        "table_mean_loss": loss_sum / seen if seen else float("nan"),
        "pending_feedback": float(len(sampler.feedback.pending)),
        "rekeys": float(getattr(getattr(sampler.scheme, "draws", None), "rekeys", 0)),
        "last_drawn_batch": float(sampler.last_drawn),
        "late_feedback": float(sampler.feedback.late_feedback),
        "skipped_nonfinite": float(sampler.feedback.skipped_nonfinite),
        "stale_replays": float(sampler.drawn.stale_replays), "refreshes": float(sampler.refreshes),
        "rebases": float(sampler.rebases), "remeasured_cut": remeasured, "readmitted": readmitted,
    }  # fmt: skip
