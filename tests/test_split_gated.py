"""``cut_rule="zscore-mode-split-gated"`` (issue 18): per group the ``"zscore-mode"`` cut, and the split of
``"zscore-mode-split-majority"`` as a second threshold (``WeightParams.group_split``) that takes a sample only
while its running loss has not fallen below its first loss. Wrong labels whose loss rises are cut at the split;
high samples whose loss is falling (being learned) are spared; without groups the rule is ``"zscore-mode"``;
the thresholds are part of the sampler's state and a resumed run draws the same batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _core_helpers import assert_state_equal, roundtrip, run_steps

from irdro_sampler import DROWeighting, IRDROSampler, LossTable
from irdro_sampler.cut_rules import (
    SPLIT_GROUP_QUANTILE,
    group_cut_thresholds,
    group_split_thresholds,
    loss_split,
)
from irdro_sampler.weights import kept_mask

RULE = "zscore-mode-split-gated"
N = 960
GROUPS = np.repeat([0, 1, 2], [450, 450, 60])


def _losses() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Groups 0 and 1: a bulk with a tight high mode of 25% (wrong labels: so many widen the group's MAD and its
    z-score misses most of them); half of the mode is falling (loss 0.7 of its first), half rising (1.2 of its first).
    Group 2: a rare group whose losses all sit high (its median above the split). Returns ``loss, first, mode,
    falling``."""
    rng = np.random.default_rng(4)
    mode = np.zeros(N, dtype=bool)
    mode[:900] = rng.random(900) < 0.25
    loss = np.where(mode, rng.lognormal(1.0, 0.15, N), rng.lognormal(-0.5, 0.7, N))
    loss[GROUPS == 2] = rng.lognormal(1.0, 0.3, 60)
    falling = mode & (np.arange(N) % 2 == 0)
    first = np.where(falling, loss / 0.7, np.where(mode, loss / 1.2, loss))
    return loss, first, mode, falling


def _table(loss: np.ndarray, first: np.ndarray, groups: np.ndarray | None) -> LossTable:
    table = LossTable(N, ema=0.0, groups=groups, track_first_losses=True)
    ids = np.arange(N)
    table.update(ids, first.astype(np.float32))
    table.update(ids, loss.astype(np.float32), step=1)
    return table


def test_the_split_cuts_rising_losses_and_spares_falling_ones() -> None:
    loss, first, mode, falling = _losses()
    table = _table(loss, first, GROUPS)
    params = DROWeighting(cut_rule=RULE).fit(table)
    kept = kept_mask(table.losses, params, table.groups, table.first_losses)
    z_only = group_cut_thresholds(loss, GROUPS, num_groups=3, truncate_zscore=3.5, cut_rule="zscore-mode")
    assert np.mean(loss[mode] > z_only[GROUPS[mode]]) <= 0.25  # the z-score alone misses most of the mode
    split = loss_split(loss)
    assert math.isfinite(split) and np.all(params.group_split[:2] <= 1.0001 * split)
    assert params.group_split[2] == math.inf  # the rare group sits above the split as a whole: not split
    assert np.mean(~kept[mode & ~falling]) >= 0.99  # rising: cut
    z_kept = loss <= z_only[GROUPS]
    assert kept[falling & z_kept].all()  # falling (0.7 of the first, above the default gate's 0.5): spared
    assert kept[falling].mean() >= 0.75
    assert kept[GROUPS == 2].mean() >= 0.95
    bulk = ~mode & (GROUPS < 2)
    assert np.mean(~kept[bulk]) <= 0.05  # the bulk's top above the split, measured once (its first loss)


