"""``IRDROSampler.prime``: losses measured before training (a scoring pass) are in the table, and in the rule's
fit, before the first batch is drawn; refused after it; saved and resumed exactly like other feedback."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from _core_helpers import P_THRESHOLD, assert_state_equal, chisquare_pvalue, roundtrip, run_with_feedback

from irdro_sampler import IRDROSampler

N, BATCH, BLOCK = 2000, 32, 500


def _scored() -> np.ndarray:
    """A starting model's losses: a tight far block of unlearnable samples (ids < BLOCK) above a spread bulk."""
    rng = np.random.default_rng(0)
    loss = rng.uniform(1.0, 3.0, N)
    loss[:BLOCK] = 5.5 + rng.normal(0.0, 0.05, BLOCK)
    return loss


def test_the_first_draw_is_fitted_on_the_primed_losses():
    """The block is cut before anything is drawn: it keeps only the floor's share of it (uniform_mix x 0.25),
    and the first batches' draws follow that distribution (chi-square over the two parts, i.i.d. draws)."""
    primed = IRDROSampler(N, BATCH, seed=3, draws="iid")
    primed.flush()  # fits the rule on the empty table: prime must refit it
    primed.prime(np.arange(N), _scored())
    p = primed.probabilities()
    assert p[:BLOCK].sum() == pytest.approx(0.1 * BLOCK / N, rel=1e-9)
    assert primed.stats()["truncated_fraction"] == pytest.approx(BLOCK / N)
    np.testing.assert_array_equal(primed.table.losses, _scored().astype(np.float32))
    np.testing.assert_array_equal(primed.table.first_losses, _scored().astype(np.float32))  # the cut's gate reads them
    drawn = np.concatenate(list(itertools.islice(primed.iter_batches(), 40)))  # no feedback: one distribution
    counts = np.array([np.count_nonzero(drawn < BLOCK), np.count_nonzero(drawn >= BLOCK)])
    assert chisquare_pvalue(counts, np.array([p[:BLOCK].sum(), p[BLOCK:].sum()])) > P_THRESHOLD

    plain = IRDROSampler(N, BATCH, seed=3, draws="iid")  # without it the first draws are uniform
    assert plain.probabilities()[:BLOCK].sum() == pytest.approx(BLOCK / N)


@pytest.mark.parametrize("draws", ["balanced", "iid"])
def test_a_primed_run_resumes_exactly(draws):
    """Saved right after prime (nothing drawn) or after an epoch of training, the run continues with the batches of
    the uninterrupted one; the primed losses count as applied feedback (digest) and leave the steps alone."""
    def make() -> IRDROSampler:
        s = IRDROSampler(N, BATCH, seed=5, draws=draws, feedback_delay=3, refresh_interval=4)
        s.prime(np.arange(N), _scored())
        return s

    want = run_with_feedback(make(), 3)
    fresh = make()
    state = roundtrip(fresh.state_dict())
    assert state["schedule"]["next_auto_step"] == 0 and state["schedule"]["max_reported_step"] == -1
    assert state["feedback_digest"] != IRDROSampler(N, BATCH, seed=5, draws=draws).state_dict()["feedback_digest"]
    restored = IRDROSampler(N, BATCH, seed=5, draws=draws, feedback_delay=3, refresh_interval=4)
    restored.load_state_dict(state)
    assert run_with_feedback(restored, 3) == want

    first = make()
    got = run_with_feedback(first, 1)
    again = IRDROSampler(N, BATCH, seed=5, draws=draws, feedback_delay=3, refresh_interval=4)
    again.load_state_dict(roundtrip(first.state_dict()))
    got += run_with_feedback(again, 2, start_epoch=1, step0=len(got))
    assert got == want


def test_prime_after_a_draw_or_with_bad_input_is_refused_and_changes_nothing():
    s = IRDROSampler(N, BATCH, seed=1)
    before = roundtrip(s.state_dict())
    for indices, losses, match in (([1, 2], [1.0], "same length"), ([1, N], [1.0, 2.0], "indices"),
                                   ([[1, 2]], [[1.0, 2.0]], "indices")):
        with pytest.raises(ValueError, match=match):
            s.prime(indices, losses)
        assert_state_equal(roundtrip(s.state_dict()), before)
    s.prime([0, 0, 1], [1.0, float("nan"), 2.0])  # repeats are valid; a non-finite loss is dropped and counted
    assert s.stats()["skipped_nonfinite"] == 1 and s.table.losses[0] == 1.0
    next(iter(s.iter_batches()))
    drawn = roundtrip(s.state_dict())
    with pytest.raises(ValueError, match=r"prime\(\).*batch 0 was already drawn"):
        s.prime([3], [1.0])
    assert_state_equal(roundtrip(s.state_dict()), drawn)
