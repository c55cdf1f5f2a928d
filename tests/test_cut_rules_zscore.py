"""The amended z-score cuts (issue 18): ``zscore-mode`` (the mixture's valley where a large separate high mode
inflates the MAD past it), ``zscore-agree`` and ``zscore-shrunk`` (a group judged against the whole set too)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from irdro_sampler.cut_rules import MIN_GROUP_SEEN, SHRINK_SAMPLES, cut_threshold, group_cut_thresholds
from irdro_sampler.weights import DROWeighting


def _cut(x: np.ndarray, rule: str) -> float:
    return cut_threshold(x, truncate_zscore=3.5, cut_rule=rule)


def _lm_like(noise_share: float, rng: np.random.Generator, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Clean documents' running losses around 2.4 nats, random-byte documents a tight block at 5.6."""
    k = int(n * noise_share)
    return np.clip(rng.normal(2.4, 0.6, n - k), 0.5, None), rng.normal(5.6, 0.06, k)


@pytest.mark.parametrize("share", [0.25, 0.3])
def test_mode_cuts_a_large_block_the_zscore_keeps(share: float) -> None:
    rng = np.random.default_rng(0)
    clean, noise = _lm_like(share, rng)
    x = np.concatenate([clean, noise])
    assert np.mean(noise > _cut(x, "zscore")) < 0.5  # the MAD, inflated by the block, puts the cut above it
    mode = _cut(x, "zscore-mode")
    assert mode <= _cut(x, "mixture-valley")  # the z-score of the samples below the valley, or the valley
    assert mode == pytest.approx(np.median(clean) + 3.5 * 1.4826 * np.median(np.abs(clean - np.median(clean))), rel=0.02)
    assert np.mean(noise > mode) == 1.0
    assert np.mean(clean > mode) < 0.001


@pytest.mark.parametrize("share", [0.0, 0.05, 0.1])
def test_mode_is_the_zscore_where_the_zscore_sees_the_noise(share: float) -> None:
    rng = np.random.default_rng(1)
    clean, noise = _lm_like(share, rng)
    x = np.concatenate([clean, noise])
    assert _cut(x, "zscore-mode") == _cut(x, "zscore")


