"""IRDROSampler.from_weights: a distributed, resumable weighted sampler with weights the user sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _core_helpers import P_THRESHOLD, iter_batches
from scipy import stats as sps

from irdro_sampler import IRDROBatchSampler, IRDROSampler


def _weights(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.gamma(0.7, 1.0, n)
    w[rng.random(n) < 0.1] = 0.0  # some samples must never be drawn
    return w


def _draw_counts(s: IRDROSampler, epochs: int) -> np.ndarray:
    counts = np.zeros(s.dataset_size)
    for epoch in range(epochs):
        s.set_epoch(epoch)
        for b in iter_batches(s):
            np.add.at(counts, b, 1)
    return counts


def test_iid_draws_follow_the_weights_chi_square():
    n = 60
    w = _weights(n)
    s = IRDROSampler.from_weights(w, 32, draws="iid", seed=3)
    counts = _draw_counts(s, 400)
    p = w / w.sum()
    assert counts[w == 0].sum() == 0
    kept = w > 0
    res = sps.chisquare(counts[kept], counts.sum() * p[kept])
    assert res.pvalue > P_THRESHOLD
    np.testing.assert_allclose(s.probabilities(), p, rtol=1e-12)


def test_balanced_counts_track_the_weights_within_two():
    n = 500
    w = _weights(n, seed=1)
    s = IRDROSampler.from_weights(w, 50, seed=2)
    counts = _draw_counts(s, 30)
    expected = counts.sum() * w / w.sum()
    assert np.abs(counts - expected).max() < 2.0
    assert counts[w == 0].sum() == 0


def test_ranks_draw_disjoint_shares_of_one_global_batch():
    n = 1000
    w = _weights(n, seed=4)
    ranks = [IRDROSampler.from_weights(w, 25, num_replicas=4, rank=r, seed=9) for r in range(4)]
    per_rank = [list(iter(s)) for s in ranks]
    assert all(len(x) == n // 4 for x in per_rank)
    # Positions of one global batch: rank r yields [r * 25, (r + 1) * 25) of it.
    glob = ranks[0].drawn_batch(0)
    assert glob is None or [i for x in per_rank for i in x[:25]] == glob[0].tolist()
    union = np.zeros(n)
    for x in per_rank:
        np.add.at(union, x, 1)
    expected = n * w / w.sum()
    assert np.abs(union - expected).max() < 2.0  # the count bound holds for the union over ranks
    flat = [IRDROSampler.from_weights(np.ones(n), 25, num_replicas=4, rank=r, seed=9) for r in range(4)]
    shares = [set(iter(s)) for s in flat]
    assert set().union(*shares) == set(range(n)) and sum(map(len, shares)) == n  # disjoint, complete


@pytest.mark.parametrize("draws", ["balanced", "iid"])
def test_resumes_exactly(draws):
    w = _weights(300, seed=5)
    ref = IRDROSampler.from_weights(w, 16, draws=draws, seed=1)
    full, saved = [], None
    for epoch in range(3):
        ref.set_epoch(epoch)
        for j, b in enumerate(iter_batches(ref)):
            full.append(b)
            if epoch == 1 and j == 4:
                saved = ref.state_dict()
    again = IRDROSampler.from_state_dict(torch.load(_roundtrip(saved), weights_only=True))
    assert again.fingerprint() == IRDROSampler.from_state_dict(saved).fingerprint()
    assert isinstance(again.rule, type(ref.rule))
    cont = []
    for epoch in (1, 2):
        again.set_epoch(epoch)
        if epoch == 1:
            again.set_start_batch(5)
        cont.extend(iter_batches(again))
    assert cont == full[ref.batches_per_epoch + 5 :]


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_fingerprint_follows_the_weights_and_feedback_changes_nothing():
    w = _weights(100)
    a = IRDROSampler.from_weights(w, 10)
    b = IRDROSampler.from_weights(w * 4.0, 10)  # scaled by a power of two: the same masses, bit for bit
    c = IRDROSampler.from_weights(np.where(w > 0, w, 1.0), 10)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    first = list(iter(a))
    assert first == list(iter(b))
    a.update(first[:10], np.full(10, 50.0), step=0)  # feedback is kept and counted, weights unchanged
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(iter(a)) == list(iter(b))
    np.testing.assert_allclose(a.probabilities(), w / w.sum(), rtol=1e-12)
    assert a.stats()["truncated_fraction"] == 0.0


def test_more_than_2_to_the_24_samples():
    n = 2**24 + 1000
    w = np.zeros(n)
    w[-1000:] = 1.0  # only samples beyond torch.multinomial's limit carry weight
    s = IRDROSampler.from_weights(w, 500, draws="iid", seed=0)
    batch = next(iter(IRDROBatchSampler(s)))
    assert len(batch) == 500 and min(batch) >= 2**24


@pytest.mark.parametrize(
    ("weights", "err", "words"),
    [
        ([], ValueError, "non-empty 1-D"),
        ([[1.0, 2.0]], ValueError, "1-D, got shape"),
        ([1.0, -1.0], ValueError, r"weights\[1\] = -1.0"),
        ([1.0, math.nan], ValueError, r"weights\[1\] = nan"),
        ([0.0, 0.0], ValueError, "positive sum"),
        (["a", "b"], TypeError, "weights"),
    ],
)
def test_bad_weights(weights, err, words):
    with pytest.raises(err, match=words):
        IRDROSampler.from_weights(np.array(weights) if weights and weights[0] != "a" else weights, 4)


def test_no_rule_options_and_a_checked_floor():
    with pytest.raises(TypeError, match="no rule options.*temperature"):
        IRDROSampler.from_weights([1.0, 2.0], 1, temperature=1.0)
    with pytest.raises(ValueError, match="uniform_mix"):
        IRDROSampler.from_weights([1.0, 2.0], 1, uniform_mix=1.5)
    s = IRDROSampler.from_weights([0.0, 1.0], 1, uniform_mix=0.5)
    np.testing.assert_allclose(s.probabilities(), [0.25, 0.75])


def test_a_state_with_weights_of_another_length_is_refused():
    state = IRDROSampler.from_weights(np.ones(10), 2).state_dict()
    state["rule"]["fixed_weights"] = torch.ones(11, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"fixed_weights.*11 weights for dataset_size=10"):
        IRDROSampler.check_state_dict(state)
