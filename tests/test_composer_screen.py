"""``IRDRO(screen=True)``: the first-visit screen through the real Composer Trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("composer")

from _composer_example import ex  # noqa: E402
from composer.core import Callback, Event  # noqa: E402
from composer.loggers import InMemoryLogger  # noqa: E402

from irdro_sampler.cut_rules import DEFAULT_ZSCORE  # noqa: E402
from irdro_sampler.integrations.composer import IRDRO, batch_sample_indices  # noqa: E402

N, BATCH = 512, 16


class ScreenCheck(Callback):
    """Recomputes, before each backward, the loss the screen asks for from the step's own outputs."""

    def __init__(self, sampler, importance: bool = False, block_only: bool = False) -> None:
        self.sampler, self.importance, self.block_only = sampler, importance, block_only
        self.idx: torch.Tensor | None = None
        self.got: list[float] = []
        self.expected: list[float] = []
        self.screened = 0
        self.differ = 0  # samples the other screen (full or block-only) would judge otherwise

    def run_event(self, event: Event, state, logger) -> None:
        if event == Event.AFTER_DATALOADER:
            self.idx = batch_sample_indices(state).clone()
        if event == Event.BEFORE_BACKWARD:
            with torch.no_grad():
                per = torch.nn.functional.cross_entropy(state.outputs, state.batch["labels"], reduction="none").double()
            idx = self.idx.numpy()  # one microbatch per batch
            keep = self.sampler.screen(idx, per, block_only=self.block_only)
            w = torch.as_tensor(keep.astype(np.float64))
            if self.importance:
                w = w * torch.as_tensor(self.sampler.importance_weights(idx, step=int(state.timestamp.batch)))
            self.got.append(float(state.loss.detach()))
            self.expected.append(float((w * per).mean()))
            self.screened += int((~keep).sum())
            self.differ += int((keep != self.sampler.screen(idx, per, block_only=not self.block_only)).sum())


def _run(mode: str, steps: int = 12, screen: bool | str = True):
    data, _, _ = ex.make_classifier_data(num_samples=N, seed=0)
    # (the example's importance loader switches the cut off; the screen needs it: the default z-score)
    dl = ex.build_dataloader(data, "irdro" if mode == "resample" else "irdro-importance", BATCH, seed=0,
                             sampler_kwargs={"truncate_zscore": DEFAULT_ZSCORE})
    sampler = dl.sampler
    # A table holding low losses for the first half, fitted at the first draw: the untrained model's first
    # visits to the other half lie far above their cut, so the screen has first visits to leave out from step 0.
    seen = np.arange(N // 2)
    primed = np.full(seen.size, 0.05) + 0.01 * np.random.default_rng(0).random(seen.size)
    if screen == "block":  # a tenth of the seen samples form a block (tight, far above the rest) near 0.5
        primed[::10] = 0.5 + 0.001 * np.random.default_rng(1).random(primed[::10].size)
    sampler.prime(seen, primed)
    algo = IRDRO(mode=mode, screen=screen, log_interval=1)
    check = ScreenCheck(sampler, importance=mode == "importance", block_only=screen == "block")
    logger = InMemoryLogger()
    model = ex.build_classifier_model(seed=0)
    trainer = ex.build_trainer(model, dl, [algo], steps=steps, callbacks=[check], loggers=[logger])
    trainer.fit()
    trainer.close()
    return check, logger


@pytest.mark.parametrize("mode", ["resample", "importance"])
def test_the_loss_leaves_the_screened_first_visits_out(mode: str) -> None:
    check, logger = _run(mode)
    assert check.screened > 0  # some first visits were screened ...
    assert check.screened < len(check.got) * BATCH  # ... and not all: seen samples are kept
    np.testing.assert_allclose(check.got, check.expected, rtol=1e-5)
    fractions = [v for _, v in logger.data["irdro/screened_fraction"]]
    assert len(fractions) == len(check.got) and 0.0 < float(np.mean(fractions)) < 1.0
    assert np.isclose(float(np.mean(fractions)) * len(check.got) * BATCH, check.screened)


def test_screen_block_leaves_out_only_first_visits_inside_the_block() -> None:
    check, _ = _run("resample", screen="block")
    valley = check.sampler.order.weights.params.block_valley
    assert 0.06 < valley < 0.5  # the refit found the block above the primed bulk
    assert 0 < check.screened < len(check.got) * BATCH
    assert check.differ > 0  # first visits above the cut but below the block: the full screen would leave them out
    # The model's loss less the screened share (a microbatch screened whole: zero up to float32 rounding).
    np.testing.assert_allclose(check.got, check.expected, rtol=1e-5, atol=1e-6)


def test_screen_options_are_checked() -> None:
    with pytest.raises(ValueError, match="mode='reweight'"):
        IRDRO(mode="reweight", screen=True)
    with pytest.raises(ValueError, match="IRDRO\\(screen='block'\\) needs the sampler's draws"):
        IRDRO(mode="reweight", screen="block")
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match=f"screen must be True, False or 'block', got {bad!r}"):
            IRDRO(screen=bad)
    assert "screen=True" in repr(IRDRO(screen=True)) and "screen" not in repr(IRDRO())
    assert "screen='block'" in repr(IRDRO(screen="block"))


@pytest.mark.parametrize("custom", [False, True])
def test_screened_model_loss_removes_the_screened_tokens_exactly(custom: bool) -> None:
    """A causal LM's token-mean loss (padding ignored) less the screened rows' share: the kept rows' gradients are
    the unscreened loss's, the screened rows' zero, the divisor kept. With a custom loss_fn (per-sequence means) the
    share removed is proportional to its losses instead."""
    from irdro_sampler.integrations.composer.losses import causal_lm_per_sample_loss, screened_model_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 11, generator=gen, requires_grad=True)
    labels = torch.randint(0, 11, (4, 6), generator=gen)
    labels[1, 4:] = -100  # padding
    batch = {"labels": labels}
    model_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    per_sample = causal_lm_per_sample_loss(logits.detach(), labels)
    keep = np.array([True, False, True, False])
    loss_fn = (lambda out, b: causal_lm_per_sample_loss(out["logits"], b["labels"])) if custom else IRDRO().loss_fn
    got = screened_model_loss(model_loss, {"logits": logits}, batch, per_sample, keep, loss_fn)
    (g_got,) = torch.autograd.grad(got, logits, retain_graph=True)
    if custom:  # the model's loss taken as the mean of the per-sequence means: their kept share
        share = float(per_sample[torch.from_numpy(keep)].sum() / per_sample.sum())
        assert float(got) == pytest.approx(float(model_loss) * share, rel=1e-5)
        return
    (g_own,) = torch.autograd.grad(model_loss, logits)
    rows = torch.from_numpy(~keep)
    assert float(g_got[rows].abs().max()) <= 1e-6
    torch.testing.assert_close(g_got[~rows], g_own[~rows], rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="loss_fn returned losses without gradients"):
        screened_model_loss(model_loss, {"logits": logits}, batch, per_sample, keep,
                            lambda out, b: causal_lm_per_sample_loss(out["logits"].detach(), b["labels"]))
    assert screened_model_loss(model_loss, {"logits": logits}, batch, per_sample, np.ones(4, bool), loss_fn) is model_loss
