"""Carried rounding: weighted rounds whose counts track their expectation, like epochs do.

The streaming dataset's ``draws="balanced"`` scheme (one call per round). Not to be confused with the
map-style sampler's balanced draws (stride scheduling, ``stride.py``), a different algorithm.

Drawing a round of ``R`` samples i.i.d. from ``p`` gives sample ``i`` a Multinomial count with mean
``R p_i`` and variance ``~R p_i``: over a run some samples are never drawn and others many times. With
uniform weights a plain epoch (a permutation) has no such noise, and on the quality benchmark the
i.i.d. draws alone cost held-out loss (RESULTS_quality.md). Balanced counts keep, for every sample, a
carried residual ``carry_i`` (its expected draws not yet drawn, plus a random phase in [0, 1)):

    x_i = carry_i + R p_i;   count_i = floor(x_i), then +-1 on the samples nearest to the next integer
    until sum(count) = R;    carry_i <- x_i - count_i

so every sample's cumulative count stays within about one draw of its cumulative expectation
``phase_i + R * sum_r p_i(r)``, whatever the weights do between rounds. With uniform weights and
``N / R`` an integer, each sample is drawn exactly once every ``N / R`` rounds: an epoch without
replacement, at a random round. Over the random phase, round 0's expected counts are ``R p_i`` (the same
first-order statistics as i.i.d. draws, with far lower variance). A sample of probability 0 is never
drawn and keeps its carry.

Pure numpy and deterministic: the same (carry, p, R) gives bitwise the same counts on every rank, whatever
its CPU (ties are broken by index, not by the selection algorithm numpy picks for the CPU).
"""

from __future__ import annotations

import numpy as np

__all__ = ["balanced_counts", "initial_carry"]


def initial_carry(num_samples: int, seed: int) -> np.ndarray:
    """The random phases that start the carry: U[0, 1) per sample, a pure function of ``seed``."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    return np.random.default_rng([int(seed), 0xBA1A]).random(int(num_samples))


def _largest(key: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest keys, ties broken by the lower index.

    Not ``argpartition``: which of several equal keys it returns depends on the selection algorithm
    numpy dispatches by CPU (AVX-512 machines use another), and the plan must be the same on every node.
    The k-th largest *value* is the same whatever the algorithm, so select by value.
    """
    if k >= key.size:
        return np.arange(key.size)
    kth = np.partition(key, key.size - k)[key.size - k]
    above = np.flatnonzero(key > kth)
    return np.concatenate([above, np.flatnonzero(key == kth)[: k - above.size]])


def balanced_counts(carry: np.ndarray, probabilities: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts (int64, summing to ``total``) for one round, and the carry for the next round.

    ``carry`` and ``probabilities`` are float64 vectors of equal length (``probabilities`` >= 0 with a
    positive sum; they are used as given, not renormalized). Neither input is modified. O(N).
    """
    carry = np.asarray(carry, np.float64)
    p = np.asarray(probabilities, np.float64)
    if carry.shape != p.shape or p.ndim != 1:
        raise ValueError(f"carry and probabilities: expected equal 1-D shapes, got {carry.shape} and {p.shape}")
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 0:
        raise ValueError(f"total: expected a non-negative int, got {total!r}")
    eligible = p > 0
    all_eligible = bool(eligible.all())
    if total and not eligible.any():
        raise ValueError("probabilities: no sample has a positive probability")
    # In place where possible: at N = 1e8 every temporary costs a gigabyte of fresh pages.
    x = p * float(total)
    x += carry  # a sample of probability 0 keeps its carry
    fl = np.floor(x)
    np.maximum(fl, 0.0, out=fl)
    if not all_eligible:
        fl[~eligible] = 0.0
    counts = fl.astype(np.int64)
    del fl
    x -= counts  # the residuals: the next round's carry
    deficit = int(total) - int(counts.sum())
    # The floors miss or exceed `total` by about sqrt(total): hand the difference to the samples whose
    # residual is nearest the next draw (or take it from those that just passed one). Usually one pass.
    while deficit > 0:
        key = x if all_eligible else np.where(eligible, x, -np.inf)
        k = min(deficit, int(np.count_nonzero(eligible)))
        pick = _largest(key, k)
        counts[pick] += 1
        x[pick] -= 1.0
        deficit -= k
    while deficit < 0:
        drawn = counts > 0
        key = np.where(drawn, x, np.inf)
        k = min(-deficit, int(np.count_nonzero(drawn)))
        pick = _largest(-key, k)
        counts[pick] -= 1
        x[pick] += 1.0
        deficit += k
    return counts, x
