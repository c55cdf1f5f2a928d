"""``IRDROTrainer(irdro_screen=True)``: first visits the cut would take are left out of the step's loss, on the real
Hugging Face Trainer (CPU, a tiny GPT-2 built from its config, tests/_hf_worker.py's data set).

The sampler is primed with tight low losses for three quarters of the samples and none for the rest (every 4th,
the "block"), so the last refit's cut lies far below the untrained model's loss (about log 64 nats a token) and
every drawn block sample is a first visit the cut would take. In the first 16 micro-batches (fewer than the
default feedback_delay of 32: no loss of the run is in the table yet) the test checks, per micro-batch, on the
gradient of the returned loss with respect to the logits:

* the screened rows are exactly the block's, and their gradient is zero (to float32 rounding);
* the kept rows' gradient equals that of the Trainer's own (unscreened) loss: the divisor is kept, also under
  gradient accumulation (whatever normalisation the installed transformers applies);
* the loss is the Trainer's times the kept samples' share of the token-loss sum;

and that the draws are the unscreened run's, ``irdro/screened_fraction`` is logged, a sequence classifier is
screened the same way, and a bad ``irdro_screen`` is refused naming it (the sharded table screens too:
tests/test_hf_sharded.py).

Runs in the `[hf]` CI lane (.ci/hf_lane); skipped where transformers' Trainer or accelerate is missing.
"""

from __future__ import annotations

import os
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

sys.path.remove(str(TESTS))

from irdro_sampler.integrations.hf import IRDROTrainer  # noqa: E402
from irdro_sampler.losses import token_loss_sums  # noqa: E402

N, BATCH, STEPS = 256, 16, 16
BLOCK = np.arange(N) % 4 == 0  # never scored: first visits


UNLEARNABLE = (np.arange(N) % 4 == 1) & (np.arange(N) % 3 == 0)  # scored, and far above the rest (block_only)


def _primed(low: float, unlearnable_at: float | None = None) -> np.ndarray:
    """Tight losses in ``[low, 1.2 low]``, NaN (not scored) on the block: the cut lies far below the untrained
    model's loss (about 4.2 nats a token for the LM, 0.7 for the two-class classifier). With ``unlearnable_at``,
    a tenth of the scored samples sit there instead: a block of unlearnable samples in the table (for
    ``irdro_screen="block"``, which leaves out only first visits above the valley below it)."""
    rng = np.random.default_rng(0)
    loss = rng.uniform(low, 1.2 * low, N)
    if unlearnable_at is not None:
        loss[UNLEARNABLE] = unlearnable_at + 0.01 * rng.random(int(UNLEARNABLE.sum()))
    loss[BLOCK] = np.nan
    return loss


