"""How strongly to tilt when the cut finds much noise (``DROWeighting(tilt_fade_cut=...)``, issue 18).

The cut removes the samples whose running loss is far above the bulk's. Its recall of wrong labels is
rarely complete: on the task suite's noisy classifiers it removes 0.1-0.2 of the samples and finds 0.3-0.95
of the flipped ones (benchmarks/RESULTS_noise_signal.md). The flipped labels it misses sit just below its
threshold, which is where the tilt puts the most weight. So where the cut removes a large share, the tilt's
strength is scaled down in proportion; on clean data (the cut removes about nothing) it is unchanged.
"""

from __future__ import annotations

import numpy as np

#: The default ``tilt_fade_cut``: chosen on the task suite (benchmarks/RESULTS_suite_tilt_fade.md; with groups
#: harmed 0/29 as before and the median oracle share 0.20 -> 0.24; without groups harmed 2/42 -> 1/42) and
#: checked on the quality families (benchmarks/RESULTS_quality.md, the rows against ``irdro-nofade``).
DEFAULT_TILT_FADE_CUT = 0.2


def cut_fade_factor(seen: np.ndarray, kept: np.ndarray, fade_at: float, exempt: np.ndarray | None = None) -> float:
    """``max(0, 1 - c / fade_at)`` with ``c`` the share of the ``seen`` samples not ``kept`` (boolean masks
    over the calibration sample), not counting those ``exempt``; 1 when nothing was seen.

    ``exempt`` (``DROWeighting(tilt_fade_skip_block=True)``): the samples of a block of unlearnable ones
    (a tight, far high mode: random bytes in an LM's data). The cut takes such a block whole, so nothing
    of it waits below the threshold, and the tilt need not fade for it."""
    n_seen = int(np.count_nonzero(seen))
    if n_seen == 0:
        return 1.0
    cut = seen & ~kept
    if exempt is not None:
        cut &= ~exempt
    cut_share = int(np.count_nonzero(cut)) / n_seen
    return max(0.0, 1.0 - cut_share / fade_at)
