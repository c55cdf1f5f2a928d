"""How strongly to tilt when the samples have groups: by the share of the loss spread the groups explain.

The tilt moves probability toward high-loss samples. With groups (e.g. class labels) it helps where a
group is under-served, its losses high as a whole (a rare class the model has not learned), and it harms
where the high losses sit inside every group (symmetric label flips the cut cannot see: the tilt then
chases them). :func:`group_explained_share` measures which case holds, the share of the losses' variance
between group means, corrected for the share that groups of random labels would explain by chance
(epsilon squared); :func:`tilt_factor` turns it into the share of the tilt's strength to keep, in proportion below a
saturation share.
``DROWeighting(group_tilt_share=...)`` applies both at every refresh (issue 18; measured in
benchmarks/RESULTS_suite_group_tilt.md).
"""

from __future__ import annotations

import numpy as np

# The default saturation share (``DROWeighting(group_tilt_share=)``): 1.0, so the tilt's strength is the share
# of the losses' variance the groups explain. On the quality benchmark's digits with rare classes the groups
# explain 0.6-0.7 (a slightly milder tilt there); on the task suite's Gaussian mixtures with flipped labels
# 0.01-0.2. Chosen on the suite over 0.25 and 0.5: the only one that harms no labelled configuration, with
# the same or larger mean gains (benchmarks/RESULTS_suite_group_tilt.md).
DEFAULT_GROUP_TILT_SHARE = 1.0


def group_explained_share(losses: np.ndarray, groups: np.ndarray, num_groups: int) -> float | None:
    """Epsilon squared of ``losses`` by ``groups``: ``(SS_between - (G - 1) MS_within) / SS_total`` in
    [0, 1], where G is the number of groups present. None when it says nothing: fewer than two groups
    present, no more samples than groups, or all losses equal.

    Random groups give about 0 (eta squared would give ``(G - 1) / (n - 1)``): a 50-class task with 200
    samples seen is not taken for one whose classes differ.
    """
    x = np.asarray(losses, dtype=np.float64)
    g = np.asarray(groups)
    counts = np.bincount(g, minlength=num_groups).astype(np.float64)
    present = int(np.count_nonzero(counts))
    n = x.size
    if present < 2 or n <= present:
        return None
    mean = float(x.mean())
    ss_total = float(np.square(x - mean).sum())
    if not ss_total > 0.0:
        return None
    sums = np.bincount(g, weights=x, minlength=num_groups)
    nz = counts > 0
    ss_between = float((np.square(sums[nz] / counts[nz] - mean) * counts[nz]).sum())
    ss_within = max(ss_total - ss_between, 0.0)  # rounding can take the difference below 0
    share = (ss_between - (present - 1) * ss_within / (n - present)) / ss_total
    return min(max(share, 0.0), 1.0)


def tilt_factor(share: float | None, full_at: float | None) -> float:
    """How much of the tilt's strength to keep: ``share / full_at`` capped at 1; 1 when either is None
    (no groups, no evidence either way, or the adaptation switched off)."""
    if share is None or full_at is None:
        return 1.0
    return min(1.0, share / full_at)
