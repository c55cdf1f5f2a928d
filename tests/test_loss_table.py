"""LossTable: EMA semantics, duplicates, non-finite losses, prior, state, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _core_helpers import assert_plain_state, assert_state_equal, effective_losses

from irdro_sampler import LossTable


def f32(x):
    return float(np.float32(x))


def test_initial_state():
    t = LossTable(5)
    assert len(t) == 5
    assert np.all(np.isnan(t.losses)) and t.losses.dtype == np.float32
    assert np.all(t.counts == 0) and t.counts.dtype == np.uint32
    assert np.all(t.last_step == -1) and t.last_step.dtype == np.int32
    assert t.num_seen == 0 and t.num_skipped == 0
    assert not (t.counts > 0).any()
    assert math.isnan(t.mean_loss())
    assert t.prior_value() == 0.0


def test_first_observation_stored_as_is_then_ema():
    t = LossTable(4, ema=0.75)
    t.update([1], [2.0], step=3)
    assert t.losses[1] == np.float32(2.0)
    t.update([1], [6.0], step=4)
    assert t.losses[1] == np.float32(0.75 * 2.0 + 0.25 * 6.0)  # 3.0: ema weights the OLD value
    t.update([1], [0.0], step=5)
    assert t.losses[1] == np.float32(0.75 * 3.0)
    assert t.counts[1] == 3 and t.last_step[1] == 5
    assert np.isnan(t.losses[[0, 2, 3]]).all() and np.all(t.counts[[0, 2, 3]] == 0)
    assert np.all(t.last_step[[0, 2, 3]] == -1)
    assert t.num_seen == 1


def test_ema_zero_keeps_last_value():
    t = LossTable(3, ema=0.0)
    for v in (5.0, 1.25, 7.5):
        t.update([2], [v], step=0)
        assert t.losses[2] == np.float32(v)


def test_ema_sequence_matches_reference():
    rng = np.random.default_rng(0)
    ema = 0.9
    t = LossTable(20, ema=ema)
    ref = np.full(20, np.nan)
    for step in range(200):
        idx = rng.choice(20, size=5, replace=False)
        val = rng.exponential(size=5)
        t.update(idx, val, step=step)
        for i, v in zip(idx, val, strict=True):
            ref[i] = v if np.isnan(ref[i]) else ema * float(ref[i]) + (1 - ema) * float(v)
            ref[i] = np.float32(ref[i])
    np.testing.assert_array_equal(t.losses, ref.astype(np.float32))


def test_duplicates_in_one_update_are_averaged_and_counted_once():
    t = LossTable(5, ema=0.5)
    t.update([3, 3, 3, 1], [1.0, 2.0, 6.0, 4.0], step=7)
    assert t.losses[3] == np.float32(3.0)  # first observation: the mean
    assert t.losses[1] == np.float32(4.0)
    assert t.counts[3] == 1 and t.last_step[3] == 7
    t.update([3, 3], [10.0, 0.0], step=8)
    assert t.losses[3] == np.float32(0.5 * 3.0 + 0.5 * 5.0)
    assert t.counts[3] == 2


def test_duplicates_order_independent():
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 10, size=200)
    val = rng.normal(size=200)
    a, b = LossTable(10), LossTable(10)
    a.update(idx, val)
    perm = rng.permutation(200)
    b.update(idx[perm], val[perm])
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-6)
    np.testing.assert_array_equal(a.counts, b.counts)
    # And the same call twice gives bitwise the same table.
    c = LossTable(10)
    c.update(idx, val)
    np.testing.assert_array_equal(a.losses, c.losses)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_losses_skipped_counted_never_stored(bad):
    t = LossTable(4, ema=0.5)
    t.update([0, 1], [1.0, 2.0], step=0)
    t.update([0, 1, 2], [bad, 4.0, bad], step=1)
    assert t.num_skipped == 2
    assert t.losses[0] == np.float32(1.0) and t.counts[0] == 1 and t.last_step[0] == 0
    assert t.losses[1] == np.float32(3.0) and t.counts[1] == 2 and t.last_step[1] == 1
    assert np.isnan(t.losses[2]) and t.counts[2] == 0 and t.last_step[2] == -1
    assert t.num_seen == 2
    assert np.all(np.isfinite(t.losses[(t.counts > 0)]))
    # A duplicate with one finite and one non-finite loss keeps only the finite one.
    t.update([3, 3], [bad, 8.0], step=2)
    assert t.losses[3] == np.float32(8.0) and t.num_skipped == 3


def test_counts_saturate_instead_of_wrapping():
    t = LossTable(2)
    t.update([0], [1.0])
    t.counts[0] = np.iinfo(np.uint32).max
    t.update([0], [1.0])
    assert t.counts[0] == np.iinfo(np.uint32).max


def test_prior_mean_and_fixed():
    t = LossTable(4)
    t.update([0, 1], [1.0, 3.0])
    assert t.prior_value() == 2.0
    np.testing.assert_array_equal(effective_losses(t), [1.0, 3.0, 2.0, 2.0])
    np.testing.assert_array_equal(effective_losses(t, prior=9.0), [1.0, 3.0, 9.0, 9.0])
    assert t.mean_loss() == 2.0
    fixed = LossTable(3, prior=5.5)
    fixed.update([0], [1.0])
    assert fixed.prior_value() == 5.5
    np.testing.assert_array_equal(effective_losses(fixed), [1.0, 5.5, 5.5])


@pytest.mark.parametrize("prior", ["median", float("nan"), float("inf"), True, None])
def test_bad_prior(prior):
    with pytest.raises(ValueError, match="prior"):
        LossTable(3, prior=prior)


@pytest.mark.parametrize(("kwargs", "name"), [({"ema": 1.0}, "ema"), ({"ema": -0.1}, "ema")])
def test_bad_ema(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LossTable(3, **kwargs)


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_dataset_size(n):
    with pytest.raises(ValueError, match="dataset_size"):
        LossTable(n)


def test_tensor_input():
    t = LossTable(6)
    t.update(torch.tensor([5, 2]), torch.tensor([0.5, 1.5], dtype=torch.bfloat16).float(), step=torch.tensor(3))
    assert t.losses[5] == np.float32(0.5) and t.losses[2] == np.float32(1.5)
    assert t.last_step[5] == 3


def _snapshot(t: LossTable):
    return (t.losses.copy(), t.counts.copy(), t.last_step.copy(), t.num_seen, t.num_skipped)


@pytest.mark.parametrize(
    ("indices", "losses", "step", "exc", "needle"),
    [
        ([0, 7], [1.0, 2.0], 0, ValueError, "indices"),  # out of range
        ([-1, 0], [1.0, 2.0], 0, ValueError, "indices"),
        ([0.0, 1.0], [1.0, 2.0], 0, TypeError, "indices"),
        ([True, False], [1.0, 2.0], 0, TypeError, "indices"),
        ([0, 1], [1.0], 0, ValueError, "length"),
        ([[0, 1]], [[1.0, 2.0]], 0, ValueError, "indices"),
        ([0, 1], ["a", "b"], 0, TypeError, "losses"),
        ([0, 1], [1.0, float("nan")], -1, ValueError, "step"),
        ([0, 1], [1.0, float("nan")], 1.5, TypeError, "step"),
    ],
)
def test_rejected_update_changes_nothing(indices, losses, step, exc, needle):
    t = LossTable(5)
    t.update([0, 1, 2], [1.0, 2.0, float("nan")], step=0)
    before = _snapshot(t)
    with pytest.raises(exc, match=needle):
        t.update(indices, losses, step=step)
    after = _snapshot(t)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_error_names_value():
    t = LossTable(5)
    with pytest.raises(ValueError, match=r"indices.*\[0, 5\).*7"):
        t.update([0, 7], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"2 and 1"):
        t.update([0, 1], [1.0])


def test_state_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    t = LossTable(50, ema=0.3, prior=1.5)
    for step in range(20):
        t.update(rng.integers(0, 50, 8), np.where(rng.random(8) < 0.1, np.nan, rng.random(8)), step=step)
    sd = t.state_dict()
    assert_plain_state(sd)
    path = tmp_path / "t.pt"
    torch.save(sd, path)
    sd2 = torch.load(path, weights_only=True)
    u = LossTable(50)
    u.load_state_dict(sd2)
    assert u.ema == 0.3 and u.prior == 1.5
    np.testing.assert_array_equal(u.losses, t.losses)
    np.testing.assert_array_equal(u.counts, t.counts)
    np.testing.assert_array_equal(u.last_step, t.last_step)
    assert u.losses.dtype == np.float32 and u.counts.dtype == np.uint32 and u.last_step.dtype == np.int32
    assert u.num_seen == t.num_seen and u.num_skipped == t.num_skipped > 0
    assert_state_equal(u.state_dict(), sd)
    # Loaded arrays are copies: updating the loaded table does not touch the state.
    u.update([0], [100.0], step=99)
    assert_state_equal(t.state_dict(), sd)


def test_state_size_mismatch_raises_and_changes_nothing():
    t = LossTable(10)
    t.update([1], [2.0])
    before = t.state_dict()
    other = LossTable(11).state_dict()
    with pytest.raises(ValueError, match="dataset_size"):
        t.load_state_dict(other)
    assert_state_equal(t.state_dict(), before)
    bad = dict(before)
    bad["losses"] = torch.zeros(9)
    with pytest.raises(ValueError, match="losses"):
        t.load_state_dict(bad)
    assert_state_equal(t.state_dict(), before)


def test_saved_state_holds_no_nan_and_marks_unseen_by_count():
    """Unseen samples are saved as 0.0 (counts == 0 says unseen): NaN != NaN would make two identical
    states compare unequal under torch.equal / allclose(atol=0, rtol=0)."""
    t = LossTable(6, ema=0.5)
    t.update([1, 4], [2.5, 0.0], step=3)  # a seen sample whose loss is exactly 0.0 stays seen
    sd = t.state_dict()
    assert not torch.isnan(sd["losses"]).any()
    assert sd["losses"].tolist() == [0.0, 2.5, 0.0, 0.0, 0.0, 0.0]
    assert sd["counts"].tolist() == [0, 1, 0, 0, 1, 0]
    assert torch.equal(sd["losses"], t.state_dict()["losses"])
    assert torch.allclose(sd["losses"], t.state_dict()["losses"], rtol=0, atol=0)
    back = LossTable(6)
    back.load_state_dict(sd)
    np.testing.assert_array_equal(np.isnan(back.losses), [True, False, True, True, False, True])
    assert back.losses[4] == 0.0 and back.num_seen == 2
    assert back.losses.tobytes() == t.losses.tobytes()  # bitwise the table that was saved, NaN included


def test_old_state_with_nan_for_unseen_loads_the_same():
    t = LossTable(5)
    t.update([0, 3], [1.25, 4.0], step=7)
    old = t.state_dict()
    old["losses"] = torch.from_numpy(t.losses.copy())  # how states were saved before: NaN while unseen
    assert torch.isnan(old["losses"]).sum() == 3
    a, b = LossTable(5), LossTable(5)
    a.load_state_dict(old)
    b.load_state_dict(t.state_dict())
    assert a.losses.tobytes() == b.losses.tobytes() == t.losses.tobytes()
    assert a.num_seen == b.num_seen == 2
    assert_state_equal(a.state_dict(), b.state_dict())
