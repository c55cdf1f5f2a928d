"""DROWeighting(cut_learned_ratio=), 0.5 by default: the cut spares a sample whose running loss has fallen to that fraction of
its first loss (LossTable.first_losses), in the tree, the probabilities, the fit and a resumed run; the
column is saved, checked and loaded (states without it load with first = running loss). And
DROWeighting(cut_remeasured_only=True), off by default: the cut spares a sample still at its first loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _core_helpers import assert_state_equal, gloo_group, iter_batches, loss_of, roundtrip

from irdro_sampler import DROWeighting, IRDROSampler, LossTable
from irdro_sampler.weights import kept_mask

N = 1000


def _table(groups: bool = False) -> tuple[LossTable, np.ndarray]:
    """Every sample first seen at loss 1; then most fall to ~0.05, a tenth (the 'hard' ones) to 0.4 and a
    tenth (the 'noisy' ones) stay at 1.2. Returns the table and the hard ones' mask."""
    table = LossTable(N, ema=0.0, groups=np.arange(N) % 3 if groups else None, track_first_losses=True)
    table.update(np.arange(N), np.ones(N), step=0)
    rng = np.random.default_rng(0)
    later = rng.uniform(0.03, 0.07, N)
    hard = np.arange(N) % 10 == 0
    later[hard] = 0.4
    later[np.arange(N) % 10 == 5] = 1.2
    table.update(np.arange(N), later, step=1)
    return table, hard


def test_first_losses_are_the_first_observation():
    untracked = LossTable(5, track_first_losses=False)
    assert untracked.first_losses is None and untracked.nbytes == 5 * 12
    table = LossTable(5, ema=0.5)  # kept by default
    assert np.isnan(table.first_losses).all() and table.nbytes == 5 * 16
    table.update([1, 1, 3], [2.0, 4.0, 1.0], step=0)  # repeated index: its mean is its first loss
    table.update([1, 2], [0.5, 7.0], step=1)
    np.testing.assert_array_equal(table.first_losses, np.array([np.nan, 3.0, 7.0, 1.0, np.nan], np.float32))
    assert table.losses[1] == np.float32(1.75)  # the running loss moved on; the first loss did not


@pytest.mark.parametrize("groups", [False, True])
def test_the_gate_spares_samples_being_learned(groups):
    table, hard = _table(groups)
    # The learned gate alone: the split's own gate (the default cut_rule's, with groups) is tested in test_split_gated.py.
    plain = DROWeighting(cut_learned_ratio=None, cut_rule="zscore-mode").fit(table)
    gated = DROWeighting(cut_learned_ratio=0.5, cut_rule="zscore-mode").fit(table)
    losses, g = table.losses, table.groups
    cut_plain = ~kept_mask(losses, plain, g)
    cut_gated = ~kept_mask(losses, gated, g, table.first_losses)
    assert cut_plain[hard].all()  # the z-score alone cuts the hard samples (0.4 against a bulk at 0.05)
    assert not cut_gated[hard].any()  # 0.4 <= 0.5 * 1: being learned
    noisy = np.arange(N) % 10 == 5
    assert cut_gated[noisy].all() and cut_gated.sum() == noisy.sum()  # 1.2 > 0.5 * 1: still cut
    # Probabilities: the spared samples get their tilted mass, the tree draws with the same distribution.
    p = DROWeighting(cut_learned_ratio=0.5, cut_rule="zscore-mode").probabilities(table)
    assert p[hard].min() > p[~hard & ~noisy].max()
    with pytest.raises(ValueError, match="first losses"):
        kept_mask(losses, gated, g)  # a gated fit needs the first losses
    with pytest.raises(ValueError, match=r"cut_learned_ratio=0.5 needs a LossTable that keeps first losses"):
        DROWeighting(cut_learned_ratio=0.5).fit(LossTable(N, track_first_losses=False))


def test_negative_or_unseen_first_losses_spare_nothing():
    table = LossTable(4, ema=0.0, track_first_losses=True)
    table.update([0, 1, 2], [-2.0, 1.0, 1.0], step=0)
    table.update([0, 1, 2], [-3.0, 0.2, 0.9], step=1)
    params = DROWeighting(cut_learned_ratio=0.5).fit(table)._replace(threshold=-10.0)
    kept = kept_mask(table.losses, params, None, table.first_losses)
    np.testing.assert_array_equal(kept, [False, True, False, True])  # unseen sample 3 is never cut


