"""A probe for issue 18's clean-data targets: cut and tilt only where the losses show evidence of noise.

Not a rule of the library (a benchmark arm, as ``threshold_bound.py`` is): :class:`EvidenceGatedRule` is the
defaults' rule, except that at a refit whose seen losses show no evidence of noise it neither cuts nor tilts (the
draws are uniform but for the prior of unseen samples). Evidence is a block of unlearnable samples (the tight, far
high mode of ``"zscore-mode"``) or an upper tail heavier than a log-normal bulk predicts (the ``"tail-normal"``
test, over all seen samples). The squared errors of a clean regression, normal or Student-t, pass that test; a
clean classifier's cross-entropy does not (its long tail is evidence to the test), so classifiers keep the
defaults. On the task suite the defaults without groups cut 16-18% of the clean regressions, and the tilt alone
harms them (RESULTS_suite_parts.md): this arm asks whether doing nothing there costs the noisy configurations.
The suite's arms ``evidence`` / ``evidence-nogroups`` run it (``tasks.run_arm`` with the option
``evidence_gate``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from irdro_sampler import DROWeighting, IRDROSampler, WeightParams
from irdro_sampler.cut_rules import LossSummary, _excess_tail, _unlearnable_block

#: The temperature of "no tilt": exp(l / tau) is 1 to double precision for any loss a table holds.
FLAT = 1e300


@dataclass(frozen=True)
class EvidenceGatedRule(DROWeighting):
    """The defaults' rule, flat (no cut, no tilt) at a refit without evidence of noise (module docstring)."""

    def fit_calibration(self, losses: np.ndarray, groups: np.ndarray | None, *, num_groups: int, prior,
                        first: np.ndarray | None = None) -> WeightParams:
        params = super().fit_calibration(losses, groups, num_groups=num_groups, prior=prior, first=first)
        seen = losses[~np.isnan(losses)].astype(np.float64)
        if seen.size < 8 or _evidence(seen, float(self.truncate_zscore)):
            return params
        flat_groups = None if params.group_threshold is None else np.full_like(params.group_threshold, math.inf)
        return params._replace(temperature=FLAT, threshold=math.inf, group_threshold=flat_groups, group_split=None,
                               cap=None, group_cap=None)


def _evidence(seen: np.ndarray, z: float) -> bool:
    summary = LossSummary(seen)
    return _unlearnable_block(summary, z) is not None or _excess_tail(seen)


def with_evidence_gate(sampler: IRDROSampler) -> None:
    """Swap ``sampler``'s rule (before its first draw) for :class:`EvidenceGatedRule` with the same options."""
    options = {f.name: getattr(sampler.rule, f.name) for f in fields(sampler.rule)}
    rule = EvidenceGatedRule(**options)
    sampler._assemble(sampler.table, rule, sampler.draw_scheme, sampler.feedback_delay, sampler.refresh_interval)