@pytest.mark.parametrize("seed", range(5))
def test_mode_is_the_zscore_on_clean_skewed_losses(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for x in (rng.gamma(2.0, 1.0, 2000), np.logaddexp(0.0, -rng.normal(3.0, 2.0, 2000))):
        assert _cut(x, "zscore-mode") == _cut(x, "zscore")


def test_agree_is_the_larger_of_group_and_global_zscore() -> None:
    rng = np.random.default_rng(2)
    losses = np.concatenate([rng.gamma(2.0, 1.0, 1000), rng.gamma(2.0, 0.05, 300), rng.gamma(2.0, 5.0, 300)])
    groups = np.repeat([0, 1, 2], [1000, 300, 300])
    own = group_cut_thresholds(losses, groups, num_groups=3, truncate_zscore=3.5, cut_rule="zscore")
    agree = group_cut_thresholds(losses, groups, num_groups=3, truncate_zscore=3.5, cut_rule="zscore-agree")
    np.testing.assert_array_equal(agree, np.maximum(own, _cut(losses, "zscore")))


def test_shrunk_pulls_a_group_toward_all_samples_by_its_size() -> None:
    rng = np.random.default_rng(3)
    sizes = [2000, 300, 30, 8]
    parts = [rng.gamma(2.0, s, n) for s, n in zip([1.0, 0.2, 5.0, 0.1], sizes, strict=True)]
    losses = np.concatenate(parts)
    groups = np.repeat(np.arange(4), sizes)
    got = group_cut_thresholds(losses, groups, num_groups=5, truncate_zscore=3.5, cut_rule="zscore-shrunk")
    med = np.median(losses)
    mad = np.median(np.abs(losses - med))
    for g, part in enumerate(parts):
        w = part.size / (part.size + SHRINK_SAMPLES)
        m = np.median(part)
        d = np.median(np.abs(part - m))
        assert got[g] == pytest.approx(w * m + (1 - w) * med + 3.5 * 1.4826 * (w * d + (1 - w) * mad), rel=1e-12)
    assert got[4] == math.inf  # no samples
    own = group_cut_thresholds(losses, groups, num_groups=5, truncate_zscore=3.5, cut_rule="zscore")
    # a small group of high losses is judged mostly against the set: its threshold falls toward the global one
    assert _cut(losses, "zscore") < got[2] < own[2]


def test_shrunk_small_group_flipped_labels_are_cut() -> None:
    """A small class whose clean and flipped labels are about as many: its own MAD is so wide that the
    per-class z-score keeps the flips; shrunk toward the whole set (weight 45 / 145 on the class's own
    statistics), the cut removes about half of them and no clean one."""
    rng = np.random.default_rng(4)
    big = np.logaddexp(0.0, -rng.normal(3.0, 1.5, 3000))
    small_clean = np.logaddexp(0.0, -rng.normal(3.0, 1.5, 20))
    small_flips = np.logaddexp(0.0, rng.normal(3.0, 1.0, 25))  # confident mistakes
    losses = np.concatenate([big, small_clean, small_flips])
    groups = np.repeat([0, 1, 1], [3000, 20, 25])
    own = group_cut_thresholds(losses, groups, num_groups=2, truncate_zscore=3.5, cut_rule="zscore")
    shrunk = group_cut_thresholds(losses, groups, num_groups=2, truncate_zscore=3.5, cut_rule="zscore-shrunk")
    assert np.mean(small_flips > own[1]) < 0.2
    assert np.mean(small_flips > shrunk[1]) > 0.4
    assert np.mean(small_clean > shrunk[1]) == 0.0


@pytest.mark.parametrize("rule", ["zscore-mode", "zscore-agree", "zscore-shrunk"])
def test_without_groups_and_degenerate(rule: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.gamma(2.0, 1.0, 500)
    if rule != "zscore-mode":
        assert _cut(x, rule) == _cut(x, "zscore")
    assert _cut(np.full(100, 2.0), rule) == math.inf
    assert _cut(np.array([]), rule) == math.inf
    tiny = group_cut_thresholds(x[: MIN_GROUP_SEEN - 1], np.zeros(MIN_GROUP_SEEN - 1, dtype=np.int64), num_groups=1,
                                truncate_zscore=3.5, cut_rule=rule)
    assert tiny[0] == math.inf
    assert group_cut_thresholds(x, np.zeros(500, dtype=np.int64), num_groups=1, truncate_zscore=None,
                                cut_rule=rule)[0] == math.inf
    DROWeighting(cut_rule=rule)


def test_mode_ignores_early_training_blocks() -> None:
    """Early in training every sample sits near the uniform prediction's loss (log C): tight modes close
    together (seen on a 10-class digits task: 76% at 2.08 and 24% at 2.32 nats). That is no block of noise."""
    rng = np.random.default_rng(6)
    x = np.concatenate([2.08 * np.exp(rng.normal(0, 0.03, 760)), 2.32 * np.exp(rng.normal(0, 0.02, 240))])
    assert _cut(x, "mixture-valley") < math.inf  # the plain mixture rule sees a separate mode
    assert _cut(x, "zscore-mode") == _cut(x, "zscore")


def test_mode_ignores_a_classifiers_wrong_class() -> None:
    """A high mode of a classifier (a clean class the model gets wrong: 12% at 3.1 nats over a bulk at 1.3,
    log-spreads 0.05 and 0.4, seen on digits) is not tight enough to be a block of unlearnable content."""
    rng = np.random.default_rng(7)
    x = np.concatenate([1.33 * np.exp(rng.normal(0, 0.4, 880)), 3.12 * np.exp(rng.normal(0, 0.05, 120))])
    assert _cut(x, "zscore-mode") == _cut(x, "zscore")


def test_mode_per_group_finds_the_block_once_over_all_samples() -> None:
    """With groups, a block of unlearnable samples is found over all samples and cut in each group whose own
    z-score keeps most of it; a group without the block keeps its own z-score."""
    rng = np.random.default_rng(8)
    clean0, noise0 = _lm_like(0.3, rng, 2000)
    clean1, noise1 = _lm_like(0.25, rng, 2000)
    clean2 = np.clip(rng.normal(2.0, 0.5, 1500), 0.5, None)
    losses = np.concatenate([clean0, noise0, clean1, noise1, clean2])
    groups = np.repeat([0, 0, 1, 1, 2], [clean0.size, noise0.size, clean1.size, noise1.size, clean2.size])
    own = group_cut_thresholds(losses, groups, num_groups=3, truncate_zscore=3.5, cut_rule="zscore")
    mode = group_cut_thresholds(losses, groups, num_groups=3, truncate_zscore=3.5, cut_rule="zscore-mode")
    assert np.mean(noise0 > own[0]) < 0.5 and np.mean(noise1 > own[1]) < 0.5
    assert np.mean(noise0 > mode[0]) == 1.0 and np.mean(noise1 > mode[1]) == 1.0
    assert np.mean(clean0 > mode[0]) < 0.002 and np.mean(clean1 > mode[1]) < 0.002
    assert mode[2] == own[2]
    clean_only = np.concatenate([clean0, clean1, clean2])
    g = np.repeat([0, 1, 2], [clean0.size, clean1.size, clean2.size])
    np.testing.assert_array_equal(
        group_cut_thresholds(clean_only, g, num_groups=3, truncate_zscore=3.5, cut_rule="zscore-mode"),
        group_cut_thresholds(clean_only, g, num_groups=3, truncate_zscore=3.5, cut_rule="zscore"))