def test_config_fingerprint_and_bad_values():
    assert DROWeighting().cut_learned_ratio == 0.5 and DROWeighting().config()["cut_learned_ratio"] == 0.5
    off = DROWeighting(cut_learned_ratio=None)
    assert "cut_learned_ratio" not in off.config()  # the config of versions before the gate
    assert DROWeighting.from_config(off.config()) == off  # a config without it loads with the gate off
    assert DROWeighting.from_config(DROWeighting().config()) == DROWeighting()
    s = IRDROSampler(100, 10, seed=0)
    assert s.table.first_losses is not None
    # Kept only when used: the default cut_rule's split reads them too (its own gate), so the rule without either.
    ungated = IRDROSampler(100, 10, seed=0, cut_learned_ratio=None, cut_rule="zscore-mode")
    assert ungated.table.first_losses is None and s.nbytes - ungated.nbytes == 4 * 100
    assert IRDROSampler(100, 10, seed=0, cut_learned_ratio=None).table.first_losses is not None
    assert s.fingerprint() != ungated.fingerprint()
    for bad in (0.0, 1.0, -0.5, 1.5, math.nan, "half", True):
        with pytest.raises((ValueError, TypeError), match="cut_learned_ratio"):
            DROWeighting(cut_learned_ratio=bad)
        with pytest.raises((ValueError, TypeError), match="cut_learned_ratio"):
            IRDROSampler(100, 10, cut_learned_ratio=bad)


def test_remeasured_only_spares_samples_measured_once():
    """Every sample is measured once at a loss with a high tail; with only the remeasure gate nothing is cut.
    Then half are measured again: those still high are cut, the others (and the negative ones) are not."""
    table = LossTable(N, ema=0.0, track_first_losses=True)
    high = np.isin(np.arange(N) % 20, (0, 5))  # even and odd ones
    table.update(np.arange(N), np.where(high, 5.0, np.linspace(0.5, 1.5, N)), step=0)
    table.update([1], [-2.0], step=0)
    rule = DROWeighting(cut_learned_ratio=None, cut_remeasured_only=True)
    params = rule.fit(table)
    assert params.remeasured_only and params.learned_ratio is None and math.isfinite(params.threshold)
    assert kept_mask(table.losses, params, None, table.first_losses).all()  # measured once: no evidence yet
    plain = ~kept_mask(table.losses, params._replace(remeasured_only=False))
    assert plain[high].all()  # without the gate the high tail is cut
    again = np.arange(0, N, 2)
    table.update(again, np.where(high[again], 4.9, 0.4), step=1)
    params = rule.fit(table)
    cut = ~kept_mask(table.losses, params, None, table.first_losses)
    np.testing.assert_array_equal(cut, high & (np.arange(N) % 2 == 0))  # re-measured and still high
    assert rule.probabilities(table)[cut].max() < rule.probabilities(table)[high & ~cut].min()
    # With the ratio gate as well: a re-measured high sample that halved is spared too.
    both = DROWeighting(cut_learned_ratio=0.5, cut_remeasured_only=True)
    table.update([20], [2.0], step=2)  # 5.0 -> 2.0: at most half
    kept = kept_mask(table.losses, both.fit(table), None, table.first_losses)
    assert kept[20] and not kept[40] and kept[45]