class GradTrainer(worker.OutputsHookTrainer):
    """Records, per micro-batch, the returned loss's and the model's own loss's gradients on the logits."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[dict] = []

    def on_outputs(self, current, loss, outputs, labels) -> None:
        logits = outputs["logits"]
        own = outputs["loss"]  # the model's loss: the Trainer's unscreened one in a single process
        (g_returned,) = torch.autograd.grad(loss, logits, retain_graph=True)
        (g_own,) = torch.autograd.grad(own, logits, retain_graph=True)
        self.steps.append({"idx": list(current[0]), "loss": float(loss), "own": float(own),
                           "g_returned": g_returned.detach().clone(), "g_own": g_own.detach().clone(),
                           "logits": logits.detach().clone(), "labels": labels.detach().clone()})


def _trainer(out: Path, *, screen: bool | str, task: str = "lm", grad_accum: int = 1,
             unlearnable_at: float | None = None) -> GradTrainer:
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, TrainingArguments

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = dict(vocab_size=worker.VOCAB, n_positions=worker.SEQ, n_embd=16, n_layer=1, n_head=2)
    if task == "lm":
        model = GPT2LMHeadModel(GPT2Config(**cfg))
    else:
        model = GPT2ForSequenceClassification(GPT2Config(**cfg, num_labels=2, pad_token_id=0))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=grad_accum,
        max_steps=STEPS // grad_accum, learning_rate=1e-3, logging_steps=2, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True,
    )
    return GradTrainer(model=model, args=args, train_dataset=worker.Samples(N, task),
                       irdro=dict(seed=3, initial_losses=_primed(1.0 if task == "lm" else 0.1, unlearnable_at),
                                  groups=None),
                       irdro_screen=screen)


def _check_steps(trainer: GradTrainer, *, token_level: bool) -> int:
    """The per-micro-batch claims of the module docstring; returns how many samples were screened."""
    screened_total = 0
    assert len(trainer.steps) == STEPS
    for rec in trainer.steps:
        screened = BLOCK[rec["idx"]]
        screened_total += int(screened.sum())
        g_ret, g_own = rec["g_returned"], rec["g_own"]
        rows = torch.from_numpy(screened)
        # Zero up to float32 rounding: the Trainer's loss and the shares are two computations of the same sum.
        assert float(g_ret[rows].abs().max()) <= 1e-5 * float(g_own.abs().max())
        torch.testing.assert_close(g_ret[~rows], g_own[~rows], rtol=1e-5, atol=1e-9)
        if token_level:
            shares, _ = token_loss_sums(rec["logits"], rec["labels"], shift=True)
        else:
            shares = torch.nn.functional.cross_entropy(rec["logits"], rec["labels"], reduction="none")
        shares = shares.double()
        expected = rec["own"] * float(shares[~rows].sum() / shares.sum())
        assert rec["loss"] == pytest.approx(expected, rel=1e-5)
    return screened_total


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory) -> dict[str, GradTrainer]:
    runs = {}
    for name, screen, accum in (("screen", True, 1), ("plain", False, 1), ("screen_accum", True, 2)):
        t = _trainer(tmp_path_factory.mktemp(name), screen=screen, grad_accum=accum)
        t.train()
        runs[name] = t
    return runs


def test_screened_first_visits_get_no_gradient_and_kept_ones_the_trainers(lm_runs):
    screened = _check_steps(lm_runs["screen"], token_level=True)
    # The block is drawn at the prior's weight (its share of the draws, about 64 of 256): far from none.
    assert screened >= 30


def test_gradient_accumulation_keeps_the_trainers_normalisation(lm_runs):
    assert _check_steps(lm_runs["screen_accum"], token_level=True) >= 30


def test_unscreened_run_is_the_trainers_loss_and_the_draws_do_not_change(lm_runs):
    plain, screen = lm_runs["plain"], lm_runs["screen"]
    for rec in plain.steps:
        assert rec["loss"] == rec["own"]
        torch.testing.assert_close(rec["g_returned"], rec["g_own"], rtol=0, atol=0)
    # No loss of the run is applied before step 32 (feedback_delay): the screen must not move the draws.
    assert [r["idx"] for r in screen.steps] == [r["idx"] for r in plain.steps]
    assert not any("irdro/screened_fraction" in h for h in plain.state.log_history)


def test_screened_fraction_is_logged(lm_runs):
    t = lm_runs["screen"]
    logged = [h["irdro/screened_fraction"] for h in t.state.log_history if "irdro/screened_fraction" in h]
    assert len(logged) == STEPS // 2  # logging_steps=2
    drawn = np.array([i for r in t.steps for i in r["idx"]])
    assert np.mean(logged) == pytest.approx(BLOCK[drawn].mean(), abs=1e-12)  # equal-sized log windows


def test_sequence_classifier_is_screened_alike(tmp_path):
    t = _trainer(tmp_path, screen=True, task="cls")
    t.train()
    assert _check_steps(t, token_level=False) >= 30


def test_block_screen_leaves_out_first_visits_above_the_tables_block_only(tmp_path):
    # The table holds a block near 3 nats: the LM's first visits (about 4.2) lie above its valley and are
    # screened as under the full screen; the classifier's (about 0.7) lie above the cut (the full screen takes
    # them: test_sequence_classifier_is_screened_alike) but below the block, so none is screened.
    lm = _trainer(tmp_path / "lm", screen="block", unlearnable_at=3.0)
    lm.train()
    assert 0.3 < lm.irdro_sampler.order.weights.params.block_valley < 3.0
    assert _check_steps(lm, token_level=True) >= 30
    cls = _trainer(tmp_path / "cls", screen="block", task="cls", unlearnable_at=3.0)
    cls.train()
    assert 0.12 < cls.irdro_sampler.order.weights.params.block_valley < 3.0
    for rec in cls.steps:
        torch.testing.assert_close(rec["g_returned"], rec["g_own"], rtol=0, atol=0)
    logged = [h["irdro/screened_fraction"] for h in cls.state.log_history if "irdro/screened_fraction" in h]
    assert logged and max(logged) == 0.0


def test_bad_screen_arguments_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    model = GPT2LMHeadModel(GPT2Config(vocab_size=worker.VOCAB, n_positions=worker.SEQ, n_embd=16, n_layer=1,
                                       n_head=2))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    data = worker.Samples(16, "lm")
    with pytest.raises(TypeError, match="irdro_screen must be True, False or 'block', got 'yes'"):
        IRDROTrainer(model=model, args=args, train_dataset=data, irdro_screen="yes")
