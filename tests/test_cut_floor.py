"""DROWeighting(cut_floor=): no sample at or below the floor is cut, whatever the cut rule says; the option is
saved and fingerprinted only when set."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _core_helpers import assert_state_equal, loss_of, run_steps

from irdro_sampler import DROWeighting, IRDROSampler, LossTable
from irdro_sampler.weights import kept_mask

N = 2000


def _table(groups: bool) -> LossTable:
    """Cross-entropy-like losses: most near 0, a long tail up to a few nats (no noise)."""
    rng = np.random.default_rng(0)
    g = np.arange(N) % 4 if groups else None
    table = LossTable(N, groups=g)
    table.update(np.arange(N), np.logaddexp(0.0, -rng.normal(3.5, 2.0, N)), step=1)
    return table


@pytest.mark.parametrize("groups", [False, True])
def test_floor_keeps_what_is_below_it(groups):
    table = _table(groups)
    plain = DROWeighting().fit(table)
    floored = DROWeighting(cut_floor=math.log(2)).fit(table)
    losses = table.losses.astype(np.float64)
    g = table.groups
    plain_thr, floored_thr = plain.thresholds(g), floored.thresholds(g)
    assert np.all(np.asarray(plain_thr) < math.log(2))  # the z-score alone cuts below log 2 here
    np.testing.assert_array_equal(floored_thr, np.maximum(plain_thr, math.log(2)))
    kept = kept_mask(losses, floored, g, table.first_losses)
    assert kept[losses <= math.log(2)].all()
    assert not kept[losses > math.log(2)].any()  # above the floor the rule still cuts
    assert (~kept_mask(losses, plain, g, table.first_losses)).mean() > 3 * (~kept).mean()


def test_floor_above_the_rule_changes_nothing():
    table = _table(False)
    plain = DROWeighting().fit(table)
    assert DROWeighting(cut_floor=plain.threshold / 2).fit(table) == plain


def test_config_fingerprint_and_defaults():
    rule = DROWeighting()
    assert rule.cut_floor is None and "cut_floor" not in rule.config()
    assert DROWeighting(cut_floor=0.5).config()["cut_floor"] == 0.5
    s = IRDROSampler(100, 10, seed=0)
    assert "cut_floor" not in s.state_dict()["rule"]
    assert s.fingerprint() == IRDROSampler(100, 10, seed=0, cut_floor=None).fingerprint()
    assert s.fingerprint() != IRDROSampler(100, 10, seed=0, cut_floor=0.5).fingerprint()


@pytest.mark.parametrize("bad", [-1.0, 0.0, math.nan, math.inf, "log2", True])
def test_bad_floor_refused(bad):
    with pytest.raises((ValueError, TypeError), match="cut_floor"):
        DROWeighting(cut_floor=bad)
    with pytest.raises((ValueError, TypeError), match="cut_floor"):
        IRDROSampler(100, 10, cut_floor=bad)




def _run(sampler: IRDROSampler, steps: range, save_after: int | None = None) -> tuple[dict, dict | None]:
    return run_steps(sampler, steps, loss_of, save_after)


def test_resume_with_floor():
    def make(**kw):
        return IRDROSampler(160, 16, seed=3, refresh_interval=2, feedback_delay=1, **kw)

    full, state = _run(make(cut_floor=0.3), range(10), save_after=4)
    assert state["rule"]["cut_floor"] == 0.3
    fresh = make(cut_floor=0.3)
    fresh.load_state_dict(state)
    assert_state_equal(fresh.state_dict(), state)
    cont, _ = _run(fresh, range(5, 10))
    assert all(cont[s] == full[s] for s in range(5, 10))
    other = make()  # a state carries its rule: loading it into a sampler built without the floor restores it
    other.load_state_dict(state)
    assert other.rule.cut_floor == 0.3
    assert_state_equal(other.state_dict(), state)
    bad = dict(state, rule=dict(state["rule"], cut_floor=-1.0))
    with pytest.raises(ValueError, match="cut_floor"):
        make().load_state_dict(bad)
