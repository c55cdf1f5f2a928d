"""DROWeighting(tilt_cap="zscore"): the tilt winsorised at the robust z-score threshold, the cut left to cut_rule.

Masses are ``exp((min(l, T) - shift) / tau)`` for kept samples (T the zscore rule's threshold, per group
with groups), the temperature is calibrated on the capped kept losses, the shift is the largest capped kept
loss; rules without the option keep their configs, params, masses and fingerprints bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _core_helpers import assert_state_equal, loss_of, run_steps

from irdro_sampler import DROWeighting, IRDROSampler, LossTable
from irdro_sampler.cut_rules import DEFAULT_ZSCORE, cut_threshold, group_cut_thresholds
from irdro_sampler.weights import RULE_OPTIONS, masses, max_kept_loss, temperature_for_ess

N = 3000
NUM_GROUPS = 5


def _table(groups: bool = False, prior="mean", seed: int = 0) -> LossTable:
    """Gamma losses with a 10% high mode (x 30) and 10% of samples unseen."""
    rng = np.random.default_rng(seed)
    g = (np.arange(N) * 7 % NUM_GROUPS) if groups else None
    if groups:
        g[-3:] = NUM_GROUPS  # a tiny group (3 samples): never capped, never cut
    table = LossTable(N, prior=prior, groups=g)
    ids = np.flatnonzero(rng.random(N) < 0.9)
    loss = rng.gamma(2.0, 1.0, ids.size) * np.where(rng.random(ids.size) < 0.1, 30.0, 1.0)
    if groups:
        loss *= 1.0 + (g[ids] == 2)  # one harder group
    table.update(ids, loss, step=1)
    return table


def _effective(table: LossTable, params) -> np.ndarray:
    loss = table.losses.astype(np.float64)
    loss[np.isnan(loss)] = params.prior
    return loss


def test_capped_masses_equal_the_formula_without_groups():
    table = _table()
    rule = DROWeighting(tilt_cap="zscore", cut_rule="mixture-valley", tilt_fade_cut=None)  # the fade: test_tilt_fade.py
    params = rule.fit(table)
    seen = table.losses[~np.isnan(table.losses)].astype(np.float64)
    cap = cut_threshold(seen, truncate_zscore=DEFAULT_ZSCORE)
    assert params.cap == cap and params.group_cap is None
    assert params.threshold == cut_threshold(seen, truncate_zscore=DEFAULT_ZSCORE, cut_rule="mixture-valley")
    assert params.threshold > cap  # the evidence rule cuts above the cap: some samples keep the capped mass
    eff = _effective(table, params)
    kept = np.isnan(table.losses) | (eff <= params.threshold)
    capped = np.minimum(eff, cap)
    assert params.shift == capped[kept].max()
    assert params.temperature == temperature_for_ess(capped[kept], 0.9)
    mass, got_kept = masses(table.losses, params, first=table.first_losses)
    np.testing.assert_array_equal(got_kept, kept)
    want = np.where(kept, np.exp((capped - params.shift) / params.temperature), 0.0)
    np.testing.assert_array_equal(mass, want)
    above = kept & (eff > cap)
    assert above.any() and np.all(mass[above] == mass[above][0])  # all above the cap tilt alike
    assert rule.probabilities(table).sum() == pytest.approx(1.0, abs=1e-12)


def test_capped_masses_per_group():
    table = _table(groups=True)
    rule = DROWeighting(tilt_cap="zscore", cut_rule="tail-normal-wide", tilt_fade_cut=None)
    params = rule.fit(table)
    seen = ~np.isnan(table.losses)
    num_groups = NUM_GROUPS + 1
    want_cap = group_cut_thresholds(table.losses[seen].astype(np.float64), table.groups[seen], num_groups=num_groups,
                                    truncate_zscore=DEFAULT_ZSCORE)
    np.testing.assert_array_equal(params.group_cap, want_cap)
    assert params.cap is None and params.group_cap[NUM_GROUPS] == math.inf  # the tiny group is uncapped
    assert len(set(params.group_cap[:NUM_GROUPS].tolist())) > 1  # each group its own cap
    eff = _effective(table, params)
    cap = params.group_cap[table.groups]
    kept = ~seen | (eff <= params.group_threshold[table.groups])
    capped = np.minimum(eff, cap)
    assert params.shift == capped[kept].max()
    mass, got_kept = masses(table.losses, params, table.groups, table.first_losses)
    np.testing.assert_array_equal(got_kept, kept)
    np.testing.assert_array_equal(mass, np.where(kept, np.exp((capped - params.shift) / params.temperature), 0.0))
    with pytest.raises(ValueError, match="groups"):
        masses(table.losses, params)


def test_cap_without_any_cut():
    table = _table()
    params = DROWeighting(tilt_cap="zscore", truncate_zscore=None).fit(table)
    assert params.threshold == math.inf  # nothing is cut
    assert params.cap == cut_threshold(table.losses[~np.isnan(table.losses)].astype(np.float64),
                                       truncate_zscore=DEFAULT_ZSCORE)
    mass, kept = masses(table.losses, params, first=table.first_losses)
    assert kept.all() and np.all(mass > 0)
    # The cap follows truncate_zscore when it is given.
    p3 = DROWeighting(tilt_cap="zscore", truncate_zscore=2.0, cut_rule="mixture-valley").fit(table)
    assert p3.cap == cut_threshold(table.losses[~np.isnan(table.losses)].astype(np.float64), truncate_zscore=2.0)


def test_capped_prior_and_shift():
    """Unseen samples tilt at their capped prior, and the shift counts them capped."""
    table = _table(prior=1e6)
    params = DROWeighting(tilt_cap="zscore").fit(table)
    assert params.prior == 1e6 and params.shift == params.cap == max_kept_loss(table.losses, params, first=table.first_losses)
    mass = masses(table.losses, params, first=table.first_losses)[0]
    assert mass[np.isnan(table.losses)].max() == 1.0


def test_zscore_cut_with_zscore_cap_is_the_default_rule():
    """The cap at the cut threshold changes nothing when the cut is the same z-score rule (and the prior of
    the unseen samples is below it; the mean loss here is not: unseen samples would tilt capped)."""
    table = _table(prior=1.0)
    plain, capped = DROWeighting().fit(table), DROWeighting(tilt_cap="zscore").fit(table)
    assert capped[:5] == plain[:5] and capped.cap == plain.threshold
    first = table.first_losses
    np.testing.assert_array_equal(masses(table.losses, capped, first=first)[0], masses(table.losses, plain, first=first)[0])


def test_defaults_unchanged():
    rule = DROWeighting()
    assert rule.tilt_cap is None and "tilt_cap" not in rule.config() and "tilt_cap" in RULE_OPTIONS
    assert [k for k, _ in rule.identity()] == sorted(
        ["temperature", "kl_radius", "ess_fraction", "truncate_quantile", "truncate_zscore", "cut_rule",
         "uniform_mix", "calibration_size", "cut_learned_ratio", "group_tilt_share",
         "tilt_fade_cut", "tilt_fade_skip_block"])
    assert DROWeighting(tilt_cap=None) == rule
    assert DROWeighting(tilt_cap="zscore").config()["tilt_cap"] == "zscore"
    for groups in (False, True):
        params = rule.fit(_table(groups=groups))
        assert params.cap is None and params.group_cap is None
    s = IRDROSampler(100, 10, seed=0)
    assert "tilt_cap" not in s.state_dict()
    assert s.fingerprint() == IRDROSampler(100, 10, seed=0, tilt_cap=None).fingerprint()
    assert s.fingerprint() != IRDROSampler(100, 10, seed=0, tilt_cap="zscore").fingerprint()


@pytest.mark.parametrize("bad", ["winsor", "ZSCORE", "", 3.5, True])
def test_bad_tilt_cap_refused(bad):
    with pytest.raises(ValueError, match=r"tilt_cap must be None or one of \('zscore',\), got " + repr(bad)[:3]):
        DROWeighting(tilt_cap=bad)
    with pytest.raises(ValueError, match="tilt_cap"):
        IRDROSampler(100, 10, tilt_cap=bad)




def _loss(b: list[int], step: int) -> np.ndarray:
    return loss_of(b, step) * np.where(np.asarray(b) % 10 == 0, 40.0, 1.0)


def _run(sampler: IRDROSampler, steps: range, save_after: int | None = None) -> tuple[dict, dict | None]:
    """Batches of global ``steps`` with feedback; the state saved after step ``save_after``."""
    return run_steps(sampler, steps, _loss, save_after)


def _make(groups: bool, **opts) -> IRDROSampler:
    return IRDROSampler(160, 16, seed=3, refresh_interval=10, feedback_delay=1, tilt_cap="zscore",
                        groups=np.arange(160) % 4 if groups else None, **opts)


@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("opts", [dict(cut_rule="mixture-valley"), dict(truncate_zscore=None)])
def test_state_keeps_the_cap(groups, opts):
    full, state = _run(_make(groups, **opts), range(40), save_after=22)
    assert ("group_cap" if groups else "cap") in state["tilt_cap"] and state["rule"]["tilt_cap"] == "zscore"
    fresh = _make(groups, **opts)
    fresh.load_state_dict(state)
    assert_state_equal(fresh.state_dict(), state)
    cont, _ = _run(fresh, range(23, 40))
    assert all(cont[s] == full[s] for s in range(23, 40))
    bad = dict(state, tilt_cap={"cap": None, "group_cap": None})
    with pytest.raises(ValueError, match="tilt_cap"):
        _make(groups, **opts).load_state_dict(bad)
