"""RoundFeedback: the contract of the round-based core (table, rule, cut in force, counters, state)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _core_helpers import assert_plain_state, assert_state_equal

from irdro_sampler import DROWeighting, LossTable, RoundFeedback
from irdro_sampler.diagnostics import weighting_diagnostics
from irdro_sampler.weights import cut_transitions

N = 40


def losses_of(indices, step):
    idx = np.asarray(indices)
    return ((idx * 7919 + 13 * step) % 97) / 20.0 + 0.01


def fed(rule=None, *, steps=6, groups=None, rounds_every=2, seed=0):
    """A RoundFeedback fed ``steps`` batches of 8, starting a round every ``rounds_every`` batches."""
    fb = RoundFeedback(LossTable(N, groups=groups), rule or DROWeighting(truncate_quantile=0.8))
    rng = np.random.default_rng(seed)
    rounds = []
    for step in range(steps):
        idx = rng.integers(0, N, 8)
        fb.update(idx, losses_of(idx, step), step)
        if (step + 1) % rounds_every == 0:
            rounds.append(fb.round_probabilities())
    return fb, rounds


def test_is_exported_and_keeps_the_core_free_of_frameworks():
    import irdro_sampler

    assert "RoundFeedback" in irdro_sampler.__all__ and irdro_sampler.RoundFeedback is RoundFeedback


def test_round_probabilities_are_the_rules_and_fix_the_cut():
    fb, _ = fed(steps=4, rounds_every=100)
    assert fb.params is None  # no round yet
    expected = fb.rule.probabilities(fb.table)
    p = fb.round_probabilities()
    assert p.dtype == np.float64 and p.shape == (N,) and math.isclose(p.sum(), 1.0)
    np.testing.assert_array_equal(p, expected)  # bit for bit the rule's distribution
    assert fb.params == fb.rule.fit(fb.table)


def test_counters_count_transitions_under_the_cut_in_force_only():
    fb = RoundFeedback(LossTable(N, ema=0.0), DROWeighting(truncate_quantile=0.5, temperature=1.0))
    idx = np.arange(N)
    fb.update(idx, idx.astype(float), 0)
    fb.update([N - 1], [500.0], 1)
    assert (fb.remeasured_cut, fb.readmitted) == (0, 0)  # no round yet: nothing counted
    fb.round_probabilities()
    cut = np.flatnonzero(fb.table.losses > fb.params.threshold)
    assert cut.size > 1
    # Re-measure two cut samples: one comes back low (re-admitted), one stays high; one kept sample too.
    old = fb.table.losses[np.array([0, cut[0], cut[1]])].copy()
    fb.update([cut[0], cut[1], 0, cut[0]], [0.0, 900.0, 0.5, 0.0], 2)
    assert (fb.remeasured_cut, fb.readmitted) == (2, 1)
    new = fb.table.losses[np.array([0, cut[0], cut[1]])]
    first = fb.table.first_losses[np.array([0, cut[0], cut[1]])]
    assert cut_transitions(old, new, fb.params, None, first) == (2, 1)  # the core's one definition
    # A skipped (non-finite) loss of a cut sample still counts as re-measured, not re-admitted.
    fb.update([cut[1]], [float("nan")], 3)
    assert (fb.remeasured_cut, fb.readmitted) == (3, 1) and fb.table.num_skipped == 1


def test_stats_use_the_one_diagnostics_builder():
    fb, rounds = fed()
    stats = fb.stats(rounds[-1])
    expected = weighting_diagnostics(rounds[-1], fb.table, fb.params)
    assert {k: stats[k] for k in expected} == expected
    assert stats["remeasured_cut"] == float(fb.remeasured_cut) and stats["readmitted"] == float(fb.readmitted)
    # Without the probabilities they are recomputed under the cut in force: the same numbers.
    assert fb.stats() == stats
    # Before any round: diagnostics of a fresh fit, and nothing is remembered.
    fresh, _ = fed(rounds_every=100)
    assert fresh.stats()["temperature"] == fresh.rule.fit(fresh.table).temperature and fresh.params is None


def test_groups_are_cut_per_group():
    groups = np.arange(N) % 3
    fb, rounds = fed(DROWeighting(truncate_zscore=0.5), groups=groups, steps=8)
    assert fb.params.group_threshold is not None
    np.testing.assert_array_equal(rounds[-1], fb.rule.probabilities(fb.table, fb.params))


def test_fingerprint_follows_table_rule_and_extra():
    a, _ = fed()
    b, _ = fed()
    assert a.fingerprint() == b.fingerprint() and isinstance(a.fingerprint(), int)
    assert a.fingerprint(b"x") != a.fingerprint() and a.fingerprint(b"x") == b.fingerprint(b"x")
    b.update([0], [1.0], 9)
    assert a.fingerprint() != b.fingerprint()
    c = RoundFeedback(a.table, DROWeighting(truncate_quantile=0.7))
    assert c.fingerprint() != a.fingerprint()
    assert -(2**63) <= a.fingerprint() < 2**63


def test_state_round_trip_resumes_identically(tmp_path):
    full, _ = fed(steps=10)
    half, _ = fed(steps=5, rounds_every=100)
    state = half.state_dict()
    assert set(state) == {"table", "rule"} and state["rule"] == half.rule.config()
    assert_plain_state(state)
    torch.save(state, tmp_path / "fb.pt")
    resumed = RoundFeedback(LossTable(N), DROWeighting(truncate_quantile=0.8))
    resumed.load_state_dict(torch.load(tmp_path / "fb.pt", weights_only=True))
    assert_state_equal(resumed.state_dict(), state)
    rng = np.random.default_rng(0)
    for step in range(10):  # the same batches the full run saw; feed the second half
        idx = rng.integers(0, N, 8)
        if step >= 5:
            resumed.update(idx, losses_of(idx, step), step)
    got, want = resumed.state_dict(), full.state_dict()
    assert set(want) - set(got) == {"params", "group_threshold"}  # the full run's last round: its cut is in force
    assert_state_equal({k: got[k] for k in ("table", "rule")}, {k: want[k] for k in ("table", "rule")})
    np.testing.assert_array_equal(resumed.round_probabilities(), full.round_probabilities())


def test_screen_judges_first_visits_by_the_round_in_force_and_a_reload_keeps_it(tmp_path):
    rule = DROWeighting(truncate_zscore=2.5)
    fb, _ = fed(rule, steps=4, rounds_every=100)
    unseen = np.flatnonzero(fb.table.counts == 0)[:2]
    seen = np.flatnonzero(fb.table.counts > 0)[:2]
    batch = np.concatenate([unseen, seen, unseen[:1]])
    losses = np.array([1e3, 1e-3, 1e3, 1e3, float("nan")])
    assert fb.screen(batch, losses).all()  # no round yet: no cut in force
    fb.round_probabilities()
    want = np.array([False, True, True, True, True])  # only a first visit above the cut; NaN is not judged
    np.testing.assert_array_equal(fb.screen(batch, losses), want)
    table_before = fb.table.state_dict()
    with pytest.raises(ValueError, match="indices and losses must have the same length"):
        fb.screen(batch, losses[:2])
    assert_state_equal(fb.table.state_dict(), table_before)  # read-only
    state = fb.state_dict()
    assert_plain_state(state)
    torch.save(state, tmp_path / "fb.pt")
    saved = torch.load(tmp_path / "fb.pt", weights_only=True)
    same = RoundFeedback(LossTable(N), DROWeighting(truncate_zscore=2.5))
    same.load_state_dict(saved)
    assert same.params == fb.params
    np.testing.assert_array_equal(same.screen(batch, losses), want)
    other = RoundFeedback(LossTable(N), DROWeighting(truncate_zscore=3.0))  # another rule: no cut in force
    other.load_state_dict(saved)
    assert other.params is None and other.screen(batch, losses).all()
    legacy = RoundFeedback(LossTable(N), DROWeighting(truncate_zscore=2.5))  # a state from before the params
    legacy.load_state_dict({"table": saved["table"], "rule": saved["rule"]})
    assert legacy.params is None
    bad = dict(saved, group_threshold=torch.zeros(3))  # per-group thresholds for a table without groups
    target = RoundFeedback(LossTable(N), DROWeighting(truncate_zscore=2.5))
    before = target.state_dict()
    with pytest.raises(ValueError, match="group_threshold"):
        target.load_state_dict(bad)
    assert_state_equal(target.state_dict(), before)  # nothing changed
    assert target.params is None


def test_load_keeps_its_own_rule_and_checks_the_saved_one():
    src, _ = fed()
    dst = RoundFeedback(LossTable(N), DROWeighting(temperature=2.0))
    dst.load_state_dict(src.state_dict())
    assert dst.rule == DROWeighting(temperature=2.0)
    np.testing.assert_array_equal(dst.table.counts, src.table.counts)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda fb: fb.update([0, N], [1.0, 1.0], 0), ValueError, rf"indices must lie in \[0, {N}\), got {N}"),
        (lambda fb: fb.update([-1], [1.0], 0), ValueError, r"indices must lie in \[0, 40\), got -1"),
        (lambda fb: fb.update([0.5], [1.0], 0), TypeError, "indices must hold integers, got dtype float64"),
        (lambda fb: fb.update([0, 1], [1.0], 0), ValueError, "same length, got 2 and 1"),
        (lambda fb: fb.update([0], ["a"], 0), TypeError, "losses must be real numbers"),
        (lambda fb: fb.update([0], [1.0], -3), ValueError, "step must lie in .*got -3"),
        (lambda fb: fb.update([0], [1.0], 1.5), TypeError, "step must be an int, got 1.5"),
        (lambda fb: fb.stats(np.ones(3) / 3), ValueError, rf"probabilities must have one entry per sample \({N}\), got 3"),
        (lambda fb: fb.fingerprint("x"), TypeError, "extra must be bytes, got str"),
        (lambda fb: fb.load_state_dict({"rule": {}}), ValueError, r"'table' entry, got \['rule'\]"),
        (lambda fb: fb.load_state_dict([1]), ValueError, "'table' entry, got list"),
        (lambda fb: fb.load_state_dict({**fb.state_dict(), "rule": {"temperature": 0.0}}), ValueError, "temperature"),
        (lambda fb: fb.load_state_dict({"table": LossTable(N + 1).state_dict()}), ValueError, f"num_samples.*{N + 1}"),
        (
            lambda fb: fb.load_state_dict({"table": {**fb.table.state_dict(), "counts": torch.full((N,), -1)}}),
            ValueError,
            r"counts.*got -1",
        ),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(call, error, match):
    fb, _ = fed()
    before = (fb.state_dict(), fb.params, fb.remeasured_cut, fb.readmitted)
    with pytest.raises(error, match=match):
        call(fb)
    assert_state_equal(fb.state_dict(), before[0])
    assert (fb.params, fb.remeasured_cut, fb.readmitted) == before[1:]


def test_constructor_checks_its_arguments():
    with pytest.raises(TypeError, match="table must be a LossTable, got int"):
        RoundFeedback(10)
    with pytest.raises(TypeError, match="rule must be a DROWeighting, got dict"):
        RoundFeedback(LossTable(3), {"temperature": 1.0})
    assert RoundFeedback(LossTable(3)).rule == DROWeighting()


def test_check_state_dict_without_knowing_the_size():
    fb, _ = fed()
    RoundFeedback.check_state_dict(fb.state_dict())
    RoundFeedback.check_state_dict({})  # entries are optional here
    with pytest.raises(ValueError, match="state must be a dict, got str"):
        RoundFeedback.check_state_dict("table")
    with pytest.raises(ValueError, match=r"state\['rule'\] must be a dict"):
        RoundFeedback.check_state_dict({"rule": "hot"})


def test_block_only_screen_judges_by_the_rounds_block_and_a_reload_keeps_it(tmp_path):
    n = 3000
    rng = np.random.default_rng(2)
    block = np.arange(n) % 10 == 0  # 10% unlearnable: a tight mode near 8, far above a log-normal bulk near 1
    losses = np.where(block, 8.0 + 0.05 * rng.standard_normal(n), np.exp(0.3 * rng.standard_normal(n)))
    fb = RoundFeedback(LossTable(n), DROWeighting())
    half = np.arange(n // 2)
    fb.update(half, losses[half], 0)
    fb.round_probabilities()
    assert 1.5 < fb.params.block_valley < losses[block].min()
    fresh = np.arange(n // 2, n)
    keep = fb.screen(fresh, losses[fresh], block_only=True)
    np.testing.assert_array_equal(keep, ~block[fresh])
    assert fb.screen(half, losses[half], block_only=True).all()  # seen samples are never screened
    torch.save(fb.state_dict(), tmp_path / "fb.pt")
    same = RoundFeedback(LossTable(n), DROWeighting())
    same.load_state_dict(torch.load(tmp_path / "fb.pt", weights_only=True))
    assert same.params.block_valley == fb.params.block_valley
    np.testing.assert_array_equal(same.screen(fresh, losses[fresh], block_only=True), keep)
    with pytest.raises(TypeError, match="block_only must be True or False"):
        fb.screen(fresh, losses[fresh], block_only=1)
