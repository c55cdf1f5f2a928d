"""Map-style task families for the quality benchmark: real bundled data, rare groups, injected noise.

Two families beside the byte-level LM (``irdro_sampler.demo``), both trained in a plain PyTorch loop
with ``IRDROSampler`` (or a uniform baseline) exactly as a user would:

* ``digits``: scikit-learn's bundled 8x8 digit images (1,797 real images, 10 classes). Three classes
  are kept at 15% of their training samples (the rare groups); a share of training labels is flipped,
  either *symmetric* (to a random other class) or *pair* (class-dependent: each class to one fixed
  confusable class, as in the noisy-label literature). Metrics: test accuracy, mean accuracy of the
  rare classes, worst-class accuracy.
* ``diabetes``: scikit-learn's bundled diabetes regression set (442 patients), target in its raw units
  (a per-sample squared error of 1e3-1e4: a loss scale far from the LM's 1-3 nats). The rare group is
  the top BMI third, kept at 20% in training; noise replaces a share of training targets with
  heavy-tailed corruption (target + 2 standard deviations times a Student-t draw with 2 degrees of freedom). Metrics: test RMSE
  (negated, so higher is better everywhere), RMSE of the rare group.

A third kind, ``"lm"`` (built by ``task_suite_families.py``), trains the demo's tiny byte-level GPT-2
(``irdro_sampler.demo.model``) on byte documents: ``x`` and ``y`` are the token ids, ``y_test`` the
held-out documents' domain ids; the metrics are negated held-out losses (nats/byte).

Every arm of one (task, noise, seed) starts from the same initial model (``init_state`` if given, e.g. a
shared uniformly pretrained checkpoint), sees the same number of steps and batch size, and is evaluated
on the same clean test set. ``uniform`` is shuffled epochs
(``DataLoader(shuffle=True)``); ``oracle`` is shuffled epochs over the clean training samples only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from irdro_sampler import IndexedDataset, IRDROSampler
from irdro_sampler.weights import DROWeighting, kl_dro_weights


@dataclass
class Task:
    """One family's data: train tensors with group/noise flags, a clean test set, how to score."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    rare: np.ndarray  # bool per training sample: in a rare group
    noisy: np.ndarray  # bool per training sample: corrupted label / target
    x_test: torch.Tensor
    y_test: torch.Tensor
    rare_test: np.ndarray
    kind: str  # "classification" or "regression"
    num_outputs: int
    epochs: int
    batch_size: int
    lr: float
    # Options of the randomised suite (task_suite.py); the defaults are the quality benchmark's families.
    width: int = 64  # hidden units (MLP) or embedding width (LM)
    layers: int = 1  # hidden layers (MLP) or transformer blocks (LM)
    y_scale: float = 60.0  # regression head: outputs are net(x) * y_scale + median(y)
    steps: int | None = None  # training steps; None: epochs * ceil(n / batch_size)
    group_labels: np.ndarray | None = None  # what groups="labels" passes; None: the (noisy) class labels
    init_state: dict | None = None  # a state dict every arm starts from; None: fresh init from the seed
    meta: dict = field(default_factory=dict)  # family-specific facts (LM: domain names, shares, rare ones)


