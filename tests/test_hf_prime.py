"""``IRDROTrainer(irdro=dict(initial_losses=...))``: the sampler is primed with a scoring pass's losses before
the first draw, on the real Hugging Face Trainer (CPU, a tiny GPT-2 built from its config, tests/_hf_worker.py's
data set whose first two tokens encode the sample id).

* The starting model's losses put an "unlearnable block" (every 4th sample) far above the rest: a primed run
  draws the block at the cut's floor in its first batches, an unprimed one at its share (chi-square against
  the sampler's distribution, and both against the other's), and the table holds the primed losses before
  the first batch.
* The ``.npy`` path form trains the array form's batches.
* A resume from a checkpoint of a primed run, into a new Trainer given the same ``initial_losses``, does not
  prime again and trains the uninterrupted run's batches.
* A vector of the wrong length is a ``ValueError`` naming ``irdro['initial_losses']`` and the shape when
  training starts; a missing ``.npy`` path a ``FileNotFoundError`` at construction.

Runs in the `[hf]` CI lane (.ci/hf_lane); skipped where transformers' Trainer or accelerate is missing.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import _hf_required  # noqa: E402, F401  (skips this module where the Trainer cannot run)

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import _hf_worker as worker  # noqa: E402
from _core_helpers import P_THRESHOLD, free_port, gloo_group  # noqa: E402

sys.path.remove(str(TESTS))

from irdro_sampler import IRDROSampler, ShardedIRDROSampler  # noqa: E402
from irdro_sampler.integrations.hf import STATE_FILE  # noqa: E402

N, BATCH = 256, 16  # 16 micro-batches per epoch; an epoch draws enough for the chi-square bins
BLOCK = np.arange(N) % 4 == 0  # the unlearnable block: every 4th sample, a quarter of the data
SHARE = float(BLOCK.mean())


def _scored() -> np.ndarray:
    """A starting model's losses: a tight far block (every 4th sample) above a spread bulk."""
    rng = np.random.default_rng(0)
    loss = rng.uniform(1.0, 3.0, N)
    loss[BLOCK] = 5.5 + rng.normal(0.0, 0.05, int(BLOCK.sum()))
    return loss


def _two_bin_pvalue(counts: np.ndarray, p: float) -> float:
    """Chi-square goodness of fit of ``counts = (in, out)`` to ``(p, 1 - p)``: one degree of freedom, so the
    p-value is ``erfc(sqrt(chi2 / 2))`` (no scipy: the Hugging Face lane's venvs do not have it)."""
    n = float(np.sum(counts))
    expected = np.array([n * p, n * (1 - p)])
    assert expected.min() >= 5, expected  # the chi-square approximation holds
    chi2 = float(np.sum((np.asarray(counts, dtype=np.float64) - expected) ** 2 / expected))
    return math.erfc(math.sqrt(chi2 / 2))


