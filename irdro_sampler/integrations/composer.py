"""Composer integration: the ``IRDRO`` algorithm.

Turns IR-DRO on in a Composer (or llm-foundry) run with one algorithm entry. The algorithm only
*translates* between Composer's training loop and the core, which *decides*:

* It finds what to feed at ``FIT_START``: an :class:`~irdro_sampler.IRDROSampler` in the train
  DataLoader (``sampler=`` or inside ``batch_sampler=``), or a weighted streaming dataset (anything
  with ``set_weights`` and ``round_size``, such as
  ``irdro_sampler.integrations.streaming.WeightedStreamingDataset``).
* At ``AFTER_DATALOADER`` it takes the samples' indices out of the batch (``sample_idx``, or a tuple
  batch's last element), so the model never sees them: a stock ``ComposerClassifier`` on ``(x, y)`` or
  a stock ``HuggingFaceModel`` needs no change. Callbacks read them with :func:`batch_sample_indices`.
* At ``AFTER_FORWARD`` it computes one loss per sample from ``state.outputs`` and the microbatch
  (no extra forward pass), pairs it with the microbatch's slice of the indices, and at ``BATCH_END``
  gathers the feedback of all ranks (in rank order) so every rank applies identical updates in
  identical order.
* In ``importance`` and ``reweight`` modes it replaces ``state.loss`` at ``AFTER_LOSS`` (Composer
  0.32.1 backpropagates ``state.loss`` as it is after ``AFTER_LOSS``/``BEFORE_BACKWARD``).

Facts about Composer 0.32.1 this module relies on (checked in ``composer/trainer/trainer.py``):

* Event order per batch: ``AFTER_DATALOADER``, ``BATCH_START``, then per attempt
  ``BEFORE_TRAIN_BATCH`` and per microbatch ``BEFORE_FORWARD``, ``AFTER_FORWARD``, ``BEFORE_LOSS``,
  ``AFTER_LOSS``, ``BEFORE_BACKWARD``, ``AFTER_BACKWARD``; then ``AFTER_TRAIN_BATCH``, then
  ``state.timestamp`` advances, then ``BATCH_END`` and ``BATCH_CHECKPOINT``. So the step of a batch is
  read at ``BATCH_START`` (``state.timestamp`` still points at it) and feedback is committed at
  ``BATCH_END``, before a checkpoint is written.
* Microbatches are consecutive slices of the batch, in order (``DataSpec.split_batch``'s default; a
  custom ``split_batch`` that reorders samples would misattribute losses), so the k-th microbatch's
  indices are the next ``len(microbatch)`` recorded ones.
* Auto-microbatching OOM retries (and optimizer closures) rerun ``_train_microbatches``, which fires
  ``BEFORE_TRAIN_BATCH`` each time: collected feedback is reset there, so retries never double count.
* Checkpoints are loaded inside ``Trainer.__init__`` (algorithm ``load_state_dict`` is called there),
  possibly before the train DataLoader exists; the state is stashed and applied at ``FIT_START``, which
  comes before Composer spins/replays the DataLoader to the resumption point.
* On resume of a plain DataLoader, Composer iterates the current epoch from its start and discards the
  already-trained batches without firing any training event; the sampler tolerates those replays.
* Checkpoints are read with ``torch.load(weights_only=False)``; the state here is torch tensors and
  python primitives anyway (also loadable with ``weights_only=True``).

Importing :mod:`irdro_sampler` never imports Composer; only this module does.
"""

from __future__ import annotations

import copy
import importlib
import math
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist

from irdro_sampler import (
    DROWeighting,
    IndexedDataset,
    IRDROSampler,
    LossTable,
    kl_dro_weights,
)
from irdro_sampler._validation import as_groups
from irdro_sampler.fingerprint import digest_to_int, table_digest
from irdro_sampler.loss_table import check_table_state
from irdro_sampler.weights import cut_transitions, kept_mask

__all__ = [
    "IRDRO",
    "batch_sample_indices",
    "causal_lm_loss_sums",
    "causal_lm_per_sample_loss",
    "classification_per_sample_loss",
    "default_per_sample_loss",
    "gather_feedback",
]

PerSampleLossFn = Callable[[Any, Any], torch.Tensor]

_MODES = ("resample", "importance", "reweight")
_STATE_VERSION = 1