def test_it_is_the_majority_split_with_the_falling_samples_spared() -> None:
    """Kept under the gated rule = kept under ``"zscore-mode-split-majority"``, plus the samples only the split
    cut there whose loss is below their first."""
    loss, first, mode, falling = _losses()
    table = _table(loss, first, GROUPS)
    gated = DROWeighting(cut_rule=RULE).fit(table)
    majority = DROWeighting(cut_rule="zscore-mode-split-majority").fit(table)
    plain = DROWeighting(cut_rule="zscore-mode").fit(table)
    kept_g, kept_m, kept_p = (kept_mask(table.losses, p, table.groups, table.first_losses)
                              for p in (gated, majority, plain))
    np.testing.assert_array_equal(gated.group_threshold, plain.group_threshold)
    np.testing.assert_array_equal(kept_g, kept_m | (kept_p & (table.losses < table.first_losses)))
    assert (kept_g & ~kept_m).sum() >= 80 and (~kept_g).sum() >= 80  # both sides at work here
    expected = group_split_thresholds(loss, GROUPS, num_groups=3)
    np.testing.assert_allclose(gated.group_split, expected, rtol=1e-6)
    assert expected[0] >= np.quantile(loss[GROUPS == 0], SPLIT_GROUP_QUANTILE) or expected[0] >= loss_split(loss)


def test_without_groups_it_is_zscore_mode() -> None:
    loss, first, _, _ = _losses()
    table = _table(loss, first, None)
    gated, plain = DROWeighting(cut_rule=RULE), DROWeighting(cut_rule="zscore-mode")
    assert gated.fit(table) == plain.fit(table)
    np.testing.assert_array_equal(gated.probabilities(table), plain.probabilities(table))


def test_the_rule_reads_first_losses_and_names_itself_when_the_table_has_none() -> None:
    rule = DROWeighting(cut_rule=RULE, cut_learned_ratio=None)
    assert rule.reads_first_losses and rule.gates_split
    assert not DROWeighting(cut_rule=RULE, truncate_zscore=None, cut_learned_ratio=None).reads_first_losses
    with pytest.raises(ValueError, match="cut_rule='zscore-mode-split-gated'.*track_first_losses"):
        rule.fit(LossTable(N, groups=GROUPS, track_first_losses=False))
    assert DROWeighting.from_config(rule.config()) == rule


# ------------------------------------------------------------------------------------------ sampler state
SAMPLER_N, BATCH = 300, 20
SAMPLER_GROUPS = np.arange(SAMPLER_N) % 3


def _sampler_loss(ids: list[int], step: int) -> np.ndarray:
    """A bulk near 0.6; every fourth sample (in every group) a mode near 3.3, rising with the step or (every
    eighth) falling slowly: the split finds the mode, the z-score of its groups misses part of it."""
    ids = np.asarray(ids)
    bulk = np.exp(-0.5 + 0.5 * np.sin(ids * 1.7))
    mode = ids % 4 == 0
    drift = np.where(ids % 8 == 4, 1.0 + step / 50.0, 0.995 ** step)
    return np.where(mode, np.exp(1.2 + 0.1 * np.cos(ids)) * drift, bulk)


def _make(**kw) -> IRDROSampler:
    return IRDROSampler(SAMPLER_N, BATCH, seed=5, groups=SAMPLER_GROUPS, refresh_interval=3, feedback_delay=1,
                        uniform_mix=0.5, ema=0.0, cut_rule=RULE, **kw)


def _run(sampler: IRDROSampler, first: int, last: int, save_after: int | None = None) -> tuple[dict, dict | None]:
    return run_steps(sampler, range(first, last), _sampler_loss, save_after)


def test_a_resumed_run_draws_the_same_batches_and_bad_split_states_are_refused() -> None:
    s = _make()
    full, state = _run(s, 0, 60, save_after=40)
    assert "group_split" in state and np.isfinite(state["group_split"].numpy()).any()  # the split is at work
    params = s.order.weights.params
    np.testing.assert_allclose(s.probabilities(), s.rule.probabilities(s.table, params), rtol=1e-12)
    fresh = _make()
    fresh.load_state_dict(state)
    assert_state_equal(fresh.state_dict(), state)
    cont, _ = _run(fresh, 41, 60)
    assert all(np.array_equal(cont[k], full[k]) for k in range(41, 60))
    majority, _ = _run(IRDROSampler(SAMPLER_N, BATCH, seed=5, groups=SAMPLER_GROUPS, refresh_interval=3,
                                    feedback_delay=1, uniform_mix=0.5, ema=0.0,
                                    cut_rule="zscore-mode-split-majority"), 0, 60)
    assert any(not np.array_equal(majority[k], full[k]) for k in range(60))  # the gate changed the draws
    nan = state["group_split"].clone()
    nan[0] = float("nan")
    for bad, match in [({**state, "group_split": nan}, "group_split"),
                       ({**state, "group_split": state["group_split"][:2]}, "group_split"),
                       ({k: v for k, v in state.items() if k != "group_split"}, "group_split.*missing")]:
        target = _make()
        before = roundtrip(target.state_dict())
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(bad)
        assert_state_equal(target.state_dict(), before)  # refused before anything changed
    other = {**state, "rule": {**state["rule"], "cut_rule": "zscore-mode"}}
    with pytest.raises(ValueError, match="group_split"):
        _make().load_state_dict(other)