def test_remeasured_only_config_and_bad_values():
    assert DROWeighting().cut_remeasured_only is False and "cut_remeasured_only" not in DROWeighting().config()
    on = DROWeighting(cut_remeasured_only=True)
    assert on.config()["cut_remeasured_only"] is True and DROWeighting.from_config(on.config()) == on
    assert DROWeighting.from_config(DROWeighting(cut_learned_ratio=None).config()).cut_remeasured_only is False
    s = IRDROSampler(100, 10, seed=0, cut_learned_ratio=None, cut_remeasured_only=True)
    assert s.table.first_losses is not None  # kept: the gate reads them
    assert s.fingerprint() != IRDROSampler(100, 10, seed=0, cut_learned_ratio=None).fingerprint()
    for bad in (1, 0, "yes", None, 1.0):
        with pytest.raises(ValueError, match=f"cut_remeasured_only must be True or False, got {bad!r}"):
            DROWeighting(cut_remeasured_only=bad)
        with pytest.raises(ValueError, match="cut_remeasured_only"):
            IRDROSampler(100, 10, cut_remeasured_only=bad)
    with pytest.raises(ValueError, match=r"cut_remeasured_only=True needs a LossTable that keeps first losses"):
        DROWeighting(cut_learned_ratio=None, cut_remeasured_only=True).fit(LossTable(N, track_first_losses=False))




def test_table_state_saves_checks_and_loads_the_column():
    table, _ = _table()
    state = roundtrip(table.state_dict())
    fresh = LossTable(N, track_first_losses=True)
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh.first_losses, table.first_losses)
    old = {k: v for k, v in state.items() if k != "first_losses"}  # a state of a table that kept none
    fresh.load_state_dict(old)
    np.testing.assert_array_equal(fresh.first_losses, table.losses)  # kept on, from the running losses
    untracked = LossTable(N, track_first_losses=False)
    untracked.load_state_dict(old)
    assert untracked.first_losses is None and "first_losses" not in untracked.state_dict()
    bad = dict(state, first_losses=state["first_losses"].clone())
    bad["first_losses"][7] = math.inf
    kept = fresh.first_losses.copy()
    with pytest.raises(ValueError, match=r"first_losses.*inf"):
        fresh.load_state_dict(bad)
    np.testing.assert_array_equal(fresh.first_losses, kept)  # nothing changed
    with pytest.raises(ValueError, match="first_losses"):
        fresh.load_state_dict(dict(state, first_losses=torch.zeros(3)))


def _falling_loss(ids: np.ndarray, step: int) -> np.ndarray:
    """loss_of, with every 13th sample 30x as high; of those, the even ones are being learned (their loss
    halves every 4 steps down to 0.2 of that, still far above the others)."""
    ids = np.asarray(ids)
    learned = np.where(ids % 2 == 0, max(0.2, 0.5 ** (step / 4.0)), 1.0)
    return loss_of(ids, step) * np.where(ids % 13 == 0, 30.0 * learned, 1.0)


def _run(
    sampler: IRDROSampler, steps: range, save_after: int | None = None, spared: list | None = None
) -> tuple[dict, dict | None]:
    """Train over ``steps`` (epochs of ``batches_per_epoch`` steps), resuming mid-epoch at ``steps.start``;
    ``spared`` collects, after each step, how many samples the gates keep that the cut alone would not."""
    batches, saved = {}, None
    step = steps.start
    while step < steps.stop:
        epoch, b = divmod(step, sampler.batches_per_epoch)
        sampler.set_epoch(epoch)
        if b:
            sampler.set_start_batch(b)
        for batch in iter_batches(sampler):
            if step >= steps.stop:
                break
            batches[step] = batch
            sampler.update(batch, _falling_loss(batch, step), step=step)
            if spared is not None and sampler.order.weights.params is not None:
                spared.append(int(_spared(sampler.order.weights.params, sampler.table).sum()))
            if step == save_after:
                saved = roundtrip(sampler.state_dict())
            step += 1
    return batches, saved


GATES = {"learned": dict(cut_learned_ratio=0.5), "remeasured": dict(cut_learned_ratio=None, cut_remeasured_only=True)}
UNGATED = dict(cut_learned_ratio=None, cut_remeasured_only=False)


def _spared(params, table) -> np.ndarray:
    """Samples the gates keep that the cut alone would not."""
    ungated = params._replace(learned_ratio=None, remeasured_only=False)
    return ~kept_mask(table.losses, ungated, table.groups) & kept_mask(table.losses, params, table.groups,
                                                                         table.first_losses)


