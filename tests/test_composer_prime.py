"""``IRDRO(initial_losses=...)`` on a real Composer Trainer (CPU): a scoring pass's losses prime the IRDROSampler
in the DataLoader, or the loss table and first round of a WeightedStreamingDataset over real MDS shards, at the first
``FIT_START`` of a fresh run; a resumed run is not primed again and ends bitwise equal to the uninterrupted one;
what cannot be primed is a clear error."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("composer")
pytest.importorskip("transformers")

from _composer_example import ex  # noqa: E402
from _core_helpers import assert_state_equal  # noqa: E402
from composer.core import Callback  # noqa: E402

from irdro_sampler import DROWeighting, IRDROSampler, LossTable, RoundFeedback  # noqa: E402
from irdro_sampler.integrations.composer import IRDRO, batch_sample_indices  # noqa: E402

torch.set_num_threads(1)

N, BATCH, STEPS = 128, 8, 6
SAMPLER = dict(feedback_delay=5)
SEED = 3


@pytest.fixture(scope="module")
def lm_data():
    return ex.make_lm_data(num_samples=N, seq_len=16, vocab_size=32, noise_fraction=0.25, seed=0)


def _scored(groups: np.ndarray) -> np.ndarray:
    """What a scoring pass of a model that has learned the patterns would give: random-token documents
    (group 3) in a tight block far above the rest."""
    rng = np.random.default_rng(0)
    return np.where(groups == 3, 6.0 + rng.normal(0, 0.02, groups.size), rng.uniform(0.5, 2.5, groups.size))


class Record(Callback):
    """The sampler's distribution at FIT_START (callbacks run after the algorithm) and every batch's indices."""

    def __init__(self) -> None:
        self.at_fit_start: np.ndarray | None = None
        self.ids: list[np.ndarray] = []

    def fit_start(self, state, logger) -> None:
        algo = next(a for a in state.algorithms if isinstance(a, IRDRO))
        if algo.sampler is not None:
            self.at_fit_start = algo.sampler.probabilities()
        else:
            self.at_fit_start = state.train_dataloader.dataset.pending_weights()

    def after_dataloader(self, state, logger) -> None:
        self.ids.append(batch_sample_indices(state).numpy().copy())


def _fit(lm_data, initial_losses=None, *, steps=STEPS, save_folder=None, load_path=None):
    data, _, _ = lm_data
    dl = ex.build_dataloader(data, "irdro", BATCH, seed=SEED, sampler_kwargs=SAMPLER)
    algo = IRDRO(log_interval=0, initial_losses=initial_losses)
    rec = Record()
    kwargs = {} if save_folder is None else dict(save_folder=str(save_folder), save_interval="3ba", save_overwrite=True)
    trainer = ex.build_trainer(ex.build_lm_model(vocab_size=32, seq_len=16, seed=0), dl, [algo], steps=steps, seed=7,
                               callbacks=[rec], load_path=load_path, **kwargs)
    trainer.fit()
    state = algo.sampler.state_dict()
    trainer.close()
    return rec, state


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))


def test_the_sampler_is_primed_before_the_first_draw(lm_data, tmp_path):
    _, groups, _ = lm_data
    scored = _scored(groups)
    path = tmp_path / "scored.npy"
    np.save(path, scored)
    rec, _ = _fit(lm_data, str(path))
    ref = IRDROSampler(N, BATCH, seed=SEED, **SAMPLER)
    ref.prime(np.arange(N), scored)
    np.testing.assert_array_equal(rec.at_fit_start, ref.probabilities())
    noise = groups == 3
    p_noise = float(ref.probabilities()[noise].sum())
    assert p_noise < 0.1 * noise.mean() * 1.01  # the block is cut: the floor's share of it only
    drawn = np.concatenate(rec.ids)
    hits = int(noise[drawn].sum())
    # Drawn from the primed distribution (not rejected at 0.001), and not from the unprimed uniform one.
    assert _binomial_tail(hits, drawn.size, p_noise) > 1e-3
    assert _binomial_tail(drawn.size - hits, drawn.size, 1 - noise.mean()) < 1e-3

    plain, _ = _fit(lm_data)  # without it the first draws are uniform
    np.testing.assert_allclose(plain.at_fit_start, 1.0 / N)


def test_a_resumed_primed_run_is_not_primed_again(lm_data, tmp_path):
    _, groups, _ = lm_data
    scored = _scored(groups)
    folder = tmp_path / "ckpt"
    _, full = _fit(lm_data, (np.arange(N), scored), steps=9, save_folder=folder)
    ckpt = os.path.join(folder, "ep0-ba3-rank0.pt")
    assert os.path.exists(ckpt)
    _, resumed = _fit(lm_data, (np.arange(N), scored), steps=9, load_path=ckpt)
    assert_state_equal(resumed, full)  # the digest counts the primed losses once


def test_the_streaming_table_and_first_round_are_primed(tmp_path):
    pytest.importorskip("streaming")
    from _streaming_composer_model import Tiny, per_sample_loss
    from _streaming_data import fresh_local, write_mds
    from composer import Trainer

    from irdro_sampler.integrations.streaming import WeightedStreamingDataset

    n, round_size = 2000, 200

    root = str(tmp_path)
    write_mds(root, n, 250)
    block = np.arange(n) % 5 == 0
    scored = np.where(block, 6.0 + np.random.default_rng(1).normal(0, 0.02, n), np.random.default_rng(2).uniform(0.5, 2.5, n))
    ds = WeightedStreamingDataset(round_size=round_size, remote=os.path.join(root, "remote"), local=fresh_local(root),
                                  batch_size=10, shuffle=True, seed=1)
    dl = torch.utils.data.DataLoader(ds, batch_size=10)
    algo = IRDRO(loss_fn=per_sample_loss, log_interval=0, initial_losses=scored)
    rec = Record()
    model = Tiny()
    trainer = Trainer(model=model, train_dataloader=dl, max_duration="1ep", algorithms=[algo], callbacks=[rec],
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1), device="cpu", seed=3,
                      progress_bar=False, log_to_console=False)
    trainer.fit()
    ref = RoundFeedback(LossTable(n), DROWeighting())
    ref.update(np.arange(n), scored, step=0)
    want = ref.round_probabilities()
    np.testing.assert_array_equal(rec.at_fit_start, want)  # round 0's weights, pushed before it was planned
    np.testing.assert_array_equal(ds.round_weights(0), want)
    drawn = np.concatenate(rec.ids)
    assert drawn.size == round_size
    hits = int(block[drawn].sum())
    assert _binomial_tail(hits, drawn.size, float(want[block].sum())) > 1e-3
    assert _binomial_tail(drawn.size - hits, drawn.size, 1 - block.mean()) < 1e-3
    assert algo.table.first_losses is not None and np.isfinite(algo.table.first_losses).all()
    trainer.close()


def test_what_cannot_be_primed_is_a_clear_error(lm_data, tmp_path):
    data, _, _ = lm_data
    with pytest.raises(FileNotFoundError, match="initial_losses: no such file"):
        IRDRO(initial_losses=str(tmp_path / "missing.npy"))
    dl = ex.build_dataloader(data, "irdro", BATCH, seed=SEED, sampler_kwargs=SAMPLER)
    trainer = ex.build_trainer(ex.build_lm_model(vocab_size=32, seq_len=16, seed=0), dl,
                               [IRDRO(initial_losses=np.ones(N - 1))], steps=1)
    with pytest.raises(ValueError, match=r"initial_losses must hold one loss per sample \(128\), got shape \(127,\)"):
        trainer.fit()
    trainer.close()
    plain = ex.build_dataloader(data, "none", BATCH, seed=0)
    trainer = ex.build_trainer(ex.build_lm_model(vocab_size=32, seq_len=16, seed=0), plain,
                               [IRDRO(mode="reweight", initial_losses=np.ones(N))], steps=1)
    with pytest.raises(ValueError, match="nothing is fed"):
        trainer.fit()
    trainer.close()
