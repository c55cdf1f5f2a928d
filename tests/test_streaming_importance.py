"""Importance weights on the streaming path: a round is drawn from frozen weights, so each sample's draw
probability is known (``WeightedStreamingDataset.draw_probabilities``) and ``1 / (N p_i)`` makes the
round's mean loss an unbiased estimate of the uniform (ERM) mean loss."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("streaming")
from _streaming_data import fresh_local, write_mds  # noqa: E402

from irdro_sampler.integrations.streaming import WeightedStreamingDataset  # noqa: E402

N, BATCH, ROUND = 400, 10, 200
Z_CRIT = 3.29  # two-sided normal quantile at alpha = 1e-3; fixed seeds make each check deterministic


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    return write_mds(str(tmp_path_factory.mktemp("mds_importance")), N, 40)


def _dataset(root, remote, **kw):
    return WeightedStreamingDataset(round_size=ROUND, remote=remote, local=fresh_local(root), batch_size=BATCH,
                                    shuffle=True, seed=5, **kw)


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    p = rng.gamma(0.7, size=N) + 0.05  # skewed but every sample drawable
    p /= p.sum()
    losses = rng.gamma(2.0, size=N) + 3.0 * (p > np.median(p))  # high-p samples have higher loss, as in IR-DRO
    return p, losses


def test_draw_probabilities_are_the_rounds_frozen_weights(tmp_path, remote):
    ds = _dataset(str(tmp_path), remote)
    with pytest.raises(RuntimeError, match="no round"):
        ds.draw_probabilities([0])
    p, _ = _problem()
    ds.set_weights(p)
    ids = np.array([int(s["sample_idx"]) for s in ds])  # round 0 freezes p
    np.testing.assert_array_equal(ds.draw_probabilities(ids), p[ids])
    ds.set_weights(np.full(N, 1.0 / N))  # pending for round 1: the round in progress keeps p
    np.testing.assert_array_equal(ds.draw_probabilities(ids), p[ids])
    with pytest.raises(IndexError, match="sample_ids"):
        ds.draw_probabilities([N])


def test_iid_rounds_give_an_unbiased_erm_estimate(tmp_path, remote):
    """Mean over K independent rounds of mean_draws(l_i / (N p_i)) against mean(l): a z-test whose
    standard error is estimated from the K rounds themselves."""
    ds = _dataset(str(tmp_path), remote, draws="iid")
    p, losses = _problem(1)
    estimates = []
    for r in range(400):
        ids = ds.plan_round(p, r)[1]
        estimates.append(np.mean(losses[ids] / (N * p[ids])))
    est = np.asarray(estimates)
    z = (est.mean() - losses.mean()) / (est.std(ddof=1) / np.sqrt(est.size))
    assert abs(z) < Z_CRIT, (est.mean(), losses.mean(), z)
    # And the weights matter: the unweighted mean of the drawn losses is far off (it estimates E_p[l]).
    biased = np.mean([losses[ds.plan_round(p, r)[1]].mean() for r in range(50)])
    assert abs(biased - float(p @ losses)) < 0.05 * float(p @ losses)
    assert abs(float(p @ losses) - losses.mean()) > 0.1


def test_balanced_rounds_track_the_erm_objective_within_the_two_draw_bound(tmp_path, remote):
    """Balanced draws keep each sample's cumulative count within 2 of R * sum_r p_i(r), so after K rounds
    the importance-weighted mean differs from mean(l) by at most 2 * sum_i l_i / (N p_i) / (K R)."""
    ds = _dataset(str(tmp_path), remote)
    p, losses = _problem(2)
    carry = ds.round_carry(0)
    total, rounds = 0.0, 60
    from irdro_sampler import balanced_counts

    for r in range(rounds):
        ids = ds.plan_round(p, r, carry)[1]
        total += float(np.sum(losses[ids] / (N * p[ids])))
        carry = balanced_counts(carry, p, ROUND)[1]
    bound = 2.0 * float(np.sum(losses / (N * p))) / (rounds * ROUND)
    assert abs(total / (rounds * ROUND) - losses.mean()) <= bound


@pytest.mark.slow
def test_composer_importance_mode_on_streaming_weights_the_loss_by_the_rounds_probabilities(tmp_path, remote):
    """IRDRO(mode='importance') on a WeightedStreamingDataset backpropagates mean_i(l_i / (N p_i)) with p
    the round's frozen weights (checked at every batch after IRDRO replaced the loss)."""
    from _streaming_composer_model import Tiny
    from _streaming_composer_model import per_sample_loss as per_sample
    from composer import Callback, Event, Trainer

    from irdro_sampler.integrations.composer import IRDRO, batch_sample_indices

    ds = _dataset(str(tmp_path), remote)
    checked = []

    class Check(Callback):
        def run_event(self, event, state, logger):
            if event == Event.AFTER_LOSS:  # callbacks run after the algorithm's replacement
                idx = batch_sample_indices(state).numpy()
                w = 1.0 / (N * ds.draw_probabilities(idx))
                want = float(np.mean(w * per_sample(state.outputs, state.batch).detach().double().numpy()))
                checked.append((float(state.loss), want, float(np.ptp(w))))

    algo = IRDRO(mode="importance", loss_fn=per_sample, truncate_zscore=float("inf"), temperature=0.5,
                 log_interval=0)
    model = Tiny()
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH)
    trainer = Trainer(model=model, train_dataloader=dl, max_duration="3ep", algorithms=[algo], callbacks=[Check()],
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.5), device="cpu", seed=3,
                      progress_bar=False, log_to_console=False)
    trainer.fit()
    trainer.close()
    assert len(checked) == 3 * ROUND // BATCH
    for got, want, _ in checked:
        assert got == pytest.approx(want, rel=1e-5)
    assert max(spread for *_, spread in checked[ROUND // BATCH :]) > 0.1  # rounds 1-2 had non-uniform weights
    assert os.path.isdir(str(tmp_path))