class SnapshotTrainer(worker.RecordingTrainer):
    """Records the micro-batches (tests/_hf_worker.py) and the sampler as built, before its first draw."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.built: list[dict] = []

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        s = self.irdro_sampler
        snap = {"sampler": s}
        if isinstance(s, IRDROSampler):  # (a ShardedIRDROSampler's queries are collectives)
            snap.update(losses=s.table.losses.copy(), seen=int(s.table.num_seen), probs=s.probabilities())
        self.built.append(snap)
        return loader


def _trainer(out: Path, irdro: dict, *, max_steps: int, save_steps: int = 0) -> SnapshotTrainer:
    """A tiny causal LM on ``N`` samples, as tests/_hf_worker.py builds it, with the given ``irdro`` dict."""
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=worker.VOCAB, n_positions=worker.SEQ, n_embd=16, n_layer=1,
                                       n_head=2))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=max_steps, learning_rate=1e-3,
        logging_steps=4, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    return SnapshotTrainer(model=model, args=args, train_dataset=worker.Samples(N, "lm"), irdro=irdro)


def _by_step(trainer: SnapshotTrainer) -> dict[int, list[int]]:
    assert all(m["fed"] == m["idx"] for m in trainer.record)  # the model trained the drawn samples
    return {m["step"]: m["idx"] for m in trainer.record}


def _block_counts(trainer: SnapshotTrainer) -> np.ndarray:
    drawn = np.array([i for m in trainer.record for i in m["idx"]])
    return np.array([np.count_nonzero(BLOCK[drawn]), np.count_nonzero(~BLOCK[drawn])])


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory) -> dict[str, SnapshotTrainer]:
    """One epoch (16 micro-batches, fewer than the default feedback_delay of 32: every batch is drawn from
    the distribution the sampler starts with), primed and not."""
    runs = {}
    for name, irdro in (("primed", dict(seed=3, initial_losses=_scored())), ("plain", dict(seed=3))):
        t = _trainer(tmp_path_factory.mktemp(name), irdro, max_steps=N // BATCH)
        t.train()
        runs[name] = t
    return runs


def test_primed_run_draws_the_block_far_below_its_share(first_epoch):
    primed, plain = first_epoch["primed"], first_epoch["plain"]
    snap = primed.built[0]
    assert snap["seen"] == N  # the table holds the scoring pass before the first draw
    np.testing.assert_array_equal(snap["losses"], _scored().astype(np.float32))
    np.testing.assert_array_equal(snap["sampler"].table.first_losses, _scored().astype(np.float32))
    p_block = float(snap["probs"][BLOCK].sum())
    assert p_block < SHARE / 4  # the block is cut: it keeps the floor (0.1 x its share with the defaults)
    assert plain.built[0]["seen"] == 0 and float(plain.built[0]["probs"][BLOCK].sum()) == pytest.approx(SHARE)
    assert primed.irdro_sampler.stats()["late_feedback"] == 0

    got, base = _block_counts(primed), _block_counts(plain)
    n = int(got.sum())
    assert n == int(base.sum()) == N  # one epoch of draws each
    # Each run's draws fit its own starting distribution and not the other run's.
    assert _two_bin_pvalue(got, p_block) > P_THRESHOLD
    assert _two_bin_pvalue(base, SHARE) > P_THRESHOLD
    assert _two_bin_pvalue(got, SHARE) < P_THRESHOLD
    assert _two_bin_pvalue(base, p_block) < P_THRESHOLD
    # And in counts: the primed run is far below the share (4 binomial sd at the share: 64 +- 28), the
    # plain run within it.
    sd = np.sqrt(n * SHARE * (1 - SHARE))
    assert got[0] < n * SHARE - 4 * sd
    assert abs(base[0] - n * SHARE) < 4 * sd


def test_npy_path_trains_the_array_forms_batches(first_epoch, tmp_path):
    path = tmp_path / "scores.npy"
    np.save(path, _scored())
    t = _trainer(tmp_path / "run", dict(seed=3, initial_losses=str(path)), max_steps=N // BATCH)
    t.train()
    assert t.built[0]["seen"] == N
    assert _by_step(t) == _by_step(first_epoch["primed"])
    np.testing.assert_array_equal(t.built[0]["losses"], first_epoch["primed"].built[0]["losses"])


def test_resume_of_a_primed_run_trains_the_uninterrupted_batches(tmp_path):
    """feedback_delay 4: the training losses steer the draws from micro-batch 4 on, so the resumed run's
    batches (from step 8, across the epoch boundary at 16) depend on the primed and the trained feedback."""
    irdro = dict(seed=3, feedback_delay=4, initial_losses=_scored())
    full = _trainer(tmp_path / "a", irdro, max_steps=24, save_steps=8)
    full.train()
    assert (tmp_path / "a" / "checkpoint-8" / STATE_FILE).is_file()
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-8", tmp_path / "b" / "checkpoint-8")
    resumed = _trainer(tmp_path / "b", irdro, max_steps=24, save_steps=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-8"))  # would raise if primed again
    want, got = _by_step(full), _by_step(resumed)
    assert min(got) == 8 and got == {s: want[s] for s in want if s >= 8}
    assert resumed.irdro_sampler.fingerprint() == full.irdro_sampler.fingerprint()
    # the resumed sampler got its primed losses from the checkpoint: the first losses are the scoring pass's
    np.testing.assert_array_equal(resumed.irdro_sampler.table.first_losses, _scored().astype(np.float32))
    assert full.irdro_sampler.stats()["kl_to_uniform"] > 0.01


def test_bad_initial_losses_name_the_option(tmp_path):
    t = _trainer(tmp_path / "short", dict(initial_losses=np.ones(N - 1)), max_steps=2)
    with pytest.raises(ValueError, match=rf"irdro\['initial_losses'\] must hold one loss per sample \({N}\), "
                                         rf"got shape \({N - 1},\)"):
        t.train()
    with pytest.raises(FileNotFoundError, match=r"irdro\['initial_losses'\]: no such file .*missing\.npy"):
        _trainer(tmp_path / "missing", dict(initial_losses=str(tmp_path / "missing.npy")), max_steps=2)
    with pytest.raises(TypeError, match=r"irdro\['initial_losses'\] must be .*got dict"):
        _trainer(tmp_path / "dict", dict(initial_losses={"a": 1.0}), max_steps=2)


def test_sharded_sampler_is_primed_too(tmp_path):
    """``sharded=True`` on a 1-rank gloo group: ``initial_losses`` is not passed to ``ShardedIRDROSampler`` but
    primes it (the whole table is this rank's rows)."""
    with gloo_group(0, 1, free_port()):
        t = _trainer(tmp_path, dict(sharded=True, seed=3, initial_losses=_scored()), max_steps=2)
        t.get_train_dataloader()
        sampler = t.irdro_sampler
        assert isinstance(sampler, ShardedIRDROSampler)
        p = sampler.local_probabilities()
        assert p.shape == (N,) and float(p[BLOCK].sum()) < SHARE / 4
        plain = _trainer(tmp_path, dict(sharded=True, seed=3), max_steps=2)
        plain.get_train_dataloader()
        assert float(plain.irdro_sampler.local_probabilities()[BLOCK].sum()) == pytest.approx(SHARE)
