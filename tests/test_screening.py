"""The first-visit screen (``IRDROSampler.screen``, ``irdro_sampler/screening.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _core_helpers import iter_batches, run_with_feedback

from irdro_sampler import IRDROSampler
from irdro_sampler.screening import screen_first_visits
from irdro_sampler.weights import WeightParams

N = 2000
NOISY = np.arange(N) % 10 == 0  # 10% unlearnable samples, spread over the index range and the groups
PRIMED = np.arange(N) < N // 2  # the table holds the first half


def _losses(seed: int = 0) -> np.ndarray:
    """Clean losses log-normal around 1, the noisy ones near 8 (a separate high mode)."""
    rng = np.random.default_rng(seed)
    return np.where(NOISY, 8.0 + 0.1 * rng.standard_normal(N), np.exp(0.3 * rng.standard_normal(N)))


def _primed_sampler(**options) -> IRDROSampler:
    """A sampler whose table holds the losses of the first half, fitted (one batch drawn)."""
    sampler = IRDROSampler(N, 50, seed=3, **options)
    half = np.flatnonzero(PRIMED)
    sampler.prime(half, _losses()[half])
    sampler.set_epoch(0)
    next(iter_batches(sampler))
    return sampler


def test_nothing_is_screened_before_the_first_refit() -> None:
    sampler = IRDROSampler(N, 50, seed=3)
    keep = sampler.screen(np.arange(N), _losses())
    assert keep.dtype == np.bool_ and keep.shape == (N,) and keep.all()


@pytest.mark.parametrize("groups", [None, np.arange(N) % 7])
def test_first_visits_above_the_cut_are_left_out(groups) -> None:
    sampler = _primed_sampler(groups=groups)
    losses = _losses(seed=1)  # the unseen half's losses, drawn afresh
    keep = sampler.screen(np.arange(N), losses)
    unseen = ~PRIMED
    assert keep[PRIMED].all()  # the draws already weigh seen samples, cut ones included
    assert not keep[unseen & NOISY].any()  # every unseen unlearnable sample is left out
    assert keep[unseen & ~NOISY].mean() > 0.97  # and few clean ones (the z-score takes ~1% of a log-normal)
    # Exactly the samples the cut would take, were their losses in the table as their first losses.
    sampler.update(np.flatnonzero(unseen), losses[unseen], step=0)
    sampler.flush()
    kept_after = sampler.probabilities()[unseen] > sampler.rule.uniform_mix / N * (1 + 1e-9)
    assert np.array_equal(keep[unseen], kept_after)


def test_a_group_whose_losses_all_sit_high_is_judged_against_itself() -> None:
    # Group 1's clean losses sit at 6-7 (a hard class): an unseen loss of 6.5 is ordinary there, extreme in group 0.
    groups = (np.arange(N) % 2).astype(np.int64)
    base = np.where(groups == 1, 6.5 + 0.2 * np.random.default_rng(4).standard_normal(N), _losses())
    sampler = IRDROSampler(N, 50, seed=3, groups=groups)
    sampler.prime(np.flatnonzero(PRIMED), base[PRIMED])
    sampler.set_epoch(0)
    next(iter_batches(sampler))
    unseen = np.flatnonzero(~PRIMED)
    both = unseen[:2] if groups[unseen[0]] != groups[unseen[1]] else unseen[[0, 2]]
    keep = sampler.screen(both, np.full(2, 6.5))
    assert keep[groups[both] == 1].all() and not keep[groups[both] == 0].any()


def test_fixed_weights_screen_nothing() -> None:
    sampler = IRDROSampler.from_weights(np.ones(N), 50, uniform_mix=0.1)
    sampler.update(np.arange(100), np.full(100, 1.0), step=0)
    sampler.flush()
    sampler.set_epoch(0)
    next(iter_batches(sampler))
    assert sampler.screen(np.arange(N), np.full(N, 1e6)).all()


def test_non_finite_losses_are_not_judged() -> None:
    sampler = _primed_sampler()
    idx = np.flatnonzero(~PRIMED & NOISY)[:3]
    keep = sampler.screen(idx, [np.nan, np.inf, 8.0])
    assert keep.tolist() == [True, True, False]


def test_screening_is_read_only() -> None:
    """A run that screens every batch draws the same batches and ends with the same fingerprint."""
    plain, screened = IRDROSampler(300, 16, seed=5), IRDROSampler(300, 16, seed=5)
    batches_plain = run_with_feedback(plain, 3)
    original_update = screened.update

    def update_after_screening(indices, losses, step=None):
        screened.screen(indices, losses)
        original_update(indices, losses, step=step)

    screened.update = update_after_screening
    assert run_with_feedback(screened, 3) == batches_plain
    assert screened.fingerprint() == plain.fingerprint()


@pytest.mark.parametrize(
    ("indices", "losses", "error", "words"),
    [
        ([0, 1], [1.0], ValueError, "same length"),
        ([0, N], [1.0, 1.0], ValueError, "indices must lie in"),
        ([0.5, 1.0], [1.0, 1.0], TypeError, "indices must hold integers"),
        ([0, 1], [True, False], TypeError, "losses must be real numbers"),
        ([[0, 1]], [[1.0, 1.0]], ValueError, "indices must be 1-D"),
    ],
)
def test_bad_input_names_the_argument_and_changes_nothing(indices, losses, error, words) -> None:
    sampler = _primed_sampler()
    before = sampler.fingerprint()
    with pytest.raises(error, match=words):
        sampler.screen(indices, losses)
    assert sampler.fingerprint() == before


def test_tensors_on_any_dtype_are_accepted() -> None:
    sampler = _primed_sampler()
    idx = np.flatnonzero(~PRIMED & NOISY)[:2]
    keep = sampler.screen(torch.from_numpy(idx), torch.tensor([8.0, 0.5], dtype=torch.bfloat16))
    assert keep.tolist() == [False, True]


def test_the_function_compares_the_stored_float32_loss() -> None:
    """A loss just above a float32 threshold in float64 but equal to it once stored is kept, as the cut keeps it."""
    threshold = float(np.float32(2.0))
    params = WeightParams(temperature=1.0, threshold=threshold, prior=1.0, shift=0.0)
    losses = np.array([threshold + 1e-12, 2.1, 1.0])
    keep = screen_first_visits(losses, np.zeros(3, bool), params)
    assert keep.tolist() == [True, False, True]
    assert screen_first_visits(losses, np.ones(3, bool), params).all()  # seen: never screened
    assert screen_first_visits(losses, np.zeros(3, bool), None).all()  # no refit yet


def test_a_training_loop_stops_learning_from_unseen_noise() -> None:
    """The claim of the docstring in a loop: after the first refits, the noise trained on at first visits is
    (almost) gone, while almost every clean first visit is still trained on."""
    n, batch = 12000, 64  # 188 batches: most first visits come after the warm-up
    noisy = np.random.default_rng(7).random(n) < 0.2
    rng = np.random.default_rng(8)
    sampler = IRDROSampler(n, batch, seed=11)
    trained_noise = screened_clean = clean_first = noise_first = 0
    seen = np.zeros(n, bool)
    step = 0
    for epoch in range(1):
        sampler.set_epoch(epoch)
        for b in iter_batches(sampler):
            idx = np.asarray(b)
            losses = np.where(noisy[idx], 5.5 + 0.05 * rng.standard_normal(idx.size),
                              np.exp(0.4 * rng.standard_normal(idx.size)))
            keep = sampler.screen(idx, losses)
            if step >= 2 * sampler.feedback_delay:  # the table holds the first batches' losses and is fitted
                first = ~seen[idx]
                noise_first += int((first & noisy[idx]).sum())
                trained_noise += int((first & noisy[idx] & keep).sum())
                clean_first += int((first & ~noisy[idx]).sum())
                screened_clean += int((first & ~noisy[idx] & ~keep).sum())
            seen[idx] = True
            sampler.update(idx, losses, step=step)
            step += 1
    assert noise_first > 200 and clean_first > 1000  # enough first visits after the warm-up to judge
    # A first visit is unseen by the table for feedback_delay more steps, so a repeat draw in that window is
    # judged again; of the noise's first visits at most a few percent pass.
    assert trained_noise / noise_first < 0.02
    assert screened_clean / clean_first < 0.02


# ------------------------------------------------------------------------- block_only: only a block of unlearnable
def test_block_only_leaves_out_first_visits_inside_the_block_only() -> None:
    sampler = _primed_sampler()
    params = sampler.order.weights.params
    assert 1.5 < params.block_valley < 7.5  # the refit placed the valley between the bulk and the block at 8
    losses = _losses(seed=1)
    losses[np.flatnonzero(~PRIMED & ~NOISY)[:5]] = 4.0  # unseen and high, but below the valley: not a block
    keep = sampler.screen(np.arange(N), losses, block_only=True)
    unseen = ~PRIMED
    assert keep[PRIMED].all()
    assert not keep[unseen & NOISY].any()
    assert keep[unseen & ~NOISY].all()  # unlike the full screen, which takes the clean tail above its z-score
    assert not sampler.screen(np.arange(N), losses)[unseen & ~NOISY].all()


def test_block_only_screens_nothing_without_a_block() -> None:
    # A clean log-normal bulk with a heavy upper tail: the cut takes its top, but there is no block.
    rng = np.random.default_rng(5)
    sampler = IRDROSampler(N, 50, seed=3)
    half = np.flatnonzero(PRIMED)
    sampler.prime(half, np.exp(0.8 * rng.standard_normal(half.size)))
    sampler.set_epoch(0)
    next(iter_batches(sampler))
    assert sampler.order.weights.params.block_valley == np.inf
    losses = np.exp(0.8 * rng.standard_normal(N))
    assert sampler.screen(np.arange(N), losses, block_only=True).all()
    assert not sampler.screen(np.arange(N), losses).all()  # the full screen does take the tail


def test_block_only_judges_the_pooled_block_whatever_the_groups() -> None:
    # The block is found over all samples and judged without groups: the same keep with or without them.
    grouped = _primed_sampler(groups=np.arange(N) % 7)
    plain = _primed_sampler()
    valley = grouped.order.weights.params.block_valley
    assert valley == plain.order.weights.params.block_valley < np.inf
    unseen = np.flatnonzero(~PRIMED)[:4]
    losses = np.array([valley * 0.99, valley * 1.01, 1.0, np.nan])
    keep = grouped.screen(unseen, losses, block_only=True)
    assert keep.tolist() == [True, False, True, True]
    assert np.array_equal(keep, plain.screen(unseen, losses, block_only=True))


def test_block_only_must_be_a_bool() -> None:
    sampler = _primed_sampler()
    with pytest.raises(TypeError, match="block_only must be True or False, got 'yes'"):
        sampler.screen([0], [1.0], block_only="yes")


def test_the_block_valley_survives_a_state_round_trip() -> None:
    sampler = _primed_sampler()
    valley = sampler.order.weights.params.block_valley
    state = sampler.state_dict()
    assert state["block_valley"] == valley
    resumed = IRDROSampler(N, 50, seed=3)
    resumed.load_state_dict(state)
    losses = _losses(seed=1)
    assert resumed.order.weights.params.block_valley == valley
    assert np.array_equal(resumed.screen(np.arange(N), losses, block_only=True),
                          sampler.screen(np.arange(N), losses, block_only=True))
    # A state saved before the field existed loads with no block until the next refit.
    del state["block_valley"]
    old = IRDROSampler(N, 50, seed=3)
    old.load_state_dict(state)
    assert old.screen(np.arange(N), losses, block_only=True).all()
    for bad in (float("nan"), float("inf"), "8", True):
        state["block_valley"] = bad
        with pytest.raises(ValueError, match=r"state_dict\['block_valley'\] must be a finite number"):
            IRDROSampler(N, 50, seed=3).load_state_dict(state)