def test_without_groups_the_default_sampler_draws_as_zscore_mode_did() -> None:
    """The default became the gated split (issue 18); a run without groups is the same run as before it."""
    def run(**kw) -> dict:
        s = IRDROSampler(SAMPLER_N, BATCH, seed=5, refresh_interval=3, feedback_delay=1, uniform_mix=0.5, ema=0.0,
                         **kw)
        return _run(s, 0, 45)[0]

    now, before = run(), run(cut_rule="zscore-mode")
    assert DROWeighting().cut_rule == RULE
    assert all(np.array_equal(now[k], before[k]) for k in range(45))


# ------------------------------------------------------------------------------------- sharded over ranks
SHARDED_STEPS, SHARDED_SAVE = 45, 30
SHARDED_OPTS = dict(seed=5, refresh_interval=3, feedback_delay=1, uniform_mix=0.5, ema=0.0, cut_rule=RULE)


def _sharded_groups(start: int, stop: int) -> np.ndarray:
    return np.arange(start, stop) % 3


def _sharded_worker(rank: int, world: int, port: int, results, folder: str) -> None:
    from _core_helpers import gloo_group, train_sharded_steps

    from irdro_sampler.sharded_sampler import ShardedIRDROSampler

    with gloo_group(rank, world, port):
        def make() -> ShardedIRDROSampler:
            return ShardedIRDROSampler(SAMPLER_N, BATCH // world, num_shards=4, groups=_sharded_groups,
                                       **SHARDED_OPTS)

        s = make()
        before = train_sharded_steps(s, 0, SHARDED_SAVE + 1, _sampler_loss)
        split = None if s.params.group_split is None else s.params.group_split.copy()
        s.save(folder)
        after = train_sharded_steps(s, SHARDED_SAVE + 1, SHARDED_STEPS, _sampler_loss)
        resumed = make()
        resumed.load(folder)
        results[rank] = (before, after, s.local_probabilities(), split,
                         train_sharded_steps(resumed, SHARDED_SAVE + 1, SHARDED_STEPS, _sampler_loss),
                         resumed.local_probabilities())


@pytest.mark.slow
def test_sharded_over_two_ranks_equals_the_unsharded_sampler_and_resumes(tmp_path) -> None:
    """The split's thresholds are fitted from the gathered calibration sample on every rank and saved with the
    sharded state: on 2 gloo ranks the distribution equals the unsharded sampler's fed the same feedback, and a run
    resumed from its files draws the same batches."""
    from _core_helpers import spawn_gloo

    out = spawn_gloo(_sharded_worker, 2, str(tmp_path / "state"))
    batches = out[0][0] + out[0][1]
    assert all(np.array_equal(a, b) for r in out for a, b in zip(r[0] + r[1], batches, strict=True))
    assert all(np.array_equal(a, b) for r in out for a, b in zip(r[4], out[0][1], strict=True))
    assert out[0][3] is not None and np.isfinite(out[0][3]).any()  # the split was at work when saved
    np.testing.assert_array_equal(out[0][3], out[1][3])
    ref = IRDROSampler(SAMPLER_N, BATCH, draws="iid", groups=_sharded_groups(0, SAMPLER_N), **SHARDED_OPTS)
    for b, ids in enumerate(batches):
        ref.order.advance_to(b)
        ref.update(ids, _sampler_loss(ids, b), step=b)
    probs = ref.probabilities()
    np.testing.assert_allclose(np.concatenate([out[0][2], out[1][2]]), probs, rtol=1e-9)
    np.testing.assert_allclose(np.concatenate([out[0][5], out[1][5]]), probs, rtol=1e-9)
