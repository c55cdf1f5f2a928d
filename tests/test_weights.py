"""Closed-form KL-DRO weights, temperature calibration, MidRanking, cut thresholds, DROWeighting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from irdro_sampler import (
    DROWeighting,
    LossTable,
    cut_threshold,
    effective_sample_size,
    kl_dro_weights,
    kl_to_uniform,
    midrank_weights,
    temperature_for_ess,
    temperature_for_kl,
)


def softmax_direct(losses: np.ndarray, tau: float) -> np.ndarray:
    """The textbook formula (only safe for moderate l / tau)."""
    w = np.exp(np.asarray(losses, dtype=np.float64) / tau)
    return w / w.sum()


# ------------------------------------------------------------------------------------ kl_dro_weights
@pytest.mark.parametrize("tau", [0.3, 1.0, 7.0])
def test_matches_direct_softmax(tau):
    losses = np.random.default_rng(0).gamma(2.0, 1.0, size=257)
    p = kl_dro_weights(losses, tau)
    assert p.dtype == np.float64 and p.shape == (257,)
    np.testing.assert_allclose(p, softmax_direct(losses, tau), rtol=1e-12, atol=0)
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)


def test_accepts_lists_and_tensors():
    import torch

    losses = [0.5, 1.5, 2.5]
    ref = softmax_direct(np.array(losses), 1.0)
    np.testing.assert_allclose(kl_dro_weights(losses, 1.0), ref, rtol=1e-12)
    np.testing.assert_allclose(kl_dro_weights(torch.tensor(losses), 1.0), ref, rtol=1e-6)


def test_log_domain_no_overflow():
    losses = np.array([1000.0, 999.999, 998.0, 0.0, -1000.0])
    with np.errstate(all="raise"):  # no overflow/invalid anywhere in the computation
        try:
            p = kl_dro_weights(losses, 1e-3)
        except FloatingPointError as e:  # underflow to 0 is fine; overflow/invalid is not
            if "underflow" not in str(e):
                raise
            with np.errstate(under="ignore", over="raise", invalid="raise", divide="raise"):
                p = kl_dro_weights(losses, 1e-3)
    assert np.all(np.isfinite(p))
    # exp(1) : exp(0) between the top two, the others vanish.
    np.testing.assert_allclose(p[:2], [math.e / (1 + math.e), 1 / (1 + math.e)], rtol=1e-9)
    assert np.all(p[2:] == 0.0)
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)


def test_huge_losses_large_temperature_and_negative_losses():
    p = kl_dro_weights(np.array([1e3, 1e3, 1e3 + 1e-3]), 1e3)
    assert np.all(np.isfinite(p)) and math.isclose(p.sum(), 1.0)
    neg = np.array([-5.0, -1.0, -3.0])
    np.testing.assert_allclose(kl_dro_weights(neg, 2.0), softmax_direct(neg, 2.0), rtol=1e-12)


@pytest.mark.parametrize("tau", [1e-3, 1.0, 1e3])
def test_equal_losses_give_uniform(tau):
    p = kl_dro_weights(np.full(10, 3.7), tau)
    np.testing.assert_allclose(p, np.full(10, 0.1), rtol=1e-14)


def test_truncate_quantile_zeroes_exactly_above_quantile():
    rng = np.random.default_rng(1)
    losses = rng.permutation(np.arange(100, dtype=np.float64))
    q = 0.9
    p = kl_dro_weights(losses, 20.0, truncate_quantile=q)
    thr = np.quantile(losses, q)  # 89.1 with numpy's linear rule
    kept = losses <= thr
    assert kept.sum() == 90
    assert np.all(p[~kept] == 0.0)
    assert np.all(p[kept] > 0.0)
    np.testing.assert_allclose(p[kept], softmax_direct(losses[kept], 20.0), rtol=1e-12)
    # q = 1 keeps everything.
    np.testing.assert_allclose(kl_dro_weights(losses, 20.0, truncate_quantile=1.0), softmax_direct(losses, 20.0))


def test_uniform_mix_formula():
    rng = np.random.default_rng(2)
    losses = rng.normal(size=50)
    u = 0.25
    base = softmax_direct(losses, 0.5)
    np.testing.assert_allclose(kl_dro_weights(losses, 0.5, uniform_mix=u), (1 - u) * base + u / 50, rtol=1e-12)
    # With truncation the tilted part covers the kept samples, the floor all of them (no cut is final).
    p = kl_dro_weights(losses, 0.5, truncate_quantile=0.5, uniform_mix=u)
    kept = losses <= np.quantile(losses, 0.5)
    expect = np.full(50, u / 50)
    expect[kept] += (1 - u) * softmax_direct(losses[kept], 0.5)
    np.testing.assert_allclose(p, expect, rtol=1e-12, atol=0)
    np.testing.assert_allclose(kl_dro_weights(losses, 0.5, uniform_mix=1.0), np.full(50, 1 / 50), rtol=1e-14)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_losses_raise(bad):
    with pytest.raises(ValueError, match="losses"):
        kl_dro_weights(np.array([1.0, bad, 2.0]), 1.0)


def test_empty_or_2d_losses_raise():
    with pytest.raises(ValueError, match="losses"):
        kl_dro_weights(np.array([]), 1.0)
    with pytest.raises(ValueError, match="losses"):
        kl_dro_weights(np.ones((2, 2)), 1.0)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature_raises(tau):
    with pytest.raises(ValueError, match="temperature"):
        kl_dro_weights(np.ones(3), tau)


def test_non_number_temperature_raises_type_error():
    with pytest.raises(TypeError, match="temperature"):
        kl_dro_weights(np.ones(3), "hot")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"truncate_quantile": 0.0}, "truncate_quantile"),
        ({"truncate_quantile": 1.5}, "truncate_quantile"),
        ({"truncate_quantile": -0.1}, "truncate_quantile"),
        ({"truncate_quantile": float("nan")}, "truncate_quantile"),
        ({"uniform_mix": -0.01}, "uniform_mix"),
        ({"uniform_mix": 1.01}, "uniform_mix"),
        ({"uniform_mix": float("nan")}, "uniform_mix"),
    ],
)
def test_fractions_out_of_range_raise(kwargs, name):
    with pytest.raises(ValueError, match=name) as info:
        kl_dro_weights(np.arange(5.0), 1.0, **kwargs)
    assert repr(next(iter(kwargs.values())))[:3] in str(info.value)  # the value is shown


# --------------------------------------------------------------------------------- calibration
def _kl(losses, tau):
    return kl_to_uniform(kl_dro_weights(losses, tau))


def _ess_frac(losses, tau):
    return effective_sample_size(kl_dro_weights(losses, tau)) / len(losses)


@pytest.mark.parametrize("radius", [1e-3, 0.05, 0.5, 2.0])
def test_temperature_for_kl_hits_target(radius):
    losses = np.random.default_rng(3).gamma(1.5, 2.0, size=1000)
    tau = temperature_for_kl(losses, radius)
    rtol = 1e-4  # documented tolerance on tau; KL is decreasing in tau, so the root is bracketed
    assert _kl(losses, tau * (1 + rtol)) <= radius <= _kl(losses, tau / (1 + rtol))
    assert math.isclose(_kl(losses, tau), radius, rel_tol=1e-3)


@pytest.mark.parametrize("frac", [0.05, 0.3, 0.9, 0.999])
def test_temperature_for_ess_hits_target(frac):
    losses = np.random.default_rng(4).gamma(1.5, 2.0, size=1000)
    tau = temperature_for_ess(losses, frac)
    rtol = 1e-4
    # ESS rises with tau.
    assert _ess_frac(losses, tau / (1 + rtol)) <= frac <= _ess_frac(losses, tau * (1 + rtol))
    assert math.isclose(_ess_frac(losses, tau), frac, rel_tol=1e-3)


def test_calibration_is_monotone():
    losses = np.random.default_rng(5).normal(size=500)
    radii = [0.01, 0.1, 0.5, 1.0, 3.0]
    taus = [temperature_for_kl(losses, r) for r in radii]
    assert all(a > b for a, b in zip(taus, taus[1:], strict=False)), taus  # bigger radius -> colder
    fracs = [0.01, 0.1, 0.5, 0.9, 0.99]
    taus = [temperature_for_ess(losses, f) for f in fracs]
    assert all(a < b for a, b in zip(taus, taus[1:], strict=False)), taus  # bigger ESS -> hotter


def test_calibration_extreme_cases():
    losses = np.arange(10, dtype=np.float64)  # spread 9
    # Equal losses: every temperature is uniform; documented to return 1.0.
    assert temperature_for_kl(np.full(5, 2.0), 0.1) == 1.0
    assert temperature_for_ess(np.full(5, 2.0), 0.5) == 1.0
    # A radius beyond log(n) is out of reach: the cold end of the search range, spread / 700.
    tau = temperature_for_kl(losses, 10.0)
    assert math.isclose(tau, 9.0 / 700.0, rel_tol=1e-12)
    assert np.all(np.isfinite(kl_dro_weights(losses, tau)))
    # A vanishing radius: the hot end, spread * 1e6, practically uniform.
    tau = temperature_for_kl(losses, 1e-15)
    assert math.isclose(tau, 9.0 * 1e6, rel_tol=1e-12)
    # ESS fraction 1 needs uniform weights: the hot end as well; a fraction below 1/n: the cold end.
    assert temperature_for_ess(losses, 1.0) >= 9.0 * 1e6 / 1.001
    assert math.isclose(temperature_for_ess(losses, 0.01), 9.0 / 700.0, rel_tol=1e-12)
    # Large losses and tiny spread stay finite.
    big = 1e3 + np.linspace(0, 1e-3, 100)
    tau = temperature_for_kl(big, 0.1)
    assert math.isfinite(tau) and math.isclose(_kl(big, tau), 0.1, rel_tol=1e-3)


@pytest.mark.parametrize(
    ("fn", "value", "name", "exc"),
    [
        (temperature_for_kl, 0.0, "kl_radius", ValueError),
        (temperature_for_kl, -1.0, "kl_radius", ValueError),
        (temperature_for_kl, float("nan"), "kl_radius", ValueError),
        (temperature_for_kl, "x", "kl_radius", TypeError),
        (temperature_for_ess, 0.0, "ess_fraction", ValueError),
        (temperature_for_ess, 1.5, "ess_fraction", ValueError),
        (temperature_for_ess, float("nan"), "ess_fraction", ValueError),
    ],
)
def test_calibration_bad_input(fn, value, name, exc):
    with pytest.raises(exc, match=name):
        fn(np.arange(5.0), value)
    with pytest.raises(ValueError, match="losses"):
        fn(np.array([1.0, np.nan]), 0.5)


# ------------------------------------------------------------------------------------ midrank
def test_midrank_band():
    rng = np.random.default_rng(6)
    losses = rng.permutation(np.arange(100, dtype=np.float64))
    p = midrank_weights(losses, skip_top=0.1, keep=0.5)
    # Top 10 (losses 90..99) skipped, next 50 (losses 40..89) kept uniformly, rest 0.
    band = (losses >= 40) & (losses <= 89)
    np.testing.assert_array_equal(p[band], np.full(50, 1 / 50))
    assert np.all(p[~band] == 0.0)
    assert math.isclose(p.sum(), 1.0)


def test_midrank_ties_and_edges():
    losses = np.array([1.0, 1.0, 1.0, 1.0])
    p = midrank_weights(losses, skip_top=0.25, keep=0.5)
    np.testing.assert_array_equal(p, [0.0, 0.5, 0.5, 0.0])  # ties broken by index
    np.testing.assert_array_equal(midrank_weights(np.arange(4.0), skip_top=0.0, keep=1.0), np.full(4, 0.25))
    # keep rounds to at least one sample.
    p = midrank_weights(np.arange(10.0), skip_top=0.0, keep=0.01)
    np.testing.assert_array_equal(p, np.eye(10)[9])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"skip_top": 1.0, "keep": 0.5}, "skip_top"),
        ({"skip_top": -0.1, "keep": 0.5}, "skip_top"),
        ({"skip_top": 0.1, "keep": 0.0}, "keep"),
        ({"skip_top": 0.1, "keep": 1.2}, "keep"),
        ({"skip_top": 0.6, "keep": 0.6}, "skip_top"),
    ],
)
def test_midrank_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        midrank_weights(np.arange(10.0), **kwargs)


# ------------------------------------------------------------------------------------ cut threshold
def test_cut_threshold_quantile_and_zscore():
    rng = np.random.default_rng(7)
    losses = rng.normal(2.0, 0.5, size=1001)
    assert cut_threshold(losses) == math.inf
    assert cut_threshold(losses, truncate_quantile=0.9) == np.quantile(losses, 0.9)
    assert cut_threshold(losses, truncate_quantile=1.0) == math.inf
    med = np.median(losses)
    mad = np.median(np.abs(losses - med))
    z = cut_threshold(losses, truncate_zscore=3.0)
    assert math.isclose(z, med + 3.0 * 1.4826 * mad, rel_tol=1e-12)
    # Both: the lower wins.
    assert cut_threshold(losses, truncate_quantile=0.5, truncate_zscore=3.0) == np.quantile(losses, 0.5)
    assert math.isclose(cut_threshold(losses, truncate_quantile=0.99999, truncate_zscore=1.0), med + 1.4826 * mad)
    # MAD = 0: the z-score cuts nothing.
    assert cut_threshold(np.array([1.0, 1.0, 1.0, 50.0]), truncate_zscore=3.0) == math.inf
    assert cut_threshold(np.array([]), truncate_quantile=0.5) == math.inf


def test_zscore_follows_the_noise_share():
    """Corrupt samples with huge losses are cut by the robust z-score whatever their share."""
    rng = np.random.default_rng(8)
    for share in (0.02, 0.2):
        clean = rng.normal(1.0, 0.1, size=int(1000 * (1 - share)))
        noisy = rng.normal(10.0, 1.0, size=1000 - clean.size)
        thr = cut_threshold(np.concatenate([clean, noisy]), truncate_zscore=4.0)
        assert clean.max() <= thr < noisy.min()


def test_cut_threshold_bad_input():
    with pytest.raises(ValueError, match="truncate_zscore"):
        cut_threshold(np.ones(3), truncate_zscore=0.0)
    with pytest.raises(ValueError, match="truncate_quantile"):
        cut_threshold(np.ones(3), truncate_quantile=2.0)


# ------------------------------------------------------------------------------------ DROWeighting
@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 1.0, "kl_radius": 0.1},
        {"temperature": 1.0, "ess_fraction": 0.5},
        {"kl_radius": 0.1, "ess_fraction": 0.5},
    ],
)
def test_drow_conflicting_options_raise(kwargs):
    with pytest.raises(ValueError, match="at most one") as info:
        DROWeighting(**kwargs)
    for name in kwargs:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"kl_radius": -1.0}, "kl_radius"),
        ({"ess_fraction": 0.0}, "ess_fraction"),
        ({"truncate_quantile": 1.5}, "truncate_quantile"),
        ({"truncate_zscore": -2.0}, "truncate_zscore"),
        ({"uniform_mix": 2.0}, "uniform_mix"),
        ({"calibration_size": 0}, "calibration_size"),
    ],
)
def test_drow_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DROWeighting(**kwargs)


def test_drow_probabilities_match_pure_function():
    rng = np.random.default_rng(9)
    table = LossTable(300, ema=0.0)
    losses = rng.gamma(2.0, 1.0, size=300).astype(np.float32)
    table.update(np.arange(300), losses)
    rule = DROWeighting(temperature=0.7, truncate_quantile=0.8, uniform_mix=0.2)
    p = rule.probabilities(table)
    ref = kl_dro_weights(losses.astype(np.float64), 0.7, truncate_quantile=0.8, uniform_mix=0.2)
    np.testing.assert_allclose(p, ref, rtol=1e-9, atol=1e-300)
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)


def test_drow_unseen_samples_get_prior_and_are_never_cut():
    table = LossTable(10, ema=0.0)
    table.update(np.arange(5), np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    rule = DROWeighting(temperature=1.0, truncate_quantile=0.8, uniform_mix=0.0)
    params = rule.fit(table)
    assert math.isclose(params.prior, 22.0)  # mean of seen losses
    p = rule.probabilities(table, params)
    assert p[4] == 0.0  # seen and above the 0.8 quantile (23.2)
    assert np.all(p[5:] > 0)  # unseen: prior 22 > threshold, still kept
    np.testing.assert_allclose(p[5:], p[5])
    expect = kl_dro_weights(np.array([1.0, 2.0, 3.0, 4.0] + [22.0] * 5), 1.0)
    np.testing.assert_allclose(np.delete(p, 4), expect, rtol=1e-9)


def test_drow_kl_radius_calibrates_kept_distribution():
    rng = np.random.default_rng(10)
    table = LossTable(2000, ema=0.0)
    table.update(np.arange(2000), rng.gamma(2.0, 1.0, size=2000))
    rule = DROWeighting(kl_radius=0.3, uniform_mix=0.0, truncate_zscore=None)
    p = rule.probabilities(table)
    assert math.isclose(kl_to_uniform(p), 0.3, rel_tol=2e-3)
    rule = DROWeighting(ess_fraction=0.4, uniform_mix=0.0, truncate_zscore=None)
    p = rule.probabilities(table)
    assert math.isclose(effective_sample_size(p) / 2000, 0.4, rel_tol=2e-3)


def test_default_rule_cuts_gross_outliers_only():
    """The default adaptive cut (z = 3.5) removes a far tail and nothing of a clean distribution."""
    rng = np.random.default_rng(0)
    clean = rng.normal(2.0, 0.3, 10_000)
    table = LossTable(10_500, ema=0.0)
    table.update(np.arange(10_500), np.concatenate([clean, np.full(500, 5.55)]))
    rule = DROWeighting()
    p = rule.probabilities(table)
    floor = rule.uniform_mix / 10_500
    assert np.all(p[10_000:] == floor)  # the noise is cut: only the floor reaches it
    assert np.mean(p[:10_000] == floor) < 0.002  # a normal tail beyond 3.5 sigma is ~2e-4
    no_cut = DROWeighting(truncate_zscore=float("inf")).probabilities(table)
    assert np.all(no_cut > 0)
    assert np.array_equal(no_cut, DROWeighting(truncate_zscore=None).probabilities(table))
