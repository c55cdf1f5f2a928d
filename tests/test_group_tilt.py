"""The tilt's strength with groups (``DROWeighting(group_tilt_share=)``): full where the groups explain the
losses' spread, weaker where the high losses sit inside every group (issue 18)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _core_helpers import loss_of, roundtrip, run_with_feedback

from irdro_sampler import DROWeighting, IRDROSampler, LossTable
from irdro_sampler.group_share import DEFAULT_GROUP_TILT_SHARE, group_explained_share, tilt_factor


def _epsilon_squared_by_hand(x: np.ndarray, g: np.ndarray) -> float:
    levels = np.unique(g)
    m = x.mean()
    ss_t = ((x - m) ** 2).sum()
    ss_b = sum((g == k).sum() * (x[g == k].mean() - m) ** 2 for k in levels)
    ms_w = (ss_t - ss_b) / (x.size - levels.size)
    return (ss_b - (levels.size - 1) * ms_w) / ss_t


def test_share_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    g = rng.integers(0, 5, 300)
    x = rng.gamma(2.0, 1.0, 300) + 0.4 * g
    assert group_explained_share(x, g, 7) == pytest.approx(_epsilon_squared_by_hand(x, g), rel=1e-12)


def test_random_groups_explain_nothing_on_average():
    """Epsilon squared is unbiased under the null: over 400 draws of 50 random groups on 1000 losses its
    mean is 0 within 4 standard errors (eta squared would sit at (G - 1) / (n - 1) = 0.049)."""
    rng = np.random.default_rng(1)
    raw = []
    for _ in range(400):
        x, g = rng.gamma(2.0, 1.0, 1000), rng.integers(0, 50, 1000)
        m, levels = x.mean(), np.unique(g)
        ss_t = ((x - m) ** 2).sum()
        ss_b = sum((g == k).sum() * (x[g == k].mean() - m) ** 2 for k in levels)
        raw.append((ss_b - (levels.size - 1) * (ss_t - ss_b) / (x.size - levels.size)) / ss_t)  # unclipped
        assert 0.0 <= group_explained_share(x, g, 50) <= 0.05
    raw = np.asarray(raw)
    assert abs(raw.mean()) < 4 * raw.std() / math.sqrt(raw.size)


def test_share_says_nothing_without_evidence():
    x = np.arange(10.0)
    assert group_explained_share(x, np.zeros(10, int), 3) is None  # one group
    assert group_explained_share(x[:2], np.array([0, 1]), 2) is None  # as many samples as groups
    assert group_explained_share(np.ones(10), np.arange(10) % 2, 2) is None  # no spread at all
    assert tilt_factor(None, 0.25) == 1.0 and tilt_factor(0.9, None) == 1.0
    assert tilt_factor(0.1, 0.25) == pytest.approx(0.4) and tilt_factor(0.6, 0.25) == 1.0


def _table(within: bool, n: int = 4000, groups: int = 10) -> LossTable:
    """Losses whose spread lies inside every group (``within``: equal group means) or between groups."""
    rng = np.random.default_rng(2)
    g = np.arange(n) % groups
    loss = rng.gamma(2.0, 0.5, n) if within else 0.3 * g + rng.gamma(2.0, 0.02, n)
    table = LossTable(n, groups=g)
    table.update(np.arange(n), loss, step=0)
    return table


def _ess(rule: DROWeighting, table: LossTable) -> float:
    params = rule.fit(table)
    kept = rule.probabilities(table, params)  # the floor is spread over all samples: undo it to see the tilt
    tilted = (kept - rule.uniform_mix / table.dataset_size) / (1 - rule.uniform_mix)
    tilted = tilted[tilted > 0]
    return float(tilted.sum() ** 2 / np.dot(tilted, tilted) / tilted.size)


def test_the_tilt_keeps_its_strength_where_groups_differ_and_fades_where_they_do_not():
    between, within = _table(within=False), _table(within=True)
    # The fade with the cut's share (tests/test_tilt_fade.py) off: this checks the groups' share alone.
    default, off = DROWeighting(tilt_fade_cut=None), DROWeighting(group_tilt_share=None, tilt_fade_cut=None)
    saturating = DROWeighting(group_tilt_share=0.5, tilt_fade_cut=None)
    assert default.group_tilt_share == DEFAULT_GROUP_TILT_SHARE == 1.0
    # Groups explain nearly all the spread: a rule saturating at half keeps the full tilt (ESS 0.9 of the
    # kept), the defaults' is nearly the full one (its strength times the share).
    explained = group_explained_share(between.losses, between.groups, 10)
    assert explained > 0.9
    assert saturating.fit(between).temperature == off.fit(between).temperature
    assert _ess(saturating, between) == pytest.approx(0.9, abs=2e-3)
    assert _ess(default, between) == pytest.approx(1.0 - 0.1 * explained, abs=2e-3)
    # Equal group means: the spread is inside the groups and the tilt fades (ESS -> 1); without the
    # adaptation it is the full one.
    share = group_explained_share(within.losses, within.groups, 10)
    assert share < 0.01
    assert _ess(off, within) == pytest.approx(0.9, abs=2e-3)
    assert _ess(default, within) == pytest.approx(1.0 - 0.1 * share / DEFAULT_GROUP_TILT_SHARE, abs=2e-3)
    # Without groups there is nothing to measure: the full tilt.
    plain = LossTable(within.dataset_size)
    plain.update(np.arange(plain.dataset_size), within.losses, step=0)
    assert default.fit(plain).temperature == off.fit(plain).temperature


def test_partial_share_scales_the_tilt_strength_of_ess_and_kl():
    rng = np.random.default_rng(3)
    n, groups = 6000, 6
    g = np.arange(n) % groups
    table = LossTable(n, groups=g)
    table.update(np.arange(n), 0.03 * g + rng.gamma(2.0, 0.1, n), step=0)
    share = group_explained_share(table.losses, g, groups)
    assert 0.05 < share < 0.25  # a partial share
    rule = DROWeighting(truncate_zscore=None)
    assert _ess(rule, table) == pytest.approx(1.0 - 0.1 * share / DEFAULT_GROUP_TILT_SHARE, abs=2e-3)
    kl_rule, kl_full = (DROWeighting(kl_radius=0.05, truncate_zscore=None, group_tilt_share=s) for s in (0.25, None))
    want = kl_full.temperature_for(table.losses.astype(np.float64), share / 0.25)
    assert kl_rule.fit(table).temperature == pytest.approx(want, rel=1e-12)
    # A fixed temperature is the user's: never scaled.
    assert DROWeighting(temperature=0.3).fit(table).temperature == 0.3


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, "high", math.nan])
def test_bad_group_tilt_share_is_refused_by_name(value):
    with pytest.raises((ValueError, TypeError), match="group_tilt_share"):
        DROWeighting(group_tilt_share=value)
    with pytest.raises((ValueError, TypeError), match="group_tilt_share"):
        IRDROSampler(100, batch_size=4, group_tilt_share=value)


def test_config_names_the_share_only_when_set_and_old_configs_load_without_it():
    assert DROWeighting().config()["group_tilt_share"] == 1.0
    assert "group_tilt_share" not in DROWeighting(group_tilt_share=None).config()
    old = DROWeighting(group_tilt_share=None).config()  # what versions before the option saved
    assert DROWeighting.from_config(old).group_tilt_share is None
    assert DROWeighting.from_config(DROWeighting(group_tilt_share=0.25).config()).group_tilt_share == 0.25


def test_resume_with_groups_is_bitwise_under_the_adaptation():
    """Groups that explain part of the losses' spread (a partial tilt): a run saved after its first epoch and
    resumed draws what the uninterrupted run draws, and the saved temperature is the adapted one."""
    n, bs = 500, 16
    idx = np.arange(n)
    groups = np.where(np.random.default_rng(0).random(n) < 0.6, idx % 4, ((idx * 2654435761 + 1234) % 1000) // 250)
    share = group_explained_share(loss_of(idx, 0), groups, 4)
    assert 0.05 < share < 0.25

    def make():
        return IRDROSampler(n, bs, groups=groups, seed=5, feedback_delay=2, refresh_interval=3)

    full = make()
    want = run_with_feedback(full, 3)
    first = make()
    got = run_with_feedback(first, 1)
    state = roundtrip(first.state_dict())
    assert first.rule.group_tilt_share == 1.0 and state["rule"]["group_tilt_share"] == 1.0
    again = make()
    again.load_state_dict(state)
    got += run_with_feedback(again, 2, start_epoch=1, step0=len(got))
    assert got == want
    off = IRDROSampler(n, bs, groups=groups, seed=5, feedback_delay=2, refresh_interval=3, group_tilt_share=None)
    run_with_feedback(off, 1)
    assert first.stats()["temperature"] > off.stats()["temperature"]  # the adapted tilt is the milder one
