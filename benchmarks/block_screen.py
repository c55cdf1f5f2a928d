"""A probe, not a rule: a first-visit screen that leaves out only first visits inside a block of unlearnable samples.

``IRDROSampler.screen`` leaves out every first visit above its group's cut; inside a group with a learnable
minority the model has not learned yet, that keeps the minority from the step after which its loss would fall
(RESULTS_suite_group_z.md, ``benchmarks/screen_subgroup.py``). The byte LMs' gain from the screen comes from
random documents, which form a block: a tight, far high mode of the seen losses, the test ``cut_rule="zscore-mode"``
already makes (:func:`irdro_sampler.cut_rules.unlearnable_block_valley`). This screen leaves out a first visit
only above that valley, fitted on the seen losses at each refit (pooled, groups or not); without a block it
screens nothing. Run as the task suite's ``screen-block`` arms (``screen_first="block"``).
"""

from __future__ import annotations

import math

import numpy as np

from irdro_sampler.cut_rules import unlearnable_block_valley


class BlockScreen:
    """Per run: the valley of the last refit's seen losses, recomputed when the sampler refits."""

    def __init__(self) -> None:
        self._params = None
        self.valley = math.inf

    def keep(self, sampler, indices, losses) -> np.ndarray:
        params = sampler.order.weights.params
        if params is not self._params:  # a refit: the block is placed on the losses it saw
            self._params = params
            seen = sampler.table.losses[~np.isnan(sampler.table.losses)].astype(np.float64)
            self.valley = unlearnable_block_valley(seen) if params is not None else math.inf
        idx = np.asarray(indices, dtype=np.int64)
        first = np.isnan(sampler.table.losses[idx])
        value = np.asarray(losses, dtype=np.float64)
        return ~(first & np.isfinite(value) & (value > self.valley))