# ------------------------------------------------------------------------------------------ data
def digits_task(noise: float, seed: int, flips: str = "symmetric") -> Task:
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
    # The split, the rare classes and their kept samples are fixed; the seed draws the label noise
    # (and, in run_arm, the initial model and the order), so seed spreads measure training noise.
    rng = np.random.default_rng([0, 1])
    rare_classes = rng.choice(10, size=3, replace=False)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):  # stratified: 40% of each class for the test set
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(round(0.4 * idx.size))]] = True
    train = np.flatnonzero(~test)
    keep = np.ones(train.size, dtype=bool)
    for c in rare_classes:
        pos = np.flatnonzero(y[train] == c)
        keep[rng.permutation(pos)[int(round(0.15 * pos.size)) :]] = False
    train = train[keep]
    y_train = y[train].copy()
    rng = np.random.default_rng([seed, 11])
    noisy = rng.random(train.size) < noise
    if flips == "symmetric":
        shift = rng.integers(1, 10, size=train.size)
        y_train[noisy] = (y_train[noisy] + shift[noisy]) % 10
    elif flips == "pair":
        pair = rng.permutation(10)  # class c is confused with pair_of[c] (a fixed derangement)
        pair_of = np.roll(pair, 1)[np.argsort(pair)]
        y_train[noisy] = pair_of[y_train[noisy]]
    else:
        raise ValueError(f"flips must be 'symmetric' or 'pair', got {flips!r}")
    return Task(
        name=f"digits-{flips}", x=torch.from_numpy(x[train]), y=torch.from_numpy(y_train),
        rare=np.isin(y[train], rare_classes), noisy=noisy, x_test=torch.from_numpy(x[test]),
        y_test=torch.from_numpy(y[test]), rare_test=np.isin(y[test], rare_classes),
        kind="classification", num_outputs=10, epochs=40, batch_size=32, lr=1e-3,
    )


def diabetes_task(noise: float, seed: int) -> Task:
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x, y = d.data.astype(np.float32), d.target.astype(np.float32)
    x = (x - x.mean(0)) / x.std(0)
    rng = np.random.default_rng([0, 2])  # fixed split and rare subsample; the seed draws the noise
    rare_all = x[:, 2] > np.quantile(x[:, 2], 2 / 3)  # the top BMI third
    order = rng.permutation(len(y))
    test = np.zeros(len(y), dtype=bool)
    test[order[: int(0.35 * len(y))]] = True
    train = np.flatnonzero(~test)
    keep = ~rare_all[train] | (rng.random(train.size) < 0.2)
    train = train[keep]
    y_train = y[train].copy()
    rng = np.random.default_rng([seed, 12])
    noisy = rng.random(train.size) < noise
    y_train[noisy] += 2.0 * y.std() * rng.standard_t(2, int(noisy.sum())).astype(np.float32)
    return Task(
        name="diabetes", x=torch.from_numpy(x[train]), y=torch.from_numpy(y_train), rare=rare_all[train],
        noisy=noisy, x_test=torch.from_numpy(x[test]), y_test=torch.from_numpy(y[test]),
        rare_test=rare_all[test], kind="regression", num_outputs=1, epochs=60, batch_size=16, lr=3e-3,
    )


def make_task(family: str, noise: float, seed: int) -> Task:
    if family == "digits-symmetric":
        return digits_task(noise, seed, "symmetric")
    if family == "digits-pair":
        return digits_task(noise, seed, "pair")
    if family == "diabetes":
        return diabetes_task(noise, seed)
    raise ValueError(f"unknown family {family!r}")


