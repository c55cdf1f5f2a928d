"""How much of the clean-data oracle's gain can a cut that sees only the running loss keep, at best?

A diagnostic arm for the task suite (issue 18), not a rule a user could run: :class:`BestThresholdRule` is the
defaults' rule whose cut threshold (per group with groups, else one) is re-chosen at every refit **with the
noise labels**: the threshold on the running loss that misclassifies the fewest seen samples as noisy or clean
(the Bayes-optimal detector among all thresholds on that signal). It overrides only ``DROWeighting.fit_cut``,
so the tilt is calibrated on what it keeps as the defaults' is (ESS target, the groups' share, the fade with the
cut's share and its exemption of an unlearnable block). The suite's arms switch the gate on first losses off
(``cut_learned_ratio=None``): the threshold alone decides. Whatever this arm misses, no cut rule on the running
loss can reach (any rule places one threshold per group and refit); the suite's arms ``best-threshold`` /
``best-threshold-nogroups`` run it (``tasks.run_arm`` with the benchmark-only option ``cut_oracle``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from irdro_sampler import DROWeighting, IRDROSampler, WeightParams


def best_threshold(losses: np.ndarray, noisy: np.ndarray) -> float:
    """The threshold ``t`` (cut: loss > t) with the fewest errors (clean cut + noisy kept) over ``losses``;
    ``inf`` (cut nothing) when no threshold does better than cutting nothing."""
    if losses.size == 0 or not noisy.any():
        return math.inf
    order = np.argsort(-losses, kind="stable")
    ranked = noisy[order]
    tp = np.cumsum(ranked)  # noisy among the top k
    k = np.arange(1, losses.size + 1)
    errors = (k - tp) + (ranked.sum() - tp)  # clean cut + noisy kept, cutting the top k
    best = int(np.argmin(errors))
    if errors[best] >= ranked.sum():  # cutting nothing errs on every noisy sample
        return math.inf
    top = losses[order]
    return float(0.5 * (top[best] + top[best + 1])) if best + 1 < top.size else float(np.nextafter(top[best], -np.inf))


@dataclass(frozen=True)
class BestThresholdRule(DROWeighting):
    """The defaults' rule with the cut threshold chosen with the noise labels (see the module docstring). The
    labels are set with :meth:`with_noise` (not a field: they stay out of the rule's config)."""

    def with_noise(self, noisy: np.ndarray) -> BestThresholdRule:
        object.__setattr__(self, "noisy", np.asarray(noisy, dtype=bool))
        return self

    def fit_cut(self, view, seen, groups, *, num_groups, prior, summary=None):
        noisy = self.noisy
        if view.size != noisy.size:
            raise ValueError("BestThresholdRule needs the whole table as its calibration sample (stride 1)")
        if groups is None:
            return WeightParams(1.0, best_threshold(view[seen], noisy[seen]), prior, 0.0)
        cuts = np.full(num_groups, math.inf)
        for g in np.unique(groups[seen]):
            part = seen & (groups == g)
            cuts[g] = best_threshold(view[part], noisy[part])
        return WeightParams(1.0, math.inf, prior, 0.0, cuts)


def with_best_thresholds(sampler: IRDROSampler, noisy: np.ndarray) -> None:
    """Swap ``sampler``'s rule (before its first draw) for :class:`BestThresholdRule` with the same options."""
    options = {f.name: getattr(sampler.rule, f.name) for f in fields(sampler.rule)}  # config() drops options off
    rule = BestThresholdRule(**options).with_noise(noisy)
    sampler._assemble(sampler.table, rule, sampler.draw_scheme, sampler.feedback_delay, sampler.refresh_interval)