# ============================================================================ functional part
def causal_lm_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    max_chunk_bytes: int = 2**28,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of next-token cross-entropy and number of target tokens.

    Contract: ``logits`` is ``(B, T, V)`` (any float dtype), ``labels`` is ``(B, T)`` with
    ``ignore_index`` marking positions without a target. Labels are shifted as HuggingFace causal LMs
    (and llm-foundry) do: position ``t`` predicts ``labels[:, t + 1]``. Logits are upcast to float32
    a chunk of sequences at a time so that at most ``max_chunk_bytes`` of float32 logits exist at once
    (B x T x V float32 never has to fit). Returns ``(sums, counts)``: float32 and int64, shape ``(B,)``.
    Gradients flow through ``sums`` if ``logits`` requires grad.
    """
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"causal LM loss needs logits (B, T, V) and labels (B, T); got logits {tuple(logits.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    b, t, v = logits.shape
    target = labels[:, 1:].to(logits.device)
    counts = (target != ignore_index).sum(dim=1)
    if b == 0 or t < 2:
        return logits.new_zeros((b,), dtype=torch.float32) + 0.0 * logits.sum(), counts
    rows = max(1, int(max_chunk_bytes) // max(1, (t - 1) * v * 4))
    parts = []
    for start in range(0, b, rows):
        chunk = logits[start : start + rows, :-1].float()
        tok = F.cross_entropy(
            chunk.reshape(-1, v), target[start : start + rows].reshape(-1), ignore_index=ignore_index, reduction="none"
        )
        parts.append(tok.view(chunk.shape[0], t - 1).sum(dim=1))
    return torch.cat(parts), counts


def causal_lm_per_sample_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    max_chunk_bytes: int = 2**28,
) -> torch.Tensor:
    """Token-mean next-token cross-entropy per sequence, float32, shape ``(B,)``.

    See :func:`causal_lm_loss_sums` for the contract. A sequence without any target token gets NaN
    (the sampler skips non-finite feedback; the modes that change the loss give it weight 0). The
    token-weighted mean ``sum(loss * counts) / sum(counts)`` equals HuggingFace's batch loss.
    """
    sums, counts = causal_lm_loss_sums(logits, labels, ignore_index=ignore_index, max_chunk_bytes=max_chunk_bytes)
    mean = sums / counts.clamp(min=1).to(sums.dtype)
    # torch.where (not masking by multiplication) so the NaN never reaches a gradient.
    return torch.where(counts > 0, mean, torch.full_like(mean, math.nan))


def classification_per_sample_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``cross_entropy(logits.float(), targets, reduction='none')``: shape ``(B,)``, float32."""
    return F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")


def _logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(
        f"the default per-sample loss cannot find logits in the model outputs ({type(outputs).__name__}); "
        "pass loss_fn=(outputs, batch) -> 1-D tensor of per-sample losses to IRDRO"
    )


def _targets_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping):
        if "labels" in batch:
            return batch["labels"]
        if "input_ids" in batch:  # causal LM without explicit labels: predict the inputs, skip padding
            labels = batch["input_ids"].clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"] == 0] = -100
            return labels
        raise KeyError(
            f"the default per-sample loss needs 'labels' (or 'input_ids') in the batch; it has {sorted(batch)}"
        )
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise TypeError(
        f"the default per-sample loss cannot find targets in a batch of type {type(batch).__name__}; "
        "pass loss_fn to IRDRO"
    )


def default_per_sample_loss(outputs: Any, batch: Any) -> torch.Tensor:
    """Per-sample loss from model outputs and the (micro)batch, without another forward pass.

    * Causal LMs (logits ``(B, T, V)``, labels ``(B, T)``; HuggingFace or llm-foundry outputs with
      ``logits``, batch with ``labels`` or else ``input_ids``/``attention_mask``):
      :func:`causal_lm_per_sample_loss` (shifted labels, ignore_index -100, chunked float32 upcast).
    * Classifiers (logits ``(B, C)``, integer targets ``(B,)`` from ``batch['labels']`` or
      ``batch[1]``): :func:`classification_per_sample_loss`.

    Anything else (token classification, regression, custom losses) needs an explicit ``loss_fn``.
    """
    logits = _logits_of(outputs)
    targets = _targets_of(batch)
    if logits.ndim == 3 and targets.ndim == 2:
        return causal_lm_per_sample_loss(logits, targets)
    if logits.ndim == 2 and targets.ndim == 1:
        return classification_per_sample_loss(logits, targets)
    raise ValueError(
        f"the default per-sample loss handles causal LMs (logits (B, T, V), labels (B, T)) and classifiers "
        f"(logits (B, C), targets (B,)); got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: "
        "pass loss_fn to IRDRO"
    )


_NAMED_LOSS_FNS: dict[str, PerSampleLossFn] = {
    "auto": default_per_sample_loss,
    "causal_lm": lambda outputs, batch: causal_lm_per_sample_loss(_logits_of(outputs), _targets_of(batch)),
    "classification": lambda outputs, batch: classification_per_sample_loss(_logits_of(outputs), _targets_of(batch)),
}


def _resolve_loss_fn(loss_fn: PerSampleLossFn | str | None) -> PerSampleLossFn:
    if loss_fn is None:
        return default_per_sample_loss
    if callable(loss_fn):
        return loss_fn
    if isinstance(loss_fn, str):
        if loss_fn in _NAMED_LOSS_FNS:
            return _NAMED_LOSS_FNS[loss_fn]
        if ":" in loss_fn:  # "package.module:function", for YAML configs
            module, _, name = loss_fn.partition(":")
            fn = getattr(importlib.import_module(module), name)
            if callable(fn):
                return fn
    raise ValueError(
        f"loss_fn must be a callable (outputs, batch) -> per-sample losses, one of {sorted(_NAMED_LOSS_FNS)}, "
        f"or 'package.module:function'; got {loss_fn!r}"
    )