@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("draws", ["balanced", "iid"])
def test_resume_with_the_gate_and_tree_agrees_with_probabilities(draws, gate):
    def make(**kw):
        # A high floor and no averaging, so cut samples are re-measured often enough in 40 steps.
        return IRDROSampler(200, 20, seed=3, refresh_interval=3, feedback_delay=1, draws=draws, uniform_mix=0.5,
                            ema=0.0, **kw)

    s = make(**GATES[gate])
    spared: list[int] = []
    full, state = _run(s, range(40), save_after=23, spared=spared)
    assert sum(spared) > 0  # the gate is at work in this run
    params = s.order.weights.params
    np.testing.assert_allclose(s.probabilities(), s.rule.probabilities(s.table, params), rtol=1e-12)
    assert {k: state["rule"][k] for k in GATES[gate] if k in state["rule"]} == {k: v for k, v in GATES[gate].items() if v}
    fresh = make(**UNGATED)  # the state brings its rule, gate included
    fresh.load_state_dict(state)
    assert fresh.rule == s.rule
    assert_state_equal(fresh.state_dict(), state)
    cont, _ = _run(fresh, range(24, 40))
    assert all(np.array_equal(cont[k], full[k]) for k in range(24, 40))
    plain_batches, _ = _run(make(**UNGATED), range(40))
    assert any(not np.array_equal(plain_batches[k], full[k]) for k in range(40))  # the gate changed the draws


# ------------------------------------------------------------------------------------- sharded over ranks
SHARDED_N, SHARDED_BATCH, SHARDED_STEPS, SHARDED_SAVE = 200, 20, 40, 23
# The tilt's fade (tilt_fade_cut) off: the scenario was built before it, so that the gates spare samples here.
SHARDED_OPTS = dict(seed=3, refresh_interval=3, feedback_delay=1, uniform_mix=0.5, ema=0.0, tilt_fade_cut=None)


def _sharded_worker(rank: int, world: int, port: int, results, folder: str, gate: str) -> None:
    from _core_helpers import train_sharded_steps

    from irdro_sampler.sharded_sampler import ShardedIRDROSampler

    with gloo_group(rank, world, port):
        def make() -> ShardedIRDROSampler:
            return ShardedIRDROSampler(SHARDED_N, SHARDED_BATCH // world, num_shards=8, **SHARDED_OPTS, **GATES[gate])

        def steps(s: ShardedIRDROSampler, first: int, last: int) -> list[np.ndarray]:
            return train_sharded_steps(s, first, last, _falling_loss)

        s = make()
        before = steps(s, 0, SHARDED_SAVE + 1)
        s.save(folder)
        after = steps(s, SHARDED_SAVE + 1, SHARDED_STEPS)
        resumed = make()
        resumed.load(folder)
        results[rank] = (before, after, s.local_probabilities(), steps(resumed, SHARDED_SAVE + 1, SHARDED_STEPS),
                         resumed.local_probabilities())


@pytest.mark.slow
@pytest.mark.parametrize("gate", list(GATES))
def test_sharded_over_two_ranks_equals_the_unsharded_sampler_and_resumes(tmp_path, gate):
    """The sharded sampler gathers the first losses for its fit and saves them in its row files: on 2 gloo
    ranks its distribution equals the unsharded sampler's fed the same feedback, and a run resumed from
    its files draws the same batches."""
    from _core_helpers import spawn_gloo

    out = spawn_gloo(_sharded_worker, 2, str(tmp_path / "state"), gate)
    batches = out[0][0] + out[0][1]
    assert all(np.array_equal(a, b) for r in out for a, b in zip(r[0] + r[1], batches, strict=True))
    assert all(np.array_equal(a, b) for r in out for a, b in zip(r[3], out[0][1], strict=True))
    ref = IRDROSampler(SHARDED_N, SHARDED_BATCH, draws="iid", **SHARDED_OPTS, **GATES[gate])
    for b, ids in enumerate(batches):
        ref.order.advance_to(b)
        ref.update(ids, _falling_loss(ids, b), step=b)
    probs = ref.probabilities()
    sharded = np.concatenate([out[0][2], out[1][2]])
    np.testing.assert_allclose(sharded, probs, rtol=1e-9)
    np.testing.assert_allclose(np.concatenate([out[0][4], out[1][4]]), probs, rtol=1e-9)
    assert _spared(ref.order.weights.params, ref.table).any()  # the gate decides some samples' masses here
