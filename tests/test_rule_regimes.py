"""The rule beyond language modelling: scale-free temperature, cut rules, per-group cuts, re-admission."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _core_helpers import P_THRESHOLD, assert_state_equal, iter_batches
from scipy import stats as sps

from irdro_sampler import DROWeighting, IRDROSampler, LossTable, cut_threshold
from irdro_sampler.cut_rules import group_cut_thresholds
from irdro_sampler.weights import DEFAULT_ESS_FRACTION, effective_sample_size


# ------------------------------------------------------------------------------ temperature default
@pytest.mark.parametrize("scale", [1e-3, 1.0, 3e3])
def test_default_temperature_hits_the_ess_target_and_is_scale_free(scale):
    rng = np.random.default_rng(0)
    losses = rng.gamma(2.0, 1.0, 5000)
    table = LossTable(5000, ema=0.0)
    table.update(np.arange(5000), losses * scale)
    rule = DROWeighting(truncate_zscore=None, uniform_mix=0.0)
    params = rule.fit(table)
    p = rule.probabilities(table, params)
    assert math.isclose(effective_sample_size(p) / 5000, DEFAULT_ESS_FRACTION, rel_tol=2e-3)
    assert math.isclose(params.temperature / scale, rule.fit(_scaled(table, 1 / scale)).temperature, rel_tol=1e-3)
    # The distribution does not depend on the loss unit.
    reference = DROWeighting(truncate_zscore=None, uniform_mix=0.0).probabilities(_scaled(table, 1 / scale))
    np.testing.assert_allclose(p, reference, rtol=2e-3)


def _scaled(table: LossTable, factor: float) -> LossTable:
    out = LossTable(table.dataset_size, ema=0.0)
    seen = np.flatnonzero(table.counts > 0)
    out.update(seen, table.losses[seen].astype(np.float64) * factor)
    return out


def test_fixed_temperature_still_wins():
    table = LossTable(100, ema=0.0)
    table.update(np.arange(100), np.linspace(0, 3, 100))
    assert DROWeighting(temperature=0.25).fit(table).temperature == 0.25


# -------------------------------------------------------------------------------------- cut rules
def test_log_zscore_is_scale_free_and_mixture_finds_a_separated_mode():
    rng = np.random.default_rng(1)
    clean = rng.lognormal(0.0, 0.3, 9000)
    noise = rng.lognormal(2.5, 0.1, 1000)
    losses = np.concatenate([clean, noise])
    for rule in ("log-zscore", "mixture"):
        t = cut_threshold(losses, truncate_zscore=3.5, cut_rule=rule)
        assert np.mean(noise > t) > 0.99 and np.mean(clean > t) < 0.01, rule
        t1000 = cut_threshold(losses * 1000, truncate_zscore=3.5, cut_rule=rule)
        assert math.isclose(t1000, 1000 * t, rel_tol=1e-6), rule
    # One mode: the mixture finds no separated upper component and cuts nothing.
    assert cut_threshold(clean, truncate_zscore=3.5, cut_rule="mixture") == math.inf


def test_bad_cut_rule_names_the_value():
    with pytest.raises(ValueError, match="cut_rule.*'median'"):
        DROWeighting(cut_rule="median")
    with pytest.raises(ValueError, match="cut_rule"):
        cut_threshold([1.0, 2.0], truncate_zscore=3.0, cut_rule="nope")


# ------------------------------------------------------------------------------------------ groups
def rare_group_table(n_common: int = 4000, n_rare: int = 200, noise: int = 100, seed: int = 2) -> LossTable:
    """A classifier late in training: common class near 0, a rare class all high, noise within both."""
    rng = np.random.default_rng(seed)
    common = rng.exponential(0.05, n_common)
    rare = rng.normal(1.5, 0.3, n_rare).clip(0.1)
    noisy = rng.normal(4.5, 0.5, noise)
    losses = np.concatenate([common, rare, noisy])
    groups = np.concatenate([np.zeros(n_common), np.ones(n_rare), rng.integers(0, 2, noise)]).astype(np.int64)
    table = LossTable(losses.size, ema=0.0, groups=groups)
    table.update(np.arange(losses.size), losses)
    return table


def test_groups_keep_a_hard_rare_class_and_cut_its_noise():
    table = rare_group_table()
    rare = slice(4000, 4200)
    noise = slice(4200, 4300)
    grouped = DROWeighting()
    kept = grouped.probabilities(table) > grouped.uniform_mix / table.dataset_size * (1 + 1e-9)
    assert kept[rare].mean() > 0.97  # judged against its own class, the rare class is ordinary
    assert kept[noise].mean() < 0.1  # label noise is far above its class
    # Without groups the same losses lose the whole rare class to the cut (the failure this fixes).
    flat = LossTable(table.dataset_size, ema=0.0)
    flat.update(np.arange(table.dataset_size), table.losses.astype(np.float64))
    kept_flat = grouped.probabilities(flat) > grouped.uniform_mix / table.dataset_size * (1 + 1e-9)
    assert kept_flat[rare].mean() < 0.05


def test_small_groups_are_never_cut_and_thresholds_index_by_group():
    losses = np.array([0.1, 0.1, 0.2, 0.1, 9.0] + list(np.linspace(0.1, 0.3, 20)) + [9.0])
    groups = np.array([3] * 5 + [0] * 21)
    thr = group_cut_thresholds(losses, groups, num_groups=5, truncate_zscore=3.5)
    assert thr.shape == (5,)
    assert thr[3] == math.inf  # 5 samples < MIN_GROUP_SEEN: no evidence
    assert thr[0] < 9.0  # the outlier of group 0 is cut
    assert np.all(np.isinf(thr[[1, 2, 4]]))  # empty groups


@pytest.mark.parametrize(
    ("groups", "exc", "pattern"),
    [
        (np.zeros(9, dtype=np.int64), ValueError, "one id per sample"),
        (np.full(10, -1), ValueError, "-1"),
        (np.full(10, 1 << 16), ValueError, "65536"),
        (np.zeros(10, dtype=np.float32), TypeError, "integers"),
    ],
)
def test_bad_groups_raise_naming_the_value(groups, exc, pattern):
    with pytest.raises(exc, match=pattern):
        IRDROSampler(10, 2, groups=groups)
    with pytest.raises(exc, match=pattern):
        LossTable(10, groups=groups)


def test_groups_travel_in_the_state_and_old_states_load():
    groups = np.arange(50) % 4
    s = IRDROSampler(50, 5, groups=torch.as_tensor(groups), seed=3, refresh_interval=2)
    steps = 0
    for batch in iter_batches(s):
        s.update(batch, np.asarray(batch) % 7 / 3.0, step=steps)
        steps += 1
    state = s.state_dict()
    assert torch.equal(state["table"]["groups"], torch.as_tensor(groups, dtype=torch.int32))
    restored = IRDROSampler.from_state_dict(state)
    assert np.array_equal(restored.table.groups, groups)
    assert_state_equal(restored.state_dict(), state)
    np.testing.assert_array_equal(restored.probabilities(), s.probabilities())
    s.set_epoch(1)
    restored.set_epoch(1)
    assert list(s) == list(restored)
    # A table state from before groups existed (no "groups" key) still loads, without groups.
    old = dict(state["table"])
    del old["groups"]
    table = LossTable(50)
    table.load_state_dict(old)
    assert table.groups is None


# ----------------------------------------------------------------------------- no cut is forever
def test_a_cut_sample_is_remeasured_and_readmitted():
    n = 200
    s = IRDROSampler(n, 50, ema=0.0, feedback_delay=1, refresh_interval=1, seed=5)
    losses = np.full(n, 1.0) + np.linspace(0, 0.1, n)
    losses[7] = 50.0  # looks like noise at first
    step = 0
    cut_seen = False
    for epoch in range(40):
        s.set_epoch(epoch)
        for batch in iter_batches(s):
            idx = np.asarray(batch)
            s.update(idx, losses[idx], step=step)
            step += 1
            p = s.probabilities()
            cut_seen |= bool(p[7] == s.rule.uniform_mix / n)
        if epoch == 5:
            losses[7] = 1.05  # ... and then becomes ordinary
    st = s.stats()
    assert cut_seen
    assert st["remeasured_cut"] >= 1 and st["readmitted"] >= 1
    assert s.probabilities()[7] > s.rule.uniform_mix / n  # back among the kept samples


def test_cut_samples_keep_exactly_the_floor_rate():
    """Draws on cut samples follow u / N each (binomial test on their pooled count)."""
    n, batch = 400, 200
    s = IRDROSampler(n, batch, ema=0.0, feedback_delay=1, refresh_interval=1, seed=9, num_samples=batch * 1000)
    losses = np.random.default_rng(4).normal(2.0, 0.2, n)
    losses[:40] = 9.0  # 10% far outliers: cut
    s.update(np.arange(n), losses, step=0)
    it = iter_batches(s)
    next(it), next(it)  # the second draw applies the feedback and refreshes
    p = s.probabilities()
    cut = p <= s.rule.uniform_mix / n * (1 + 1e-12)
    assert cut[:40].all() and not cut[40:].any()
    draws = np.concatenate([np.asarray(next(it)) for _ in range(200)])
    k = int(np.isin(draws, np.flatnonzero(cut)).sum())
    assert sps.binomtest(k, draws.size, float(p[cut].sum())).pvalue > P_THRESHOLD
    assert np.all(np.isfinite(s.importance_weights(np.arange(n))))  # the floor reaches every sample
