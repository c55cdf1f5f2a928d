"""``initial_loss_feedback``: the three forms of ``initial_losses`` the integrations accept mean the same
``prime`` call, and a bad one is refused with an error naming the argument and the value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from irdro_sampler import IRDROSampler, initial_loss_chunks, initial_loss_feedback
from irdro_sampler.priming import check_initial_losses

N = 50


def _vector() -> np.ndarray:
    v = np.linspace(0.5, 3.0, N)
    v[[3, 17]] = np.nan  # not scored
    return v


def test_the_three_forms_prime_the_same(tmp_path):
    path = tmp_path / "losses.npy"
    np.save(path, _vector().astype(np.float32))
    scored = np.flatnonzero(~np.isnan(_vector()))
    forms = [(scored, _vector()[scored]), _vector(), torch.tensor(_vector()), list(_vector()), str(path), path]
    states = []
    for form in forms:
        idx, val = initial_loss_feedback(form, N)
        np.testing.assert_array_equal(idx, scored)
        np.testing.assert_allclose(val, _vector()[scored], rtol=1e-6)
        s = IRDROSampler(N, 5, seed=0)
        s.prime(idx, val)
        assert s.table.num_seen == N - 2 and s.stats()["skipped_nonfinite"] == 0  # NaN = not scored, not skipped
        states.append(s.table.losses.copy())
    for got in states[1:]:
        np.testing.assert_allclose(got, states[0], rtol=1e-6)


def test_bad_forms_are_refused_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"initial_losses must hold one loss per sample \(50\), got shape \(49,\)"):
        initial_loss_feedback(np.ones(N - 1), N)
    with pytest.raises(ValueError, match=r"got shape \(50, 2\)"):
        initial_loss_feedback(np.ones((N, 2)), N)
    with pytest.raises(TypeError, match="real numbers"):
        initial_loss_feedback(np.ones(N, dtype=bool), N)
    with pytest.raises(FileNotFoundError, match="initial_losses: no such file"):
        initial_loss_feedback(str(tmp_path / "missing.npy"), N)
    with pytest.raises(TypeError, match=r"\(indices, losses\), got 3 entries"):
        check_initial_losses((1, 2, 3))
    with pytest.raises(TypeError, match="got dict"):
        check_initial_losses({"a": 1}, "irdro['initial_losses']")
    with pytest.raises(ValueError, match=r"initial_losses\[0\] \(indices\) must lie in \[0, 50\), got 50"):
        initial_loss_feedback(([0, N], [1.0, 2.0]), N)
    bad = tmp_path / "text.npy"
    bad.write_text("not an array")
    with pytest.raises(ValueError, match="is not a .npy array"):
        initial_loss_feedback(bad, N)


@pytest.mark.parametrize("as_file", [False, True])
def test_priming_in_chunks_fills_the_table_and_draws_as_one_call(tmp_path, as_file):
    """``initial_loss_chunks``: a vector (or a memory-mapped ``.npy``) split into ``chunk_size`` pieces, the ids of
    each piece offset by its start, unscored ones left out; primed piece by piece, the table, the first fit
    and the draws are those of one ``prime`` call with :func:`initial_loss_feedback`."""
    vector = _vector()
    vector[28:35] = np.nan  # a whole piece unscored: an empty pair, which prime takes
    form = vector
    if as_file:
        form = tmp_path / "losses.npy"
        np.save(form, vector)
    pairs = list(initial_loss_chunks(form, N, chunk_size=7))
    assert len(pairs) == 8 and all(np.all((i >= 7 * k) & (i < 7 * k + 7)) for k, (i, _) in enumerate(pairs))
    assert pairs[4][0].size == 0
    one = initial_loss_feedback(form, N)
    np.testing.assert_array_equal(np.concatenate([i for i, _ in pairs]), one[0])
    np.testing.assert_array_equal(np.concatenate([v for _, v in pairs]), one[1])
    chunked, whole = IRDROSampler(N, 5, seed=3), IRDROSampler(N, 5, seed=3)
    for i, v in pairs:
        chunked.prime(i, v)
    whole.prime(*one)
    np.testing.assert_array_equal(chunked.table.losses, whole.table.losses)
    np.testing.assert_array_equal(chunked.probabilities(), whole.probabilities())
    assert [list(b) for b in chunked.iter_batches()] == [list(b) for b in whole.iter_batches()]


def test_a_bad_vector_is_refused_before_any_piece_is_yielded():
    with pytest.raises(ValueError, match=r"got shape \(49,\)"):
        initial_loss_chunks(np.ones(N - 1), N, chunk_size=7)  # raised at the call, not at the first next()
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        initial_loss_chunks(np.ones(N), N, chunk_size=0)
