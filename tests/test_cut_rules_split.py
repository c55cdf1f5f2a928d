"""``cut_rule="zscore-mode-split"`` (opt-in, issue 18): a second cut where two modes of the log-losses cross
(:func:`loss_split`: Otsu's separability as the evidence, the minimum-error threshold as the place), over all
samples and, with groups, never below a group's 0.7 quantile. Rates measured over seeded draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_cut_rules import _clean

from irdro_sampler.cut_rules import SPLIT_GROUP_QUANTILE, cut_threshold, group_cut_thresholds, loss_split
from irdro_sampler.weights import DROWeighting

RULE = "zscore-mode-split"


@pytest.mark.parametrize("kind", ["gamma", "t3sq"])
def test_unimodal_squared_errors_are_not_split(kind: str) -> None:
    # Measured over 200 seeds at n = 300, 1000 and 5000: never.
    for n in (300, 1000):
        assert not any(math.isfinite(loss_split(_clean(kind, n, np.random.default_rng(s)))) for s in range(60))
    for x in (np.random.default_rng(1).chisquare(1, 2000), np.random.default_rng(2).lognormal(0, 1, 2000),
              np.random.default_rng(3).exponential(1, 2000)):
        assert loss_split(x) == math.inf


def test_a_clean_classifiers_misclassified_samples_are_split_off_now_and_then() -> None:
    """A clean classifier's cross-entropy has a second mode, the misclassified samples (loss above log 2): the
    split finds it on 8% of draws at n = 1000 (200 seeds) and then cuts 5% (the smallest side it allows), all
    above log 2. This is the rule's price on clean data; the learned gate spares the ones being learned."""
    fired, cut = 0, []
    for s in range(100):
        x = _clean("ce", 1000, np.random.default_rng(s))
        t = loss_split(x)
        if math.isfinite(t):
            fired += 1
            cut.append(np.mean(x > t))
            assert t > math.log(2)
    assert fired <= 15 and max(cut, default=0.0) <= 0.051


@pytest.mark.parametrize("frac", [0.1, 0.2, 0.3])
@pytest.mark.parametrize("bulk", ["gamma", "ce"])
def test_a_planted_high_mode_is_cut_where_the_modes_cross(frac: float, bulk: str) -> None:
    recall, false_cut = [], []
    for s in range(20):
        rng = np.random.default_rng(s)
        k = int(frac * 1000)
        x = _clean(bulk, 1000 - k, rng)
        noise = np.median(x) * np.exp(rng.normal(math.log(30 if bulk == "gamma" else 300), 0.1, k))
        both = np.concatenate([x, noise])
        t = loss_split(both)
        assert cut_threshold(both, truncate_zscore=3.5, cut_rule=RULE) <= t  # the rule: the lower of it and zscore-mode
        recall.append(np.mean(noise > t))
        false_cut.append(np.mean(x > t))
    assert np.mean(recall) >= 0.99 and np.mean(false_cut) <= 0.01


def test_the_crossing_is_placed_near_the_bayes_threshold() -> None:
    """Two log-normal modes of unequal weight and width: the cut lands near where their weighted densities cross
    (Otsu's split alone would cut a quarter of the wide lower mode)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.lognormal(-1.0, 1.0, 8000), rng.lognormal(1.2, 0.3, 2000)])
    grid = np.linspace(-1.0, 1.2, 10001)
    lower = 0.8 * np.exp(-0.5 * (grid + 1.0) ** 2) / 1.0
    upper = 0.2 * np.exp(-0.5 * ((grid - 1.2) / 0.3) ** 2) / 0.3
    bayes = grid[np.argmax(upper > lower)]
    assert abs(math.log(loss_split(x)) - bayes) < 0.1


def _bulk_mode_and_rare_group() -> tuple[np.ndarray, ...]:
    """Group 0: a low bulk (700) with a high mode (200); group 1: a rare group (60) whose losses all sit high, as a
    hard rare class's do. Returns ``bulk, mode, rare, losses, groups``."""
    rng = np.random.default_rng(4)
    bulk, mode, rare = rng.lognormal(-1.0, 0.8, 700), rng.lognormal(1.5, 0.2, 200), rng.lognormal(1.0, 0.3, 60)
    return bulk, mode, rare, np.concatenate([bulk, mode, rare]), np.repeat([0, 0, 1], [700, 200, 60])


def test_per_group_the_split_never_goes_below_a_groups_quantile() -> None:
    """Group 0: a low bulk with a high mode (cut at the split). Group 1: a rare group whose losses all sit high
    (as a hard rare class's do): it loses at most its top 30% to the split, not all of it."""
    bulk, mode, rare, losses, groups = _bulk_mode_and_rare_group()
    t = group_cut_thresholds(losses, groups, num_groups=2, truncate_zscore=3.5, cut_rule=RULE)
    split = loss_split(losses)
    assert math.isfinite(split) and t[0] <= split
    assert np.mean(mode > t[0]) >= 0.99 and np.mean(bulk > t[0]) <= 0.03
    assert t[1] >= np.quantile(rare, SPLIT_GROUP_QUANTILE) and np.mean(rare > t[1]) <= 0.31
    plain = group_cut_thresholds(losses, groups, num_groups=2, truncate_zscore=3.5, cut_rule="zscore-mode")
    assert np.all(t <= plain)  # a second cut: never above the plain rule's


def test_the_rule_is_an_option_of_the_weighting() -> None:
    rule = DROWeighting(cut_rule=RULE)
    assert DROWeighting.from_config(rule.config()) == rule
    assert DROWeighting().cut_rule == "zscore-mode-split-gated"  # the split opt-in; its gated form the default


def test_the_majority_form_splits_only_a_group_whose_median_lies_below_the_split() -> None:
    """``"zscore-mode-split-majority"``: the same two groups as above. Group 0 (its high mode a minority) is cut at
    the split as before; the rare group, whose losses sit above the split as a whole, keeps its own z-score
    cut; without groups the rule is ``"zscore-mode"``."""
    bulk, mode, rare, losses, groups = _bulk_mode_and_rare_group()
    args = dict(num_groups=2, truncate_zscore=3.5)
    split_t = group_cut_thresholds(losses, groups, cut_rule=RULE, **args)
    majority = group_cut_thresholds(losses, groups, cut_rule=RULE + "-majority", **args)
    plain = group_cut_thresholds(losses, groups, cut_rule="zscore-mode", **args)
    assert np.median(rare) > loss_split(losses) > np.median(np.concatenate([bulk, mode]))
    assert majority[0] == split_t[0] <= plain[0]
    assert majority[1] == plain[1] > split_t[1] and np.mean(rare > majority[1]) <= 0.05
    assert cut_threshold(losses, truncate_zscore=3.5, cut_rule=RULE + "-majority") == cut_threshold(
        losses, truncate_zscore=3.5, cut_rule="zscore-mode")


def test_the_split_does_not_depend_on_the_order_of_the_losses() -> None:
    """Above MIXTURE_POINTS losses the split reads their quantiles without sorting every loss first: any order of
    the same losses gives the same threshold, bit for bit (below it, the losses are sorted)."""
    rng = np.random.default_rng(7)
    for n in (300, 5000):
        x = np.concatenate([rng.lognormal(-1.0, 0.8, n), rng.lognormal(1.5, 0.2, n // 4)])
        t = loss_split(np.sort(x))
        assert math.isfinite(t)
        for _ in range(3):
            assert loss_split(rng.permutation(x)) == t
