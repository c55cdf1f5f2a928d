"""Composer integration: the ``IRDRO`` algorithm.

Turns IR-DRO on in a Composer (or llm-foundry) run with one algorithm entry. The algorithm only
*translates* between Composer's training loop and the core, which *decides*:

* It finds what to feed at ``FIT_START``: the first registered target finder that recognises the
  train DataLoader returns a :class:`~irdro_sampler.integrations.composer.targets.FeedbackTarget`:
  an :class:`~irdro_sampler.IRDROSampler` in it (``sampler=`` or inside ``batch_sampler=``), or a
  weighted streaming dataset (anything with ``set_weights`` and ``round_size``, such as
  ``irdro_sampler.integrations.streaming.WeightedStreamingDataset``). The algorithm only talks to
  that interface, so it has no branch per data path (see :mod:`.targets`).
* At ``AFTER_DATALOADER`` it takes the samples' indices out of the batch (``sample_idx``, or a tuple
  batch's last element), so the model never sees them: a stock ``ComposerClassifier`` on ``(x, y)`` or
  a stock ``HuggingFaceModel`` needs no change. Callbacks read them with :func:`batch_sample_indices`.
* At ``AFTER_FORWARD`` it computes one loss per sample from ``state.outputs`` and the microbatch
  (no extra forward pass), pairs it with the microbatch's slice of the indices, and at ``BATCH_END``
  gathers the feedback of all ranks (in rank order) so every rank applies identical updates in
  identical order.
* In ``importance`` and ``reweight`` modes, and with ``screen=True``, it replaces ``state.loss`` at ``AFTER_LOSS``
  (Composer 0.32.1 backpropagates ``state.loss`` as it is after ``AFTER_LOSS``/``BEFORE_BACKWARD``).

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

Importing :mod:`irdro_sampler` never imports Composer; only this package does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from irdro_sampler import DROWeighting, IRDROSampler, LossTable
from irdro_sampler._validation import as_groups
from irdro_sampler.diagnostics import metric_names
from irdro_sampler.integrations._class_targets import no_groups_note
from irdro_sampler.priming import check_initial_losses

from .batches import BatchFeedback, num_rows, split_off_indices, without_key
from .collectives import check_ranks_agree, gather_feedback
from .losses import (
    PerSampleLossFn,
    check_per_sample_losses,
    has_class_targets,
    importance_weighted_loss,
    resolve_loss_fn,
    reweighted_loss,
    screened_model_loss,
)
from .targets import FeedbackOptions, FeedbackTarget, StreamingTarget, check_target_states, find_target

log = logging.getLogger(__name__)

__all__ = ["IRDRO", "batch_sample_indices"]

_MODES = ("resample", "importance", "reweight")
_STATE_VERSION = 1
# The entries of IRDRO's checkpoint that IRDRO itself writes; every other entry belongs to the target.
_OWN_STATE_KEYS = ("repr", "version", "mode")
_ALWAYS = (Event.FIT_START, Event.AFTER_DATALOADER, Event.BATCH_START, Event.BEFORE_TRAIN_BATCH, Event.AFTER_FORWARD,
           Event.BATCH_END)  # fmt: skip


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


def _check_options(mode: str, log_interval: Any, check_interval: Any, index_key: Any) -> None:
    if isinstance(check_interval, bool) or not isinstance(check_interval, int) or check_interval < 0:
        raise ValueError(f"check_interval must be an int >= 0 or None, got {check_interval!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if isinstance(log_interval, bool) or not isinstance(log_interval, int) or log_interval < 0:
        raise ValueError(f"log_interval must be an int >= 0, got {log_interval!r}")
    if isinstance(index_key, bool) or not isinstance(index_key, (str, int)):
        raise TypeError(f"index_key must be a str (dict batches) or int (tuple batches), got {index_key!r}")


def _nothing_to_feed(mode: str, dataloader: Any) -> ValueError:
    return ValueError(
        f"IRDRO(mode={mode!r}) found nothing to feed in the train DataLoader "
        f"(sampler={type(getattr(dataloader, 'sampler', None)).__name__}, "
        f"dataset={type(getattr(dataloader, 'dataset', None)).__name__}). Put an IRDROSampler in it: "
        "DataLoader(IndexedDataset(ds), sampler=IRDROSampler(ds, batch_size), batch_size=batch_size), "
        "or train on irdro_sampler.integrations.streaming.WeightedStreamingDataset; "
        "mode='reweight' alone needs neither (a new data path: register_target in .targets)."
    )


class _Meters:
    """The loss-side metrics, accumulated between two logs (``importance_weights_nonfinite`` is a total)."""

    def __init__(self) -> None:
        self.drawn_sum, self.drawn_count = 0.0, 0
        self.nonfinite_weights = 0
        self.reweight_max_sum, self.reweight_ess_sum, self.reweight_count = 0.0, 0.0, 0
        self.screened, self.screen_judged = 0, 0

    def add_screened(self, keep: np.ndarray) -> None:
        self.screened += int(keep.size - np.count_nonzero(keep))
        self.screen_judged += int(keep.size)

    def add_drawn(self, losses: np.ndarray) -> None:
        finite = np.isfinite(losses)
        self.drawn_sum += float(losses[finite].sum(dtype=np.float64))
        self.drawn_count += int(finite.sum())

    def add_reweight(self, weights: torch.Tensor, losses: torch.Tensor) -> None:
        n_valid = int(torch.isfinite(losses.detach()).sum().item())
        if n_valid:
            self.reweight_max_sum += float(weights.max())
            self.reweight_ess_sum += float(1.0 / (weights * weights).sum() / n_valid)
            self.reweight_count += 1

    def take(self, fed: bool | None, mode: str) -> dict[str, float]:
        """The metrics since the last call (``drawn_loss_mean`` only for a batch that was ``fed``)."""
        metrics: dict[str, float] = {}
        if fed and self.drawn_count:
            metrics["irdro/drawn_loss_mean"] = self.drawn_sum / self.drawn_count
        self.drawn_sum, self.drawn_count = 0.0, 0
        if self.reweight_count:
            metrics["irdro/reweight_max_weight"] = self.reweight_max_sum / self.reweight_count
            metrics["irdro/reweight_ess_fraction"] = self.reweight_ess_sum / self.reweight_count
            self.reweight_max_sum, self.reweight_ess_sum, self.reweight_count = 0.0, 0.0, 0
        if mode == "importance":
            metrics["irdro/importance_weights_nonfinite"] = float(self.nonfinite_weights)
        if self.screen_judged:  # this rank's microbatches since the last log
            metrics["irdro/screened_fraction"] = self.screened / self.screen_judged
            self.screened, self.screen_judged = 0, 0
        return metrics


class IRDRO(Algorithm):
    """IR-DRO for Composer: feed per-sample losses back to the sampler that draws the training data.

    Put an :class:`~irdro_sampler.IRDROSampler` in the train DataLoader (``DataLoader(IndexedDataset(ds),
    sampler=IRDROSampler(ds, batch_size), batch_size=batch_size)``) or train on a weighted streaming
    dataset, and add ``IRDRO()`` to ``Trainer(algorithms=[...])``. This class only wires Composer's
    events to the :class:`~.targets.FeedbackTarget` found at ``FIT_START`` (:attr:`target`) and to the
    pure functions of :mod:`.losses`, :mod:`.batches` and :mod:`.collectives`.

    Args:
        **rule_options: the weighting rule's options, exactly those of
            :class:`~irdro_sampler.DROWeighting` (``temperature``, ``ess_fraction``, ``truncate_zscore``,
            ``cut_rule``, ``uniform_mix``, ...; validated there). With an ``IRDROSampler`` the sampler's
            own options decide: any option given here must agree with it, else ``FIT_START`` raises (one
            source of truth). With a streaming dataset they configure the rule this algorithm keeps. In
            ``reweight`` mode the rule's temperature (fixed, or calibrated per microbatch) sets the
            in-batch softmax.
        initial_losses: losses of the starting model measured before training (a scoring pass: one forward
            pass over the training set, no backward), so the first batches are drawn from the rule fitted on
            them instead of uniformly: ``(indices, losses)``, one loss per sample (NaN: not scored), or the
            path of a ``.npy`` vector (for YAML). Applied at the first ``FIT_START`` of a fresh run (not on
            resume: the checkpoint holds them); see :func:`~irdro_sampler.initial_loss_feedback`.
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
        screen: leave out of each microbatch's loss the first visits the sampler's cut would take
            (:meth:`IRDROSampler.screen <irdro_sampler.IRDROSampler.screen>`: samples its table has no loss of yet,
            whose loss lies above their cut); every loss is still fed back. For training over few passes (continual
            training), where most draws are first visits the draws cannot steer. The loss becomes
            ``mean_i(keep_i * l_i)`` (times ``w_i`` in ``importance`` mode) over ``loss_fn``'s per-sample losses,
            which must keep gradients; it replaces the model's own loss (for a causal LM: the mean of per-sequence
            means, not the mean over all tokens). Works with an ``IRDROSampler``, a ``ShardedIRDROSampler`` (a collective
            per microbatch) and the streaming path (the round's cut); not with ``mode='reweight'``. Logs
            ``irdro/screened_fraction``. ``'block'`` leaves out only first visits inside a block of unlearnable
            samples (a tight, far high mode of the refit's losses, such as random documents; ``screen(...,
            block_only=True)``): it cannot starve a learnable minority the way ``True`` can, and leaves out nothing
            where the losses show no such block. In ``resample`` mode it removes the screened samples' exact share
            of the model's own loss, its divisor kept (:func:`~.losses.screened_model_loss`, as the Hugging Face
            Trainer's screen), so ``loss_fn`` needs no gradients unless it is your own, and where nothing is
            screened the model's loss stands. Default False.
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
        initial_losses: Any = None,
        screen: bool | str = False,
        **rule_options: Any,
    ) -> None:
        if check_interval is None:
            check_interval = log_interval if isinstance(log_interval, int) else 0
        _check_options(mode, log_interval, check_interval, index_key)
        if not (isinstance(screen, bool) or (isinstance(screen, str) and screen == "block")):
            raise TypeError(f"screen must be True, False or 'block', got {screen!r}")
        if screen and mode == "reweight":
            raise ValueError(f"IRDRO(screen={screen!r}) needs the sampler's draws; mode='reweight' reweights uniform data")
        self.screen = screen
        self.rule_options = dict(rule_options)
        self.table_options = {k: v for k, v in dict(ema=ema, prior=prior).items() if v is not None}
        self.groups = groups
        # Validate now (a YAML typo fails at construction, not at the first batch).
        self._rule = DROWeighting(**self.rule_options)
        LossTable(1, **self.table_options)
        if groups is not None:
            as_groups(groups, len(groups))
        check_initial_losses(initial_losses)
        self.initial_losses = initial_losses
        self._fit_started = False  # primed (if asked) at the first FIT_START only
        self.loss_fn_spec = loss_fn
        self.loss_fn = resolve_loss_fn(loss_fn)
        self.index_key = index_key
        self.mode = mode
        self.log_interval = log_interval
        self.check_interval = check_interval
        #: What is fed, found at FIT_START (None before, and when nothing is: ``reweight`` on plain data).
        self.target: FeedbackTarget | None = None
        self._pending_state: dict[str, Any] | None = None  # a loaded checkpoint, applied at FIT_START
        self._batch = BatchFeedback()
        self._step = 0  # the target's global index of the batch in progress (read at BATCH_START)
        self._grad_losses: torch.Tensor | None = None  # the microbatch's losses, for the loss modes
        self._grad_indices: torch.Tensor | None = None
        # The microbatch's detached losses, for screen="block" in resample mode (no gradients needed to judge)
        self._screen_losses: torch.Tensor | None = None
        self._screen_indices: torch.Tensor | None = None
        self._checked_first_batch = False
        self._meters = _Meters()

    def __repr__(self) -> str:
        opts = {**self.rule_options, **self.table_options}
        args = ", ".join(f"{k}={v!r}" for k, v in opts.items())
        extra = f"mode={self.mode!r}, index_key={self.index_key!r}, log_interval={self.log_interval}"
        if self.check_interval != self.log_interval:
            extra += f", check_interval={self.check_interval}"
        if isinstance(self.loss_fn_spec, str):
            extra += f", loss_fn={self.loss_fn_spec!r}"
        if self.screen:
            extra += f", screen={self.screen!r}"
        return f"IRDRO({args + ', ' if args else ''}{extra})"

    # ------------------------------------------------------------------ what is fed
    @property
    def feeds(self) -> bool:
        """Whether per-sample feedback goes anywhere (a target was found)."""
        return self.target is not None

    @property
    def batch_indices(self) -> torch.Tensor | None:
        """The current training batch's sample indices (CPU int64), taken out of the batch at
        ``AFTER_DATALOADER``; None when the batch carried none. See :func:`batch_sample_indices`."""
        return self._batch.indices

    # Views into the target for callers that look inside (examples, tests, callbacks); each is None
    # when the target has no such part. Setting ``table`` or ``dataset`` installs a streaming target by
    # hand (e.g. to load a checkpoint's table without a DataLoader); FIT_START keeps its table when the
    # DataLoader's dataset has the same size.
    @property
    def sampler(self) -> IRDROSampler | None:
        """The fed :class:`~irdro_sampler.IRDROSampler`, if any."""
        return getattr(self.target, "sampler", None)

    @property
    def table(self) -> LossTable | None:
        """The loss table IRDRO keeps for round-based data (not the sampler's), if any."""
        return getattr(self.target, "table", None)

    @table.setter
    def table(self, table: LossTable) -> None:
        self.target = StreamingTarget.by_hand(self.target, self._rule, table=table)

    @property
    def dataset(self) -> Any:
        """The fed weighted streaming dataset, if any."""
        return getattr(self.target, "dataset", None)

    @dataset.setter
    def dataset(self, dataset: Any) -> None:
        self.target = StreamingTarget.by_hand(self.target, self._rule, dataset=dataset)

    def fingerprint(self) -> int | None:
        """What the ranks must agree on (the target's fingerprint); ``None`` when nothing is fed."""
        return None if self.target is None else self.target.fingerprint()

    # ------------------------------------------------------------------ events
    def match(self, event: Event, state: State) -> bool:
        if event in _ALWAYS:
            return True
        if event == Event.AFTER_LOSS:
            return self._needs_grad_losses() or self._screens_by_share()
        if event == Event.EPOCH_END:
            return self.target is not None and self.target.wants_epoch_end
        if event == Event.FIT_END:
            return callable(getattr(self.target, "fit_end", None))
        return False

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state)
        elif event == Event.AFTER_DATALOADER:
            self._take_indices(state)
        elif event == Event.BATCH_START:
            self._step = int(state.timestamp.batch) if self.target is None else self.target.global_step(state.timestamp)
        elif event == Event.BEFORE_TRAIN_BATCH:
            self._batch.restart()  # an OOM retry starts the batch's microbatches over
            self._grad_losses = self._grad_indices = self._screen_losses = self._screen_indices = None
        elif event == Event.AFTER_FORWARD:
            self._after_forward(state)
        elif event == Event.AFTER_LOSS:
            self._replace_loss(state)
        elif event == Event.BATCH_END:
            self._batch_end(state, logger)
        elif event == Event.FIT_END:
            self.target.fit_end()  # type: ignore[union-attr]  # optional; match() checked it exists
        elif event == Event.EPOCH_END:
            assert self.target is not None
            metrics = self.target.epoch_end(want_stats=bool(self.log_interval))
            if metrics:
                logger.log_metrics(metric_names(metrics))

    def _needs_grad_losses(self) -> bool:
        return self.mode in ("importance", "reweight") or (bool(self.screen) and not self._screens_by_share())

    def _screens_by_share(self) -> bool:
        """screen="block" in resample mode: the model's loss less the screened samples' share (no gradients of
        the per-sample losses needed unless a sample is screened)."""
        return self.screen == "block" and self.mode == "resample"

    def _fit_start(self, state: State) -> None:
        dataloader = state.train_dataloader if state.train_dataloader is not None else state.dataloader
        target = find_target(dataloader)
        if target is None and self.mode != "reweight":
            raise _nothing_to_feed(self.mode, dataloader)
        if self.screen and not callable(getattr(target, "screen", None)):
            raise ValueError(f"IRDRO(screen=True): the {target.name} target cannot screen first visits; put an "
                             "IRDROSampler, a ShardedIRDROSampler or a weighted streaming dataset in the train DataLoader")
        if target is not None:
            options = FeedbackOptions(self._rule, self.rule_options, self.table_options, self.groups, self.mode)
            target.attach(options, self.target)
        self.target = target
        bind = getattr(target, "bind", None)
        if callable(bind):  # optional: targets that need the run (the sharded sampler's checkpoint files)
            bind(state)
        if self._pending_state is not None:  # a resume: the saved table holds the primed losses already
            self._apply_state(self._pending_state)
            self._pending_state = None
        elif self.initial_losses is not None and not self._fit_started:
            self._prime(target)
        self._fit_started = True
        self._checked_first_batch = False
        self._check_ranks_agree(state, "FIT_START")

    def _prime(self, target: FeedbackTarget | None) -> None:
        prime = getattr(target, "prime", None)
        if not callable(prime):
            what = "nothing is fed (mode='reweight' without a sampler)" if target is None else f"the {target.name} target"
            raise ValueError(f"IRDRO(initial_losses=...): {what} cannot be primed; put an IRDROSampler or a weighted "
                             "streaming dataset in the train DataLoader")
        prime(self.initial_losses)

    # ------------------------------------------------------------------ per-sample feedback
    def _take_indices(self, state: State) -> None:
        """Record the batch's indices and remove them from ``state.batch`` (the model never sees them).

        When nothing is fed (``reweight`` without a sampler), a dict batch's index key is still removed
        if present; a tuple's last element is only known to be an index when the target says so.
        """
        batch, key = state.batch, self.index_key
        self._batch.start(None)
        if self.target is None:
            if isinstance(batch, Mapping) and isinstance(key, str) and key in batch:
                self._batch.start(torch.as_tensor(batch[key]).detach().to("cpu", torch.int64))
                state.batch = without_key(batch, key)
            return
        # Fails before any forward pass if the index is missing.
        indices, state.batch = split_off_indices(
            batch, key, tuple_index_last=self.target.tuple_index_last, missing_help=self.target.missing_index_help(key)
        )
        self._batch.start(indices)

    def _after_forward(self, state: State) -> None:
        batch = state.batch
        if self._needs_grad_losses():
            losses = self.loss_fn(state.outputs, batch)
        else:
            with torch.no_grad():
                losses = self.loss_fn(state.outputs, batch)
        check_per_sample_losses(losses, num_rows(batch))
        indices = self._batch.next_indices(int(losses.shape[0])) if self.feeds else None
        if self._screens_by_share():
            self._screen_losses, self._screen_indices = losses, indices
        if self._needs_grad_losses():
            self._grad_losses, self._grad_indices = losses, indices
            if not losses.requires_grad and torch.is_grad_enabled() and not self._checked_first_batch:
                raise ValueError(
                    f"IRDRO(mode={self.mode!r}): loss_fn returned losses without gradients; it must compute them "
                    "from state.outputs with autograd (no .detach(), no torch.no_grad())"
                )
        if not self._checked_first_batch:
            self._note_class_targets(batch)
        self._checked_first_batch = True
        if indices is not None:
            self._batch.add(indices, losses)

    def _note_class_targets(self, batch: Any) -> None:
        """Once per fit: class-index targets without groups (the cut then judges rare classes as noise)."""
        if self.target is None or self.target.has_groups or not has_class_targets(batch):
            return
        log.warning(no_groups_note("IRDROSampler(..., groups=labels), or IRDRO(groups=labels) on the streaming path"))

    def _replace_loss(self, state: State) -> None:
        """Replace ``state.loss`` by the mode's loss of this microbatch (see :mod:`.losses`)."""
        if self._screens_by_share():
            self._screen_block(state)
            return
        losses, indices = self._grad_losses, self._grad_indices
        if losses is None:
            return
        self._grad_losses = self._grad_indices = None
        if not isinstance(state.loss, torch.Tensor):
            raise TypeError(
                f"IRDRO(mode={self.mode!r}) replaces the model's loss and needs it to be a single tensor; "
                f"the model returned {type(state.loss).__name__}"
            )
        keep = None
        if self.screen:  # FIT_START checked the target can screen
            assert self.target is not None and indices is not None
            keep = self.target.screen(indices.numpy(), losses.detach(),  # type: ignore[attr-defined]
                                      block_only=self.screen == "block")
            self._meters.add_screened(keep)
        if self.mode == "importance":
            assert self.target is not None and indices is not None  # FIT_START refuses importance without one
            weights = self.target.importance_weights(indices.numpy(), self._step)
            new, nonfinite = importance_weighted_loss(losses, weights if keep is None else weights * keep)
            self._meters.nonfinite_weights += nonfinite
        elif self.mode == "resample":  # with the screen: the mean with screened samples weighing 0
            new, _ = importance_weighted_loss(losses, keep.astype(np.float64))
        else:  # reweight
            new, weights = reweighted_loss(losses, self._rule)
            self._meters.add_reweight(weights, losses)
        state.loss = new.to(state.loss.dtype)

    def _screen_block(self, state: State) -> None:
        """screen="block" in resample mode: ``state.loss`` less the share of the microbatch's first visits inside
        the block (unchanged where none is), as the Hugging Face Trainer's screen."""
        losses, indices = self._screen_losses, self._screen_indices
        self._screen_losses = self._screen_indices = None
        if losses is None or indices is None:
            return
        assert self.target is not None  # FIT_START checked the target can screen
        keep = self.target.screen(indices.numpy(), losses, block_only=True)  # type: ignore[attr-defined]
        self._meters.add_screened(keep)
        if not isinstance(state.loss, torch.Tensor):
            raise TypeError(
                "IRDRO(screen='block') removes the screened samples' share of the model's loss and needs it to be "
                f"a single tensor; the model returned {type(state.loss).__name__}"
            )
        state.loss = screened_model_loss(state.loss, state.outputs, state.batch, losses, keep, self.loss_fn)

    # ------------------------------------------------------------------ commit, check, log
    def _batch_end(self, state: State, logger: Logger) -> None:
        if self.target is None:
            self._maybe_log(state, logger, None)
            return
        device = state.device.tensor_to_device(torch.zeros(0)).device  # NCCL gathers CUDA tensors
        all_idx, all_loss = gather_feedback(*self._batch.take(device))
        idx_np, loss_np = all_idx.numpy(), all_loss.numpy()
        self.target.update(idx_np, loss_np, step=self._step)
        self._meters.add_drawn(loss_np)
        if self.check_interval and int(state.timestamp.batch) % self.check_interval == 0:
            self._check_ranks_agree(state, f"batch {int(state.timestamp.batch)}")
        self._maybe_log(state, logger, True)

    def _check_ranks_agree(self, state: State, when: str) -> None:
        """Compare the target's fingerprint over the ranks (every rank raises together if they differ)."""
        if self.target is None:
            return
        device = state.device.tensor_to_device(torch.zeros(0)).device
        check_ranks_agree(self.target.fingerprint, device, what=self.target.name, when=when)

    def _maybe_log(self, state: State, logger: Logger, fed: bool | None) -> None:
        if not self.log_interval or int(state.timestamp.batch) % self.log_interval:
            return
        metrics = {} if self.target is None else metric_names(self.target.stats())
        metrics.update(self._meters.take(fed, self.mode))
        if metrics:
            logger.log_metrics(metrics)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: ``repr``, ``version``, ``mode`` and the target's entries (the
        sampler's state, or the streaming path's loss table and rule).

        Torch tensors and python primitives only, identical on every rank (Composer's rank 0 writes it).
        """
        out: dict[str, Any] = {"repr": repr(self), "version": _STATE_VERSION, "mode": self.mode}
        if self.target is not None:
            out.update(self.target.state_dict())
        elif self._pending_state is not None:  # loaded but not applied yet (saved before FIT_START)
            out.update({k: v for k, v in self._pending_state.items() if k not in _OWN_STATE_KEYS})
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stash a checkpoint's state; it is applied at ``FIT_START``, when the DataLoader is known.

        (Composer loads checkpoints inside ``Trainer.__init__``, where the train DataLoader may not exist.)
        What can be checked without the DataLoader is checked now (every registered target's check), so
        a bad checkpoint fails in ``Trainer(...)`` and leaves this algorithm as it was.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"IRDRO.load_state_dict expects a dict, got {type(state).__name__}")
        check_target_states(state)
        self._pending_state = dict(state)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        if self.target is not None:
            self.target.load_state_dict(state)
