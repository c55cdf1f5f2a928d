"""The z-score on the losses' square roots (issue 18): ``"zscore-root"`` and ``"zscore-mode-root"``.

For a squared error the root is the residual's own scale: the z-score of 3.5 cuts a normal residual's
upper 0.6% (on the squared errors themselves about 10%), and it still cuts gross outlier targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.optimize import brentq

from irdro_sampler.cut_rules import MIN_GROUP_SEEN, cut_threshold, group_cut_thresholds
from irdro_sampler.weights import DROWeighting


def _cut(x: np.ndarray, rule: str) -> float:
    return cut_threshold(x, truncate_zscore=3.5, cut_rule=rule)


def _expected_normal_cut(z: float = 3.5) -> float:
    """P(|r| > median + z * 1.4826 * MAD) for a standard normal r (median and MAD of the half-normal |r|):
    the rule's false-alarm rate on a clean regression's squared errors, in the limit of many samples."""
    med = float(stats.halfnorm.median())
    mad = brentq(lambda d: stats.halfnorm.cdf(med + d) - stats.halfnorm.cdf(max(med - d, 0.0)) - 0.5, 1e-6, 3.0)
    return float(2 * stats.norm.sf(med + z * 1.4826 * mad))


def test_normal_squared_errors_are_cut_at_the_stated_rate() -> None:
    """On 200,000 squared normal residuals the share cut is the half-normal's tail beyond the rule's
    threshold (0.6%), within 4 binomial standard errors; the z-score on the squared errors cuts 10%."""
    rng = np.random.default_rng(0)
    n = 200_000
    x = rng.normal(size=n) ** 2
    want = _expected_normal_cut()
    assert 0.004 < want < 0.008
    for rule in ("zscore-root", "zscore-mode-root"):
        got = float(np.mean(x > _cut(x, rule)))
        assert abs(got - want) < 4 * math.sqrt(want * (1 - want) / n), (rule, got, want)
    assert np.mean(x > _cut(x, "zscore")) > 0.09


@pytest.mark.parametrize("seed", range(5))
def test_outlier_targets_are_still_cut(seed: int) -> None:
    """10% outlier targets (12 noise scales times a Student-t(2) draw, the suite's) on normal residuals:
    recall >= 0.75 and within 0.12 of ``"zscore-mode"``'s (the outliers it misses lie inside the bulk's
    reach), precision >= 0.95 (``"zscore-mode"``: about 0.6, its cut takes the clean tail too)."""
    rng = np.random.default_rng(seed)
    n = 5000
    r = rng.normal(size=n)
    noisy = rng.random(n) < 0.1
    r[noisy] += 12.0 * rng.standard_t(2, int(noisy.sum()))
    x = r**2
    cut = x > _cut(x, "zscore-mode-root")
    plain = x > _cut(x, "zscore-mode")
    assert np.mean(cut[noisy]) >= max(0.75, np.mean(plain[noisy]) - 0.12)
    assert np.mean(noisy[cut]) >= 0.95 > np.mean(noisy[plain])


def test_mode_root_cuts_a_block_of_unlearnable_content() -> None:
    """A tight block of random documents (25%) far above the bulk is cut whole, as by ``"zscore-mode"``."""
    rng = np.random.default_rng(0)
    clean = np.clip(rng.normal(2.4, 0.6, 3000), 0.5, None)
    block = rng.normal(5.6, 0.06, 1000)
    x = np.concatenate([clean, block])
    t = _cut(x, "zscore-mode-root")
    assert np.mean(block > t) == 1.0
    assert np.mean(clean > t) < 0.01


def test_per_group_and_options() -> None:
    """Per group each group's own root z-score (no block here); a group below MIN_GROUP_SEEN is never cut;
    degenerate inputs cut nothing; the rules are accepted by DROWeighting."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=3000) ** 2 * np.repeat([1.0, 4.0, 9.0], 1000)
    groups = np.repeat([0, 1, 2], 1000)
    got = group_cut_thresholds(x, groups, num_groups=4, truncate_zscore=3.5, cut_rule="zscore-mode-root")
    want = [_cut(x[groups == g], "zscore-root") for g in range(3)]
    np.testing.assert_allclose(got[:3], want)
    assert got[3] == math.inf
    small = group_cut_thresholds(x[: MIN_GROUP_SEEN - 1], groups[: MIN_GROUP_SEEN - 1], num_groups=1,
                                 truncate_zscore=3.5, cut_rule="zscore-mode-root")
    assert small[0] == math.inf
    for rule in ("zscore-root", "zscore-mode-root"):
        assert _cut(np.full(100, 2.0), rule) == math.inf
        assert _cut(np.array([]), rule) == math.inf
        assert _cut(np.array([-1.0, 0.5, 2.0, 3.0, 4.0]), rule) == _cut(np.array([0.0, 0.5, 2.0, 3.0, 4.0]), rule)
        DROWeighting(cut_rule=rule)