# ------------------------------------------------------------------------------------------ model
class Model(torch.nn.Module):
    def __init__(self, task: Task) -> None:
        super().__init__()
        d = task.x.shape[1]
        hidden: list[torch.nn.Module] = []
        for k in range(task.layers):
            hidden += [torch.nn.Linear(d if k == 0 else task.width, task.width), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*hidden, torch.nn.Linear(task.width, task.num_outputs))
        if task.kind == "regression":  # predict in target units: a standardised head
            self.register_buffer("mu", task.y.median().reshape(()))
            self.register_buffer("sigma", torch.tensor(float(task.y_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.squeeze(-1) * self.sigma + self.mu if hasattr(self, "mu") else out


class ByteLM(torch.nn.Module):
    """The demo's tiny byte-level GPT-2 (``irdro_sampler.demo.model``); ``forward`` returns the logits."""

    def __init__(self, task: Task, seed: int) -> None:
        super().__init__()
        from irdro_sampler.demo.model import ModelConfig, build_hf_model

        cfg = ModelConfig(n_layer=task.layers, n_embd=task.width, n_head=4, seq_len=task.x.shape[1])
        self.lm = build_hf_model(cfg, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=x).logits


def build_model(task: Task, seed: int) -> torch.nn.Module:
    """The task's model, initialised from ``seed`` (after ``torch.manual_seed(seed)``) or ``task.init_state``."""
    model = ByteLM(task, seed) if task.kind == "lm" else Model(task)
    if task.init_state is not None:
        model.load_state_dict(task.init_state)
    return model


def per_sample_loss(task: Task, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task.kind == "lm":  # token-mean cross-entropy of each document (next-byte prediction)
        ce = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), y[:, 1:].reshape(-1), reduction="none")
        return ce.view(y.shape[0], -1).mean(1)
    if task.kind == "classification":
        return F.cross_entropy(out, y, reduction="none")
    return (out - y) ** 2


@torch.no_grad()
def evaluate(task: Task, model: torch.nn.Module) -> dict[str, float]:
    if task.kind == "lm":
        return evaluate_lm(task, model)
    out = model(task.x_test)
    rare = torch.from_numpy(task.rare_test)
    if task.kind == "classification":
        correct = (out.argmax(-1) == task.y_test).float()
        per_class = [correct[task.y_test == c].mean().item() for c in range(task.num_outputs)]
        return {"score": correct.mean().item(), "rare": correct[rare].mean().item(), "worst": min(per_class)}
    err = (out - task.y_test) ** 2
    # Negated RMSE: higher is better in every family.
    return {"score": -err.mean().sqrt().item(), "rare": -err[rare].mean().sqrt().item(),
            "worst": -max(err[rare].mean().sqrt().item(), err[~rare].mean().sqrt().item())}


@torch.no_grad()
def evaluate_lm(task: Task, model: torch.nn.Module) -> dict[str, float]:
    """Negated held-out losses (nats/byte): ``score`` weights each clean domain by its training share (the
    ERM objective), ``rare`` is the mean over the rare domains, ``worst`` the largest domain loss."""
    per = torch.cat([per_sample_loss(task, model(x), x) for x in task.x_test.split(256)]).numpy()
    dom = task.y_test.numpy()
    loss = {d: float(per[dom == i].mean()) for i, d in enumerate(task.meta["domains"]) if (dom == i).any()}
    shares = task.meta["train_shares"]
    score = sum(shares[d] * loss[d] for d in shares) / sum(shares.values())
    rare = float(np.mean([loss[d] for d in task.meta["rare_domains"]]))
    return {"score": -score, "rare": -rare, "worst": -max(loss.values())}


# ------------------------------------------------------------------------------------------ arms
@torch.no_grad()
def score_losses(task: Task, model: torch.nn.Module, batch_size: int = 256) -> torch.Tensor:
    """The model's per-sample loss on every training sample (eval mode, no update): a scoring pass."""
    model.eval()
    losses = torch.cat([per_sample_loss(task, model(task.x[i:i + batch_size]), task.y[i:i + batch_size])
                        for i in range(0, len(task.y), batch_size)])
    model.train()
    return losses


def run_arm(task: Task, arm: str, options: dict[str, Any] | None, seed: int,
            on_epoch_end: Callable[[int, IRDROSampler | None, np.ndarray], None] | None = None,
            return_state: bool = False) -> dict[str, Any]:
    """Train one arm; ``options`` are IRDROSampler options (None for the uniform/oracle/reweight arms).
    With ``return_state`` the result holds the trained model's state dict under ``"state"``.

    ``on_epoch_end(epoch, sampler, drawn)``, if given, is called after every epoch (for diagnostics:
    ``benchmarks/cut_recall.py``); ``sampler`` is None for arms without one, ``drawn`` counts the draws
    of each training sample so far.
    """
    screen = False
    report_root = False
    torch.manual_seed(seed)
    model = build_model(task, seed)
    opt = torch.optim.Adam(model.parameters(), lr=task.lr)
    n = len(task.y)
    ds = IndexedDataset(TensorDataset(task.x, task.y))
    sampler = None
    scoring_seconds = None
    if arm == "oracle":
        clean = np.flatnonzero(~task.noisy)
        loader = DataLoader(torch.utils.data.Subset(ds, clean.tolist()), batch_size=task.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
    elif options is None:
        loader = DataLoader(ds, batch_size=task.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    else:
        options = dict(options)
        score_first = options.pop("score_first", False)
        cut_oracle = options.pop("cut_oracle", False)  # a diagnostic bound (threshold_bound.py), not a rule
        screen = options.pop("screen_first", False)  # a loop recipe (RESULTS_suite_screen.md), not an option
        evidence_gate = options.pop("evidence_gate", False)  # a probe (evidence_gate.py), not a rule
        report_root = options.pop("report_root", False)  # a probe: a squared error reported as |residual|
        if options.get("groups") == "labels":  # what a classifier user passes: the class labels
            options["groups"] = task.y.numpy() if task.group_labels is None else task.group_labels
        sampler = IRDROSampler(ds, task.batch_size, seed=seed, **options)
        if cut_oracle:
            from threshold_bound import with_best_thresholds

            with_best_thresholds(sampler, task.noisy)
        if evidence_gate:
            from evidence_gate import with_evidence_gate

            with_evidence_gate(sampler)
        if score_first:  # a scoring pass: the starting model's losses in the table before the first draw
            t0 = time.perf_counter()
            sampler.prime(np.arange(n), score_losses(task, model))
            scoring_seconds = time.perf_counter() - t0
        loader = DataLoader(ds, batch_size=task.batch_size, sampler=sampler)
    steps_total = task.steps if task.steps is not None else task.epochs * math.ceil(n / task.batch_size)
    drawn = np.zeros(n, dtype=np.int64)
    screened = 0  # draws the first-visit screen left out of the loss
    if screen == "block":  # the probe at 500 seen losses (RESULTS_suite_block_screen.md), before the library had it
        from block_screen import BlockScreen

        block_screen = BlockScreen()
    step = 0
    epoch = 0
    t_train = time.perf_counter()
    while step < steps_total:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y, idx in loader:
            if step >= steps_total:
                break
            loss = per_sample_loss(task, model(x), y)
            if arm == "reweight":  # the paper's in-batch softmax reweighting (weights detached)
                lv = loss.detach().numpy().astype(np.float64)
                w = torch.from_numpy(kl_dro_weights(lv, DROWeighting().temperature_for(lv))).float()
                total = (w * loss).sum()
            elif screen:  # the first-visit screen (IRDROSampler.screen): a first visit the cut would take is left out
                # ("block", a probe: only first visits inside a block of unlearnable samples, block_screen.py)
                # ("library-block": the library's screen(..., block_only=True), at 100 seen losses)
                keep = (block_screen.keep(sampler, idx, loss.detach()) if screen == "block"
                        else sampler.screen(idx, loss.detach(), block_only=screen == "library-block"))
                screened += int(keep.size - keep.sum())
                total = (loss * torch.from_numpy(keep)).mean()
            else:
                total = loss.mean()
            opt.zero_grad()
            total.backward()
            opt.step()
            if sampler is not None:
                sampler.update(idx, loss.detach().sqrt() if report_root else loss.detach(), step=step)
            np.add.at(drawn, idx.numpy(), 1)
            step += 1
        epoch += 1
        if on_epoch_end is not None:
            on_epoch_end(epoch, sampler, drawn)
    train_seconds = time.perf_counter() - t_train
    model.eval()
    result = evaluate(task, model)
    if return_state:
        result["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    total_draws = drawn.sum()
    result["noise_draws"] = float(drawn[task.noisy].sum() / total_draws)
    result["noise_share"] = float(task.noisy.mean())
    result["rare_draws"] = float(drawn[task.rare].sum() / total_draws)
    result["rare_share"] = float(task.rare.mean())
    if sampler is not None:
        s = sampler.stats()
        result.update({k: float(s[k]) for k in ("truncated_fraction", "temperature", "ess_fraction", "readmitted",
                                                 "remeasured_cut")})
    if screen:
        result["screened"] = float(screened / total_draws)
    if scoring_seconds is not None:  # the scoring pass's time against the training loop's
        result["scoring_cost"] = scoring_seconds / train_seconds
    return result

