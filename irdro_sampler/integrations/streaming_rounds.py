"""The sample ids of one streaming round: pure functions of (seed, round, frozen weights, carry).

A round of ``round_size`` draws is returned the way streaming's ``resample_streams`` returns an epoch:
``(shuffle_units, sample_ids)``, the ids grouped by shard (ascending within a shard) and the units the
sizes of the runs streaming's shuffle may move, each at most one shard long (as streaming splits an
upsampled shard). Two schemes, chosen by name (:data:`ROUND_PLANNERS`):

* ``"balanced"``: carried rounding (:func:`irdro_sampler.carried_rounding.balanced_counts`), a
  function of the weights and the carry at the round's start;
* ``"iid"``: two-stage i.i.d. draws (per-shard multinomial counts, then within-shard draws by
  inverting the CDF), a function of ``(seed, round_idx)`` and the weights.

Same inputs, bitwise the same plan on every node: no state, no shared memory, no streaming object.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from irdro_sampler.carried_rounding import balanced_counts

__all__ = ["ROUND_PLANNERS", "plan_round", "shard_units"]


def shard_units(shard_counts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Shuffle units: each shard's run, split like streaming's upsampling into pieces of at most one
    shard's size so that the shuffle can place them."""
    nz = np.flatnonzero(shard_counts)
    full, rem = np.divmod(shard_counts[nz], sizes[nz])
    pieces = full + (rem > 0)
    units = np.repeat(sizes[nz], pieces)
    last = np.cumsum(pieces) - 1
    units[last[rem > 0]] = rem[rem > 0]
    return units.astype(np.int64)


def _plan_carried(
    p: np.ndarray, carry: np.ndarray | None, seed: int, round_idx: int, round_size: int,
    offsets: np.ndarray, sizes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    counts = balanced_counts(carry, p, round_size)[0]
    ids = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    cum = np.concatenate([[0], np.cumsum(counts)])
    ends = offsets + sizes
    return shard_units(cum[ends] - cum[offsets], sizes), ids


def _plan_iid(
    p: np.ndarray, carry: np.ndarray | None, seed: int, round_idx: int, round_size: int,
    offsets: np.ndarray, sizes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    ends = offsets + sizes
    rng = np.random.default_rng([seed, int(round_idx), 0x1D20])
    # Stage 1: per-shard counts ~ Multinomial(round_size, shard masses). The masses are differences of
    # the cumulative sum used in stage 2, so a shard that gets draws always has a non-empty range.
    cdf = np.cumsum(p)
    lo = np.where(offsets > 0, cdf[np.maximum(offsets - 1, 0)], 0.0)
    hi = np.where(sizes > 0, cdf[np.maximum(ends - 1, 0)], lo)
    mass = np.maximum(hi - lo, 0.0)
    shard_counts = rng.multinomial(round_size, mass / mass.sum())
    # Stage 2: within each shard, i.i.d. draws proportional to p, by inverting the CDF: a draw of shard s
    # is u ~ U[C[start-1], C[end-1]) mapped to the sample whose interval [C[i-1], C[i]) holds it. O(N) for
    # the cumulative sum plus O(round_size log N), vectorized over all shards. A sample of probability 0
    # has an empty interval and is never drawn; `u` is kept below the shard's upper edge so a draw cannot
    # leave its shard.
    shard_of_draw = np.repeat(np.arange(len(sizes)), shard_counts)
    d_lo, d_hi = lo[shard_of_draw], hi[shard_of_draw]
    u = d_lo + (d_hi - d_lo) * rng.random(shard_of_draw.size)
    u = np.minimum(np.maximum(u, d_lo), np.nextafter(d_hi, -np.inf))
    # Sorting keeps every draw in its shard's range of u (the ranges are ordered like the shards) and
    # makes the binary searches cache-friendly; the ids come out grouped by shard, ascending.
    u.sort()
    ids = np.searchsorted(cdf, u, side="right").astype(np.int64)
    ids = np.clip(ids, offsets[shard_of_draw], ends[shard_of_draw] - 1)
    return shard_units(shard_counts, sizes), ids


#: Round planners by the dataset's ``draws`` name. Each takes (p, carry, seed, round_idx, round_size,
#: shard offsets, shard sizes) and returns (shuffle_units, sample_ids); i.i.d. draws ignore ``carry``.
ROUND_PLANNERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "balanced": _plan_carried,
    "iid": _plan_iid,
}


def plan_round(
    draws: str,
    p: np.ndarray,
    *,
    seed: int,
    round_idx: int,
    round_size: int,
    offsets: np.ndarray,
    sizes: np.ndarray,
    carry: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(shuffle_units, sample_ids)`` of one round of ``round_size`` draws from probabilities ``p``.

    ``offsets``/``sizes``: each shard's first global sample id and sample count (int64). ``carry``: the
    carried-rounding carry at the round's start (required for ``draws="balanced"``, unused for
    ``"iid"``). Deterministic in its arguments.
    """
    if draws == "balanced" and carry is None:
        raise ValueError("carry: required for draws='balanced'")
    planner = ROUND_PLANNERS[draws]
    return planner(p, carry, int(seed), round_idx, int(round_size), offsets, sizes)