def gather_feedback(indices: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather variable-length ``(indices, losses)`` from every rank, concatenated in rank order.

    Contract: must be called by every rank (a collective). ``indices`` int, ``losses`` float, both 1-D of
    the same length, on the rank's training device (NCCL needs CUDA tensors). Counts may differ between
    ranks: each rank pads to the largest count. Losses travel bit-exactly as float32 (reinterpreted as
    int32 inside one int64 tensor, so one collective carries both). Returns CPU ``(int64, float32)``
    tensors, identical on every rank.
    """
    indices = indices.reshape(-1).to(torch.int64)
    losses = losses.reshape(-1).to(torch.float32)
    if dist.get_world_size() == 1:
        return indices.cpu(), losses.cpu()
    device = indices.device
    count = torch.tensor([indices.numel()], dtype=torch.int64, device=device)
    counts = [int(c.item()) for c in dist.all_gather(count)]
    longest = max(counts)
    if longest == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32)
    packed = torch.zeros((longest, 2), dtype=torch.int64, device=device)
    packed[: indices.numel(), 0] = indices
    packed[: indices.numel(), 1] = losses.to(device).view(torch.int32).to(torch.int64)
    parts = [p[:c].cpu() for p, c in zip(dist.all_gather(packed), counts, strict=True)]
    both = torch.cat(parts)
    return both[:, 0].contiguous(), both[:, 1].to(torch.int32).view(torch.float32).contiguous()


# ============================================================================ the algorithm
def _without_key(batch: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``batch`` without ``key``, of the same mapping type where it can be copied (dict, BatchEncoding)."""
    if isinstance(batch, MutableMapping):
        out = copy.copy(batch)
        del out[key]
        return out
    return {k: v for k, v in batch.items() if k != key}


def _num_rows(batch: Any) -> int | None:
    """Leading size of the first tensor in a (micro)batch: its number of samples (None if no tensor)."""
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    return None


def batch_sample_indices(state: State) -> torch.Tensor | None:
    """The current training batch's sample indices (CPU int64), for callbacks.

    ``IRDRO`` takes them out of the batch at ``AFTER_DATALOADER`` (callbacks run after algorithms);
    without an IRDRO, a dict batch's ``sample_idx`` is read as it is. None when there are none.
    """
    for algo in state.algorithms:
        if isinstance(algo, IRDRO) and algo.batch_indices is not None:
            return algo.batch_indices
    batch = state.batch
    if isinstance(batch, Mapping) and "sample_idx" in batch:
        return torch.as_tensor(batch["sample_idx"]).to("cpu", torch.int64)
    return None


def _find_sampler(dataloader: Any) -> IRDROSampler | None:
    for obj in (getattr(dataloader, "sampler", None), getattr(dataloader, "batch_sampler", None)):
        for candidate in (obj, getattr(obj, "sampler", None)):
            if isinstance(candidate, IRDROSampler):
                return candidate
    return None


def _is_weighted_stream(dataset: Any) -> bool:
    # Duck typing: importing the streaming integration (and so `streaming`) is not needed here.
    return callable(getattr(dataset, "set_weights", None)) and hasattr(dataset, "round_size")


class IRDRO(Algorithm):
    """IR-DRO for Composer: feed per-sample losses back to the sampler that draws the training data.

    Put an :class:`~irdro_sampler.IRDROSampler` in the train DataLoader (``DataLoader(IndexedDataset(ds),
    sampler=IRDROSampler(ds, batch_size), batch_size=batch_size)``) or train on a weighted streaming
    dataset, and add ``IRDRO()`` to ``Trainer(algorithms=[...])``.

    Args:
        **rule_options: the weighting rule's options, exactly those of
            :class:`~irdro_sampler.DROWeighting` (``temperature``, ``ess_fraction``, ``truncate_zscore``,
            ``cut_rule``, ``uniform_mix``, ...; validated there). With an ``IRDROSampler`` the sampler's
            own options decide: any option given here must agree with it, else ``FIT_START`` raises (one
            source of truth). With a streaming dataset they configure the rule this algorithm keeps. In
            ``reweight`` mode the rule's temperature (fixed, or calibrated per microbatch) sets the
            in-batch softmax.
        ema, prior, groups: the loss table's options (:class:`~irdro_sampler.LossTable`), for the
            streaming path's table (with an ``IRDROSampler`` its own table decides and they must agree).
        loss_fn: ``(outputs, batch) -> 1-D tensor`` with one loss per sample of the microbatch, computed
            from ``state.outputs`` (no extra forward); a name (``'auto'``, ``'causal_lm'``,
            ``'classification'``) or ``'package.module:function'`` for YAML. Default ``'auto'``
            (:func:`default_per_sample_loss`). In ``importance``/``reweight`` mode it must keep gradients.
        index_key: where each sample's index is in the batch: a key for dict batches (default
            ``'sample_idx'``, what :class:`~irdro_sampler.IndexedDataset` and the streaming dataset add),
            or an int position for tuple batches (default for tuples from ``IndexedDataset``: the last).
        mode: ``'resample'`` (draw proportionally to the DRO weights; loss unchanged), ``'importance'``
            (same draws; loss ``mean_i(w_i * l_i)`` with ``w_i = 1/(N p_i)``, unbiased for the uniform
            ERM objective), or ``'reweight'`` (the paper's original: uniform data, loss
            ``sum_i softmax(l/tau)_i * l_i`` within each microbatch on each rank, weights detached; needs
            no IRDROSampler, but if one is present it is fed too).
        log_interval: log ``irdro/*`` metrics every this many batches (0 disables). The sampler's
            diagnostics cost O(N) (a pass over the probabilities), so keep it coarse for large N.
        check_interval: compare the ranks' fingerprints (one all-gather of one int64) at ``FIT_START``
            and every this many batches; ranks that disagree raise ``RuntimeError`` naming them
            (default: ``log_interval``; 0 checks at ``FIT_START`` only). With an ``IRDROSampler`` the
            fingerprint is :meth:`~irdro_sampler.IRDROSampler.fingerprint` (O(1)); on the streaming path it
            digests the loss table, the rule and the dataset's weights (O(N) per check).
    """

    def __init__(
        self,
        *,
        ema: float | None = None,
        prior: float | str | None = None,
        loss_fn: PerSampleLossFn | str | None = None,
        index_key: str | int = "sample_idx",
        mode: str = "resample",
        log_interval: int = 100,
        check_interval: int | None = None,
        groups: Any = None,
        **rule_options: Any,
    ) -> None:
        if check_interval is None:
            check_interval = log_interval if isinstance(log_interval, int) else 0
        if isinstance(check_interval, bool) or not isinstance(check_interval, int) or check_interval < 0:
            raise ValueError(f"check_interval must be an int >= 0 or None, got {check_interval!r}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 0:
            raise ValueError(f"log_interval must be an int >= 0, got {log_interval!r}")
        if isinstance(index_key, bool) or not isinstance(index_key, (str, int)):
            raise TypeError(f"index_key must be a str (dict batches) or int (tuple batches), got {index_key!r}")
        self.rule_options = dict(rule_options)
        self.table_options = {k: v for k, v in dict(ema=ema, prior=prior).items() if v is not None}
        self.groups = groups
        # Validate now (a YAML typo fails at construction, not at the first batch).
        self._rule = DROWeighting(**self.rule_options)
        LossTable(1, **self.table_options)
        if groups is not None:
            as_groups(groups, len(groups))
        self.loss_fn_spec = loss_fn
        self.loss_fn = _resolve_loss_fn(loss_fn)
        self.index_key = index_key
        self.mode = mode
        self.log_interval = log_interval
        self.check_interval = check_interval

        # What is fed (resolved at FIT_START).
        self.sampler: IRDROSampler | None = None
        self.dataset: Any = None  # weighted streaming dataset
        self.table: LossTable | None = None  # the streaming path's table
        self._tuple_index_last = False
        #: The current training batch's sample indices (CPU int64), taken out of the batch at
        #: AFTER_DATALOADER; None when the batch carried none. See :func:`batch_sample_indices`.
        self.batch_indices: torch.Tensor | None = None
        self._microbatch_start = 0
        self._pending_state: dict[str, Any] | None = None
        # Per-batch bookkeeping.
        self._step = 0
        self._idx_parts: list[torch.Tensor] = []
        self._loss_parts: list[torch.Tensor] = []
        self._grad_losses: torch.Tensor | None = None
        self._grad_indices: torch.Tensor | None = None
        self._checked_first_batch = False
        self._drawn_sum = 0.0
        self._drawn_count = 0
        self._nonfinite_weights = 0
        self._reweight_max_sum = 0.0
        self._reweight_ess_sum = 0.0
        self._reweight_count = 0
        # The streaming path's cut in force (fit when the round's weights were pushed) and its counters.
        self._stream_params: Any = None
        self._remeasured_cut = 0
        self._readmitted = 0

    def __repr__(self) -> str:
        opts = {**self.rule_options, **self.table_options}
        args = ", ".join(f"{k}={v!r}" for k, v in opts.items())
        extra = f"mode={self.mode!r}, index_key={self.index_key!r}, log_interval={self.log_interval}"
        if self.check_interval != self.log_interval:
            extra += f", check_interval={self.check_interval}"
        if isinstance(self.loss_fn_spec, str):
            extra += f", loss_fn={self.loss_fn_spec!r}"
        return f"IRDRO({args + ', ' if args else ''}{extra})"

    # ------------------------------------------------------------------ properties
    @property
    def feeds(self) -> bool:
        """Whether per-sample feedback goes anywhere (a sampler or a streaming table)."""
        return self.sampler is not None or self.table is not None

    def _needs_grad_losses(self) -> bool:
        return self.mode in ("importance", "reweight")

    # ------------------------------------------------------------------ events
    def match(self, event: Event, state: State) -> bool:
        if event in (Event.FIT_START, Event.BATCH_START, Event.BEFORE_TRAIN_BATCH, Event.AFTER_FORWARD, Event.BATCH_END):
            return True
        if event == Event.AFTER_DATALOADER:
            return True
        if event == Event.AFTER_LOSS:
            return self._needs_grad_losses()
        if event == Event.EPOCH_END:
            return self.table is not None
        return False

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state)
        elif event == Event.AFTER_DATALOADER:
            self._take_indices(state)
        elif event == Event.BATCH_START:
            self._step = self._global_step(state)
        elif event == Event.BEFORE_TRAIN_BATCH:
            self._microbatch_start = 0  # an OOM retry starts the batch's microbatches over
            self._idx_parts.clear()
            self._loss_parts.clear()
            self._grad_losses = self._grad_indices = None
        elif event == Event.AFTER_FORWARD:
            self._after_forward(state)
        elif event == Event.AFTER_LOSS:
            self._replace_loss(state)
        elif event == Event.BATCH_END:
            self._batch_end(state, logger)
        elif event == Event.EPOCH_END:
            self._push_stream_weights(logger)

    def _fit_start(self, state: State) -> None:
        dataloader = state.train_dataloader if state.train_dataloader is not None else state.dataloader
        dataset = getattr(dataloader, "dataset", None)
        self.sampler, self.dataset = _find_sampler(dataloader), None
        if self.sampler is not None:
            self._check_sampler(dataloader, self.sampler)
            self._tuple_index_last = isinstance(dataset, IndexedDataset)
        elif _is_weighted_stream(dataset):
            if self.mode == "importance" and not callable(getattr(dataset, "draw_probabilities", None)):
                raise ValueError(
                    f"IRDRO(mode='importance') needs the draw probabilities of the round in progress, which "
                    f"{type(dataset).__name__} does not expose (no draw_probabilities method); use "
                    "WeightedStreamingDataset or mode='resample'"
                )
            self.dataset = dataset
            num = int(dataset.num_samples)
            if self.table is None or self.table.num_samples != num:
                self.table = LossTable(num, **self.table_options, groups=self.groups)
        elif self.mode != "reweight":
            raise ValueError(
                f"IRDRO(mode={self.mode!r}) found nothing to feed in the train DataLoader "
                f"(sampler={type(getattr(dataloader, 'sampler', None)).__name__}, "
                f"dataset={type(dataset).__name__}). Put an IRDROSampler in it: "
                "DataLoader(IndexedDataset(ds), sampler=IRDROSampler(ds, batch_size), batch_size=batch_size), "
                "or train on irdro_sampler.integrations.streaming.WeightedStreamingDataset; "
                "mode='reweight' alone needs neither."
            )
        if self.dataset is None:
            self.table = None
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        self._checked_first_batch = False
        self._check_ranks_agree(state, "FIT_START")

    def _check_sampler(self, dataloader: Any, sampler: IRDROSampler) -> None:
        batch_size = getattr(dataloader, "batch_size", None)
        if batch_size is not None and batch_size != sampler.batch_size:
            raise ValueError(
                f"the IRDROSampler has batch_size={sampler.batch_size} but the DataLoader has "
                f"batch_size={batch_size}: they must be equal (the per-rank batch size)"
            )
        depth = int(getattr(dataloader, "num_workers", 0) or 0) * int(getattr(dataloader, "prefetch_factor", 2) or 2)
        if depth >= sampler.feedback_delay:
            warnings.warn(
                f"IRDROSampler(feedback_delay={sampler.feedback_delay}) does not exceed the DataLoader's prefetch "
                f"depth (num_workers x prefetch_factor = {depth}): feedback will often arrive after its batch was "
                "drawn (counted as late_feedback) and runs will not be exactly reproducible or resumable; "
                "raise feedback_delay",
                stacklevel=2,
            )
        rule_cfg = sampler.rule.config()
        mine = dict(self.rule_options)
        conflicts = [f"{k}={v!r} (sampler: {rule_cfg.get(k)!r})" for k, v in mine.items() if rule_cfg.get(k) != v]
        table = sampler.table
        for k, v in self.table_options.items():
            if getattr(table, k, v) != v:
                conflicts.append(f"{k}={v!r} (sampler: {getattr(table, k)!r})")
        if self.groups is not None and (
            table.groups is None or not np.array_equal(as_groups(self.groups, table.num_samples), table.groups)
        ):
            conflicts.append("groups (the sampler has other groups or none)")
        if conflicts and self.mode != "reweight":
            raise ValueError(
                "IRDRO options disagree with the IRDROSampler in the train DataLoader: "
                + ", ".join(conflicts)
                + ". The sampler's options decide; set them on IRDROSampler(...) and leave them out of IRDRO(...)"
            )

    def _global_step(self, state: State) -> int:
        ts = state.timestamp
        if self.sampler is not None:
            # The sampler's global batch index: epoch * batches_per_epoch + batch_in_epoch.
            return int(ts.epoch) * int(self.sampler.batches_per_epoch) + int(ts.batch_in_epoch)
        return int(ts.batch)

    # ------------------------------------------------------------------ per-sample feedback
    def _indices_of(self, batch: Any) -> torch.Tensor:
        key = self.index_key
        if isinstance(batch, Mapping):
            if isinstance(key, str) and key in batch:
                idx = batch[key]
            elif self.dataset is not None:
                raise KeyError(
                    f"IRDRO: the batch has no index key {key!r} (keys: {sorted(map(str, batch))}), although "
                    f"{type(self.dataset).__name__} adds it to every sample in get_item: it was lost on the way. "
                    "A subclass whose __getitem__ rebuilds the sample (llm-foundry's StreamingTextDataset "
                    f"tokenises it and keeps only the tokens) must put {key!r} back into what it returns, and a "
                    "collate function that drops unknown keys must be wrapped in "
                    "irdro_sampler.IndexListCollate(collate_fn). For llm-foundry, use the `irdro_text` train "
                    "loader (irdro_sampler.integrations.llmfoundry), which does both"
                )
            else:
                raise KeyError(
                    f"IRDRO: the batch has no index key {key!r} (keys: {sorted(map(str, batch))}). Wrap the "
                    "dataset in irdro_sampler.IndexedDataset (adds 'sample_idx') or set IRDRO(index_key=...)"
                )
        elif isinstance(batch, (tuple, list)):
            if isinstance(key, int):
                idx = batch[key]
            elif self._tuple_index_last:
                idx = batch[-1]
            else:
                raise KeyError(
                    f"IRDRO: tuple batch and index_key={key!r}: wrap the dataset in irdro_sampler.IndexedDataset "
                    "(appends the index as the last element) or set IRDRO(index_key=<position>)"
                )
        else:
            raise TypeError(f"IRDRO: cannot find sample indices in a batch of type {type(batch).__name__}")
        if not isinstance(idx, torch.Tensor):
            idx = torch.as_tensor(idx)
        if idx.ndim != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise TypeError(
                f"IRDRO: the batch's sample indices ({key!r}) must be a 1-D integer tensor, "
                f"got dtype {idx.dtype} and shape {tuple(idx.shape)}"
            )
        return idx

    def _take_indices(self, state: State) -> None:
        """Record the batch's indices and remove them from ``state.batch`` (the model never sees them).

        When nothing is fed (``reweight`` without a sampler), a dict batch's index key is still removed
        if present; a tuple's last element is only known to be an index when an IndexedDataset is fed.
        """
        batch = state.batch
        self.batch_indices = None
        if not self.feeds:
            if isinstance(batch, Mapping) and isinstance(self.index_key, str) and self.index_key in batch:
                self.batch_indices = torch.as_tensor(batch[self.index_key]).detach().to("cpu", torch.int64)
                state.batch = _without_key(batch, self.index_key)
            return
        # Fails before any forward pass if the index is missing.
        self.batch_indices = self._indices_of(batch).detach().to("cpu", torch.int64)
        if isinstance(batch, Mapping):
            state.batch = _without_key(batch, self.index_key)
        else:
            pos = (self.index_key if isinstance(self.index_key, int) else -1) % len(batch)
            rest = [x for i, x in enumerate(batch) if i != pos]
            state.batch = tuple(rest) if isinstance(batch, tuple) else rest

    def _microbatch_indices(self, size: int) -> torch.Tensor:
        """The next ``size`` recorded indices: microbatches are consecutive slices of the batch."""
        assert self.batch_indices is not None
        start, end = self._microbatch_start, self._microbatch_start + size
        if end > self.batch_indices.numel():
            raise ValueError(
                f"IRDRO: loss_fn returned {size} losses for a microbatch, but only "
                f"{self.batch_indices.numel() - start} of the batch's {self.batch_indices.numel()} sample "
                "indices are left; loss_fn must return one loss per sample of the microbatch"
            )
        self._microbatch_start = end
        return self.batch_indices[start:end]

    def _after_forward(self, state: State) -> None:
        batch = state.batch
        if self._needs_grad_losses():
            losses = self.loss_fn(state.outputs, batch)
        else:
            with torch.no_grad():
                losses = self.loss_fn(state.outputs, batch)
        self._check_losses(losses, _num_rows(batch))
        indices = self._microbatch_indices(int(losses.shape[0])) if self.feeds else None
        if self._needs_grad_losses():
            self._grad_losses, self._grad_indices = losses, indices
            if not losses.requires_grad and torch.is_grad_enabled() and not self._checked_first_batch:
                raise ValueError(
                    f"IRDRO(mode={self.mode!r}): loss_fn returned losses without gradients; it must compute them "
                    "from state.outputs with autograd (no .detach(), no torch.no_grad())"
                )
        self._checked_first_batch = True
        if indices is not None:
            self._idx_parts.append(indices.detach())
            self._loss_parts.append(losses.detach().float())

    def _check_losses(self, losses: Any, size: int | None) -> None:
        if not isinstance(losses, torch.Tensor):
            raise TypeError(f"IRDRO: loss_fn must return a torch.Tensor, got {type(losses).__name__}")
        if losses.ndim != 1 or (size is not None and losses.shape[0] != size):
            expected = f"({size},)" if size is not None else "(batch size,)"
            raise ValueError(
                f"IRDRO: loss_fn must return one loss per sample, shape {expected}; got shape {tuple(losses.shape)}. "
                "Use reduction='none' and reduce over tokens per sequence"
            )
        if not losses.dtype.is_floating_point:
            raise TypeError(f"IRDRO: loss_fn must return floating point losses, got {losses.dtype}")

    # ------------------------------------------------------------------ loss replacement
    def _replace_loss(self, state: State) -> None:
        losses, indices = self._grad_losses, self._grad_indices
        if losses is None:
            return
        self._grad_losses = self._grad_indices = None
        if not isinstance(state.loss, torch.Tensor):
            raise TypeError(
                f"IRDRO(mode={self.mode!r}) replaces the model's loss and needs it to be a single tensor; "
                f"the model returned {type(state.loss).__name__}"
            )
        finite = torch.isfinite(losses.detach())
        safe = torch.where(finite, losses, torch.zeros_like(losses))
        n_valid = int(finite.sum().item())
        if self.mode == "importance":
            assert indices is not None
            weights = torch.as_tensor(self._importance_weights(indices.numpy())).to(device=safe.device, dtype=safe.dtype)
            if not bool(torch.isfinite(weights).all()):
                # Only possible when a batch's draw probabilities are no longer buffered and a sample has
                # since been cut (p = 0): leave it out rather than poison the step.
                self._nonfinite_weights += int((~torch.isfinite(weights)).sum())
                weights = torch.where(torch.isfinite(weights), weights, torch.zeros_like(weights))
            new = (weights * safe).sum() / max(n_valid, 1)
        else:  # reweight
            weights = self._softmax_weights(losses.detach(), finite)
            if n_valid:
                self._reweight_max_sum += float(weights.max())
                self._reweight_ess_sum += float(1.0 / (weights * weights).sum() / n_valid)
                self._reweight_count += 1
            weights = weights.to(device=safe.device, dtype=safe.dtype)
            new = (weights * safe).sum()
        state.loss = new.to(state.loss.dtype)

    def _importance_weights(self, indices: np.ndarray) -> np.ndarray:
        """``1 / (N p_i)`` with ``p`` the probabilities the samples were drawn from (float64).

        Sampler path: the batch's draw probabilities (buffered by the sampler). Streaming path: the
        round's frozen probabilities; a round of ``round_size`` draws holds sample ``i`` ``round_size *
        p_i`` times in expectation (exactly for i.i.d. draws; for balanced draws over the seeded phase),
        so the weighted loss summed over a round estimates ``round_size`` x the uniform mean loss.
        """
        if self.sampler is not None:
            return np.asarray(self.sampler.importance_weights(indices, step=self._step), dtype=np.float64)
        p = np.asarray(self.dataset.draw_probabilities(indices), dtype=np.float64)
        with np.errstate(divide="ignore"):  # p = 0 cannot have been drawn; inf is caught by the caller
            return 1.0 / (int(self.dataset.num_samples) * p)

    def _softmax_weights(self, losses: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
        values = losses.double().cpu()
        ok = finite.cpu()
        weights = torch.zeros_like(values)
        if not bool(ok.any()):
            return weights
        kept = values[ok].numpy()
        # The paper's in-batch rule is the closed form itself, over this batch: the core computes it.
        weights[ok] = torch.from_numpy(kl_dro_weights(kept, self._rule.temperature_for(kept)))
        return weights

    # ------------------------------------------------------------------ commit and log
    def _batch_end(self, state: State, logger: Logger) -> None:
        if not self.feeds:
            self._maybe_log(state, logger, None)
            return
        device = state.device.tensor_to_device(torch.zeros(0)).device  # NCCL gathers CUDA tensors
        if self._idx_parts:
            idx = torch.cat(self._idx_parts).to(device)
            loss = torch.cat(self._loss_parts).to(device)
        else:
            idx = torch.zeros(0, dtype=torch.int64, device=device)
            loss = torch.zeros(0, dtype=torch.float32, device=device)
        self._idx_parts.clear()
        self._loss_parts.clear()
        all_idx, all_loss = gather_feedback(idx, loss)
        idx_np, loss_np = all_idx.numpy(), all_loss.numpy()
        if self.sampler is not None:
            self.sampler.update(idx_np, loss_np, step=self._step)
        else:
            assert self.table is not None
            uniq = np.unique(idx_np)
            old = self.table.losses[uniq]
            self.table.update(idx_np, loss_np, step=self._step)
            if self._stream_params is not None:  # the cut in force for this round
                groups = None if self.table.groups is None else self.table.groups[uniq]
                remeasured, readmitted = cut_transitions(old, self.table.losses[uniq], self._stream_params, groups)
                self._remeasured_cut += remeasured
                self._readmitted += readmitted
        finite = np.isfinite(loss_np)
        self._drawn_sum += float(loss_np[finite].sum(dtype=np.float64))
        self._drawn_count += int(finite.sum())
        if self.check_interval and int(state.timestamp.batch) % self.check_interval == 0:
            self._check_ranks_agree(state, f"batch {int(state.timestamp.batch)}")
        self._maybe_log(state, logger, True)

    # ------------------------------------------------------------------ rank agreement
    def fingerprint(self) -> int | None:
        """What the ranks must agree on: the sampler's fingerprint, or on the streaming path a digest of
        the loss table, the rule and the dataset's weights; ``None`` when nothing is fed."""
        if self.sampler is not None:
            return self.sampler.fingerprint()
        if self.table is None:
            return None
        parts = [table_digest(self.table), repr(sorted(self._rule.config().items())).encode()]
        stream_fp = getattr(self.dataset, "fingerprint", None)
        if callable(stream_fp):
            parts.append(int(stream_fp()).to_bytes(8, "little", signed=True))
        return digest_to_int(b"".join(parts))

    def _check_ranks_agree(self, state: State, when: str) -> None:
        """One all-gather of the fingerprints; ``RuntimeError`` naming the ranks when they differ.

        Every rank sees the same gathered values, so every rank raises together (no rank is left
        waiting in a later collective).
        """
        if dist.get_world_size() == 1 or not self.feeds:
            return
        mine = self.fingerprint()
        device = state.device.tensor_to_device(torch.zeros(0)).device
        gathered = dist.all_gather(torch.tensor([mine], dtype=torch.int64, device=device))
        values = [int(t.item()) for t in gathered]
        if len(set(values)) == 1:
            return
        groups: dict[int, list[int]] = {}
        for rank, v in enumerate(values):
            groups.setdefault(v, []).append(rank)
        listing = "; ".join(f"ranks {ranks} have {v:#018x}" for v, ranks in groups.items())
        what = "IRDROSampler" if self.sampler is not None else "loss table / stream weights"
        raise RuntimeError(
            f"IRDRO: the ranks' {what} states diverged (checked at {when}): fingerprints differ: {listing}. "
            "Every rank must build the sampler with the same seed and options and apply the same feedback "
            "(IRDRO gathers it; do not call update() on one rank only), and resume from the same checkpoint"
        )

    def _maybe_log(self, state: State, logger: Logger, fed: bool | None) -> None:
        if not self.log_interval or int(state.timestamp.batch) % self.log_interval:
            return
        metrics: dict[str, float] = {}
        if self.sampler is not None:
            for k, v in self.sampler.stats().items():
                if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                    metrics[f"irdro/{k}"] = float(v)
            table = self.sampler.table
        else:
            table = self.table
        if table is not None:
            metrics["irdro/seen_fraction"] = metrics.get("irdro/seen_fraction", table.num_seen / table.num_samples)
            metrics["irdro/table_mean_loss"] = metrics.get("irdro/table_mean_loss", table.mean_loss())
        if fed and self._drawn_count:
            metrics["irdro/drawn_loss_mean"] = self._drawn_sum / self._drawn_count
        self._drawn_sum, self._drawn_count = 0.0, 0
        if self._reweight_count:
            metrics["irdro/reweight_max_weight"] = self._reweight_max_sum / self._reweight_count
            metrics["irdro/reweight_ess_fraction"] = self._reweight_ess_sum / self._reweight_count
            self._reweight_max_sum = self._reweight_ess_sum = 0.0
            self._reweight_count = 0
        if self.mode == "importance":
            metrics["irdro/importance_weights_nonfinite"] = float(self._nonfinite_weights)
        if metrics:
            logger.log_metrics(metrics)

    def _push_stream_weights(self, logger: Logger) -> None:
        if self.dataset is None or self.table is None:
            return
        self._stream_params = params = self._rule.fit(self.table)
        p = self._rule.probabilities(self.table, params)
        self.dataset.set_weights(p)
        if self.log_interval:
            nz = p[p > 0]
            kept = kept_mask(self.table.losses, params, self.table.groups)
            logger.log_metrics({
                "irdro/ess_fraction": float(1.0 / np.sum(p * p) / p.size),
                "irdro/kl_to_uniform": float(np.sum(nz * np.log(nz * p.size))),
                "irdro/max_prob": float(p.max()),
                "irdro/truncated_fraction": float(1.0 - np.mean(kept)),
                "irdro/temperature": params.temperature,
                "irdro/remeasured_cut": float(self._remeasured_cut),
                "irdro/readmitted": float(self._readmitted),
                "irdro/seen_fraction": self.table.num_seen / self.table.num_samples,
                "irdro/table_mean_loss": self.table.mean_loss(),
            })

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the sampler's state (or the streaming path's loss table).

        Torch tensors and python primitives only, identical on every rank (Composer's rank 0 writes it).
        """
        out: dict[str, Any] = {"repr": repr(self), "version": _STATE_VERSION, "mode": self.mode}
        if self.sampler is not None:
            out["sampler"] = self.sampler.state_dict()
        elif self.table is not None:
            out["table"] = self.table.state_dict()
            out["rule"] = self._rule.config()  # how the table becomes weights (read by `inspect`)
        elif self._pending_state is not None:  # loaded but not applied yet (saved before FIT_START)
            out.update({k: v for k, v in self._pending_state.items() if k in ("sampler", "table", "rule")})
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stash a checkpoint's state; it is applied at ``FIT_START``, when the DataLoader is known.

        (Composer loads checkpoints inside ``Trainer.__init__``, where the train DataLoader may not exist.)
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"IRDRO.load_state_dict expects a dict, got {type(state).__name__}")
        # Check what can be checked without the DataLoader now, so a bad checkpoint fails in Trainer(...)
        # and leaves this algorithm as it was; the sizes are checked against the sampler at FIT_START.
        if "sampler" in state:
            IRDROSampler.check_state_dict(state["sampler"])
        if "table" in state:
            check_table_state(state["table"], None, "state['table']")
        if "rule" in state:
            if not isinstance(state["rule"], Mapping):
                raise ValueError(f"state['rule'] must be a dict of DROWeighting options, got {state['rule']!r}")
            DROWeighting(**state["rule"])
        self._pending_state = dict(state)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        if self.sampler is not None:
            if "sampler" not in state:
                warnings.warn(
                    "IRDRO: the checkpoint holds no IRDROSampler state (it was trained without one); "
                    "the sampler starts fresh",
                    stacklevel=2,
                )
                return
            self.sampler.load_state_dict(state["sampler"])
        elif self.table is not None:
            if "table" not in state:
                warnings.warn(
                    "IRDRO: the checkpoint holds no loss-table state; the streaming weights' table starts fresh",
                    stacklevel=2,
                )
                return
            self.table.load_state_dict(state["table"])

