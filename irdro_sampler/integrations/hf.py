"""Hugging Face ``Trainer`` integration: :class:`IRDROTrainer` (or :class:`IRDROTrainerMixin`).

What a user changes in an existing ``Trainer`` script (two lines)::

    from irdro_sampler.integrations.hf import IRDROTrainer
    trainer = IRDROTrainer(model=model, args=args, train_dataset=ds, ..., irdro=dict(groups=labels))  # was Trainer(...)

A script with its own ``Trainer`` subclass puts the mixin first: ``class MyTrainer(IRDROTrainerMixin,
MyTrainerBase)``. ``irdro`` is a dict of :class:`~irdro_sampler.IRDROSampler` options (the trainer builds
the sampler with this rank's geometry), or an ``IRDROSampler`` built by the user (checked against it).

**Why a Trainer mixin, not a callback or ``compute_loss_func``.** Three things must happen inside the
Trainer: its train DataLoader must draw from the sampler (``get_train_dataloader``; a callback cannot
replace it), every micro-batch's sample indices must meet that micro-batch's per-sample losses
(``compute_loss_func`` gets ``(outputs, labels, num_items_in_batch)``, never the indices; callbacks see
neither), and the sampler state must go into the Trainer's checkpoint folder and come back on
``resume_from_checkpoint``. A mixin does all three with methods of the Trainer's documented
"subclass and override" surface (``get_train_dataloader``, ``training_step``, ``compute_loss``,
``log``, ``train``); the per-step commit and the checkpoint file are an internal ``TrainerCallback``
(``on_step_end``, which every rank runs after each optimizer step, and ``on_save``).

How each part works (facts about transformers 5 / accelerate 1 checked in their source):

* **The DataLoader.** ``get_train_dataloader`` builds ``DataLoader(batch_sampler=...)`` over the train
  data set with the Trainer's collator (unused columns removed as the Trainer does), workers, pinning and
  prefetching, and passes it through ``accelerator.prepare`` (device placement, gradient-accumulation
  state). The sampler already yields only this rank's slice of a global batch drawn identically on every
  rank; ``prepare`` wraps every map-style loader's batch sampler in ``BatchSamplerShard``, which would
  keep only every ``world_size``-th of this rank's batches (half the data silently lost on 2 ranks).
  The wrapper is made a passthrough (``num_processes=1, process_index=0``: what transformers 5 itself
  does for its rank-aware ``BatchRebalanceSampler``; also ``batch_size=None, even_batches=False``, else
  it pads a short last batch with the epoch's first samples, even as one process) and the result is
  checked: anything else (``dispatch_batches``, an unknown wrapper) raises. ``split_batches=True`` is refused (the per-device batch is the
  sampler's batch). Tested by counting: with flat weights an epoch on 2 ranks trains every sample once.
* **Indices.** The batch sampler yields ``(global_batch, index)`` keys; the data set wrapper hands the
  user's sample to the user's collator unchanged, and the collate wrapper adds ``irdro_sample_idx``
  (list of ints) and ``irdro_step`` to the batch. ``training_step`` takes both out before the model sees
  the batch.
* **Losses and the step.** ``compute_loss`` calls the Trainer's own (so ``compute_loss_func``, label
  smoothing and the model's loss stay as they are) with ``return_outputs=True`` and computes one loss
  per sample from the outputs, without another forward pass (``per_sample_loss``). The sampler's step is
  the **micro-batch**: the global batch index ``epoch * batches_per_epoch + batch_in_epoch`` of the
  DataLoader batch (what the sampler's order contract counts). Losses are buffered per micro-batch and
  committed once per **optimizer step** (``on_step_end``): gathered from all ranks in one collective and
  applied by every rank in the same order, one ``update(indices, losses, step=micro_batch)`` per
  micro-batch. So the sampler's ``feedback_delay`` must exceed what is drawn ahead of the commit:
  ``gradient_accumulation_steps + 1 + dataloader_num_workers * prefetch_factor`` (checked; default 32).
* **Checkpoints.** After the Trainer writes ``checkpoint-<step>/`` (``on_save``), the process(es) that save write
  ``irdro_sampler.pt`` into it with :func:`irdro_sampler.save_state` (atomic). The state is the same on
  every rank (the ranks' fingerprints are compared at each log), so one file serves all ranks.
  ``train(resume_from_checkpoint=...)`` loads it into the new sampler (a missing file raises, naming the
  folder), and the Trainer's own fast-forward over the trained batches of the resumed epoch replays
  them from the sampler without changing its state: the global order after resume is bitwise the
  uninterrupted run's (tested).
* **Metrics.** Every training log (``logging_steps``) gets ``irdro/*``: the sampler's ``stats()``
  (ESS, KL to uniform, cut fraction, temperature, ...; O(N)) and the mean loss of the drawn samples.
* **Priming.** ``irdro=dict(initial_losses=...)`` (a scoring pass's losses) is passed to the new sampler's
  ``prime`` before the first draw; a resume takes them from the checkpoint's sampler state instead.

**The loss table sharded over the ranks:** ``irdro=dict(sharded=True, ...)`` (or a
:class:`~irdro_sampler.ShardedIRDROSampler`) keeps N / world rows per rank; each rank writes its rows into
``checkpoint-<step>/irdro-shards/``. See :mod:`irdro_sampler.integrations.hf_sharded`.

Requirements: map-style train data (``datasets.Dataset`` or a torch ``Dataset`` with ``__len__``); an
``IterableDataset`` raises ``TypeError`` naming ``train_dataset`` (stream through
``irdro_sampler.integrations.streaming`` with Composer instead). Data parallelism (DDP, also FSDP/ZeRO
in principle; tested: CPU with 1 and 2 gloo ranks). Supported: transformers >= 4.48 (older ones cannot load
their own RNG checkpoint files under torch >= 2.6's ``weights_only`` default) with accelerate >= 1.0; the CI
lane tests both ends (4.48.3 with accelerate 1.0.1, and the newest 5.x with accelerate 1.x).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from irdro_sampler import IRDROSampler, ShardedIRDROSampler, save_state
from irdro_sampler.distributed import check_ranks_agree, gather_feedback, world_size
from irdro_sampler.integrations import hf_sharded
from irdro_sampler.integrations._class_targets import (
    class_label_groups,
    looks_like_class_indices,
    no_groups_note,
)
from irdro_sampler.integrations._hf_compat import (
    collator_without_unused_columns,
    remove_unused_columns,
    train_batch_size,
)
from irdro_sampler.losses import classification_per_sample_loss, token_per_sample_loss
from irdro_sampler.priming import check_initial_losses, prime_from
from irdro_sampler.screened_loss import screened_loss

__all__ = [
    "INDEX_KEY",
    "STATE_FILE",
    "STEP_KEY",
    "IRDROTrainer",
    "IRDROTrainerMixin",
    "default_per_sample_loss",
]

#: The batch keys the collate wrapper adds (taken out again before the model sees the batch).
INDEX_KEY = "irdro_sample_idx"
STEP_KEY = "irdro_step"
#: The sampler state's file name inside each ``checkpoint-<step>`` folder.
STATE_FILE = "irdro_sampler.pt"
_STATE_FORMAT = "irdro_sampler.hf"
_STATE_VERSION = 1
#: The ``irdro`` key of the scoring pass's losses, as errors name it.
_INITIAL_LOSSES = "irdro['initial_losses']"

PerSampleLoss = Callable[[Any, Mapping[str, Any]], torch.Tensor]

log = logging.getLogger(__name__)


# ============================================================================ per-sample losses
def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and len(outputs) > 1 and isinstance(outputs[1], torch.Tensor):
        return outputs[1]  # (loss, logits, ...) when the model returns tuples
    raise TypeError(
        f"cannot find logits in the model outputs ({type(outputs).__name__}); pass "
        "per_sample_loss=(outputs, inputs) -> 1-D tensor of per-sample losses"
    )


def _model_kind(model: Any) -> str | None:
    """``'causal'``, ``'token'`` (aligned labels) or None, from the model class as transformers names it."""
    from transformers.models.auto import modeling_auto as auto

    name = type(model).__name__  # what transformers' own check reads (PreTrainedModel._get_name)
    if name in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "causal"
    aligned = ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
               "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES")
    if any(name in getattr(auto, m, {}).values() for m in aligned):
        return "token"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "token"
    return None


def default_per_sample_loss(outputs: Any, inputs: Mapping[str, Any], *, kind: str | None = None) -> torch.Tensor:
    """One loss per sample from a Hugging Face model's outputs and the batch's ``labels`` (float32, ``(B,)``).

    * logits ``(B, T, V)``, labels ``(B, T)``: token-mean cross-entropy per sequence, labels shifted for
      causal LMs (``kind='causal'``) and aligned otherwise (``kind='token'``: masked LMs, token
      classification, seq2seq), ``-100`` ignored; :func:`irdro_sampler.losses.token_per_sample_loss`.
    * logits ``(B, C)``: :func:`irdro_sampler.losses.classification_per_sample_loss` (cross-entropy,
      regression or multi-label, from the labels' dtype and shape).

    ``kind`` is found from the model class by :class:`IRDROTrainerMixin`; token-level logits of a model
    it cannot classify raise ``ValueError`` asking for ``per_sample_loss``.
    """
    labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
    if labels is None:
        raise ValueError(
            "the default per-sample loss needs 'labels' in the batch (the data collator puts them there); "
            f"the batch has {sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__}: "
            "pass per_sample_loss=(outputs, inputs) -> 1-D tensor"
        )
    logits = _logits(outputs)
    if logits.ndim == 3:
        if kind not in ("causal", "token"):
            raise ValueError(
                f"token-level logits {tuple(logits.shape)} from a model that is neither a causal LM nor an "
                "aligned-label model known to transformers: pass per_sample_loss='causal_lm' (labels shifted) "
                "or 'token' (aligned), or a callable"
            )
        return token_per_sample_loss(logits, labels, shift=kind == "causal")
    return classification_per_sample_loss(logits, labels)


def _resolve_loss(per_sample_loss: PerSampleLoss | str | None) -> tuple[PerSampleLoss | None, str | None]:
    """(callable, None) or (None, kind) where kind is 'auto', 'causal' or 'token'."""
    if per_sample_loss is None or per_sample_loss == "auto":
        return None, "auto"
    if isinstance(per_sample_loss, str):
        named = {"causal_lm": "causal", "token": "token", "classification": "classification"}
        if per_sample_loss in named:
            return None, named[per_sample_loss]
    elif callable(per_sample_loss):
        return per_sample_loss, None
    raise ValueError(
        "per_sample_loss must be 'auto', 'causal_lm', 'token', 'classification' or a callable "
        f"(outputs, inputs) -> 1-D tensor; got {per_sample_loss!r}"
    )


# ============================================================================ the DataLoader parts
class _RankBatches:
    """This rank's batches of an :class:`IRDROSampler` (or ``ShardedIRDROSampler``) epoch, as lists of
    ``(global_batch, index)`` keys.

    ``sampler`` is the sampler (accelerate's ``set_epoch`` reaches it there); ``batch_size`` is the
    per-rank batch size (accelerate 1.0 refuses a batch sampler without one on several processes).
    """

    def __init__(self, sampler: IRDROSampler | ShardedIRDROSampler) -> None:
        self.sampler = sampler
        self.batch_size = int(sampler.batch_size)

    def __len__(self) -> int:
        return int(self.sampler.batches_per_epoch)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.sampler
        first = int(s.epoch) * int(s.batches_per_epoch) + int(getattr(s, "start_batch", 0) or 0)
        for j, batch in enumerate(s.iter_batches()):  # drawn one batch at a time, as the DataLoader asks
            yield [(first + j, i) for i in batch.tolist()]


class _KeyedDataset(Dataset):
    """``dataset[(b, i)]`` is ``(b, i, dataset[i])``: the user's sample, untouched, with its key."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, Any]:
        b, i = key
        return b, i, self.dataset[i]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[tuple[int, int, Any]]:
        many = getattr(self.dataset, "__getitems__", None)
        indices = [i for _, i in keys]
        samples = many(indices) if callable(many) else [self.dataset[i] for i in indices]
        return [(b, i, s) for (b, i), s in zip(keys, samples, strict=True)]


class _KeyedCollate:
    """Collate the user's samples with the user's collator, then add the indices and the step."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[tuple[int, int, Any]]) -> Any:
        steps = {b for b, _, _ in items}
        if len(steps) != 1:
            raise RuntimeError(f"IRDROTrainer: one DataLoader batch mixes sampler batches {sorted(steps)}")
        batch = self.collate_fn([s for _, _, s in items])
        if not isinstance(batch, MutableMapping):
            raise TypeError(
                f"IRDROTrainer needs the data collator to return a dict of model inputs, got {type(batch).__name__}"
            )
        for key in (INDEX_KEY, STEP_KEY):
            if key in batch:
                raise KeyError(f"the collated batch already has a key {key!r}, which IRDROTrainer adds")
        batch[INDEX_KEY] = [i for _, i, _ in items]
        batch[STEP_KEY] = steps.pop()
        return batch


def _is_iterable_dataset(dataset: Any) -> bool:
    if isinstance(dataset, IterableDataset):
        return True
    try:
        import datasets

        return isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict))
    except ImportError:
        return False


def _neutralise_sharding(prepared: Any, ours: _RankBatches) -> None:
    """Make accelerate's ``BatchSamplerShard`` around ``ours`` a passthrough; raise if it is not there."""
    shard = getattr(prepared, "batch_sampler", None)
    if shard is ours:
        return  # not wrapped (one process)
    if shard is not None and getattr(shard, "batch_sampler", None) is ours and hasattr(shard, "num_processes"):
        shard.num_processes = 1
        shard.process_index = 0
        shard.batch_size = None  # no padding of the short last batch (every batch yielded as it is)
        shard.even_batches = False
        if getattr(shard, "split_batches", False):
            raise ValueError("IRDROTrainer does not support accelerator_config split_batches=True")
        return
    raise RuntimeError(
        f"IRDROTrainer: accelerate prepared the train DataLoader as {type(prepared).__name__} with batch sampler "
        f"{type(shard).__name__}, not the BatchSamplerShard around the IRDRO batch sampler this integration knows "
        "how to keep from re-sharding (dispatch_batches=True is not supported: set accelerator_config="
        "{'dispatch_batches': False})"
    )


# ============================================================================ the trainer
class _CommitCallback(TrainerCallback):
    """Commits the buffered feedback after each optimizer step (and at an epoch's end) on every rank."""

    def __init__(self, trainer: IRDROTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._irdro_train_begin(state)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sampler = self.trainer.irdro_sampler
        if sampler is not None and state.epoch is not None:
            sampler.set_epoch(int(math.floor(float(state.epoch) + 1e-9)))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._irdro_commit()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._irdro_commit()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._irdro_save(args, state)


class IRDROTrainerMixin:
    """Trainer mixin: the train DataLoader draws from an :class:`~irdro_sampler.IRDROSampler`, fed with
    per-sample losses after every optimizer step, checkpointed with the Trainer.

    Keyword arguments (the rest go to the Trainer):
        irdro: ``IRDROSampler`` options (``groups=``, ``ess_fraction=``, ``seed=``, ...; ``seed`` defaults
            to ``args.data_seed`` or ``args.seed``), or a built ``IRDROSampler`` whose ``batch_size``,
            ``num_replicas``, ``rank`` and size match ``per_device_train_batch_size``, the world size, this
            rank and ``train_dataset``. ``sharded=True`` among the options (or a built
            :class:`~irdro_sampler.ShardedIRDROSampler`) shards the loss table over the ranks (the other
            options are then ``ShardedIRDROSampler``'s; :mod:`irdro_sampler.integrations.hf_sharded`).
            Default: the sampler's defaults, with one exception: when
            ``groups`` is not given and ``train_dataset`` is a ``datasets.Dataset`` whose ``label`` (or
            ``labels``) column is a ``ClassLabel``, its class ids are the groups (the task suite measured
            labels as groups safer; ``groups=None`` opts out). Class-index labels without groups are
            noted once in the log, with the measured consequence.

            ``initial_losses`` (a key of the dict, not a sampler option): losses of the starting model
            measured before training (a scoring pass), so that the first batch is drawn from the rule
            fitted on them (:meth:`~irdro_sampler.IRDROSampler.prime`) rather than uniformly. One of
            ``(indices, losses)``; a vector of one loss per sample of ``train_dataset`` (numpy, torch or a
            list; NaN for a sample not scored, which stays unseen); or the path of a ``.npy`` file holding
            such a vector (for configs). The form is checked here (``TypeError``, or
            ``FileNotFoundError`` for a missing path); the length against ``train_dataset`` when the
            sampler is built (``ValueError`` naming ``irdro['initial_losses']`` and the shape). Every rank
            passes the same losses. ``train(resume_from_checkpoint=...)`` does not prime again: the
            checkpoint's sampler state already holds the primed losses (as feedback applied before the first
            batch), and the resumed run draws the uninterrupted run's batches. The cost is the scoring pass
            itself, one forward pass of the model over the training data (no backward), run by the user
            before ``train()``. A built ``IRDROSampler`` / ``ShardedIRDROSampler`` passed as ``irdro`` has
            no such key: call its ``prime(indices, losses)`` before ``train()`` (not when resuming).
        per_sample_loss: how one loss per sample is computed from ``(outputs, inputs)`` (``inputs``
            includes ``labels``): ``'auto'`` (default, :func:`default_per_sample_loss` with the kind of
            model found from its class), ``'causal_lm'``, ``'token'``, ``'classification'``, or a callable
            returning a 1-D tensor of the micro-batch's size (custom-loss models).
        irdro_check_interval: compare the ranks' sampler fingerprints every this many optimizer steps
            (one all-gather of an int64; 0: never). Default: ``args.logging_steps`` (int form).
        irdro_screen: leave out of each micro-batch's loss the first visits the sampler's cut would take
            (:meth:`IRDROSampler.screen <irdro_sampler.IRDROSampler.screen>`: samples its table has no loss of
            yet, judged by the last refit; for training over few passes, where most draws are first visits).
            The step trains on the Trainer's loss less the screened samples' share of it, divisor kept
            (:mod:`irdro_sampler.screened_loss`); every loss is still fed back, the sample order is
            unchanged, and ``irdro/screened_fraction`` is logged. With ``sharded=True`` each micro-batch's
            screen is a collective (the owners of its samples' rows judge them). ``'block'`` leaves out only
            first visits inside a block of unlearnable samples (a tight, far high mode of the refit's losses,
            such as random documents; ``screen(..., block_only=True)``), so it cannot starve a learnable
            minority the way ``True`` can. Default False.

    Attributes: ``irdro_sampler`` (None until the train DataLoader is built).
    """

    def __init__(
        self,
        *args: Any,
        irdro: IRDROSampler | ShardedIRDROSampler | Mapping[str, Any] | None = None,
        per_sample_loss: PerSampleLoss | str | None = None,
        irdro_check_interval: int | None = None,
        irdro_screen: bool | str = False,
        **kwargs: Any,
    ) -> None:
        if not (isinstance(irdro_screen, bool) or (isinstance(irdro_screen, str) and irdro_screen == "block")):
            raise TypeError(f"irdro_screen must be True, False or 'block', got {irdro_screen!r}")
        if irdro is not None and not isinstance(irdro, (IRDROSampler, ShardedIRDROSampler, Mapping)):
            raise TypeError(f"irdro must be a dict of IRDROSampler options, an IRDROSampler or a ShardedIRDROSampler, "
                            f"got {irdro!r}")
        if irdro_check_interval is not None and (
            isinstance(irdro_check_interval, bool) or not isinstance(irdro_check_interval, int) or irdro_check_interval < 0
        ):
            raise ValueError(f"irdro_check_interval must be an int >= 0 or None, got {irdro_check_interval!r}")
        self._irdro_spec = irdro if isinstance(irdro, (IRDROSampler, ShardedIRDROSampler)) else dict(irdro or {})
        if isinstance(self._irdro_spec, dict):
            for key in ("num_replicas", "rank", "batch_size", "data_source_or_size", "dataset_size"):
                if key in self._irdro_spec:
                    raise ValueError(f"irdro: {key!r} is set by the Trainer (from its arguments); leave it out")
            sharded = self._irdro_spec.get("sharded", False)
            if not isinstance(sharded, bool):
                raise ValueError(f"irdro: 'sharded' must be True or False, got {sharded!r}")
            check_initial_losses(self._irdro_spec.get("initial_losses"), _INITIAL_LOSSES)
        self._irdro_loss_fn, self._irdro_loss_kind = _resolve_loss(per_sample_loss)
        super().__init__(*args, **kwargs)
        logging_steps = getattr(self.args, "logging_steps", 0)
        self._irdro_check_interval = (
            irdro_check_interval if irdro_check_interval is not None
            else int(logging_steps) if float(logging_steps).is_integer() and logging_steps >= 1 else 0
        )
        self.irdro_sampler: IRDROSampler | ShardedIRDROSampler | None = None
        self._irdro_resume_from: str | None = None
        self._irdro_resume_step: int | None = None
        self._irdro_current: tuple[list[int], int] | None = None
        self._irdro_parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, idx, loss) per micro-batch
        self._irdro_drawn_sum = 0.0
        self._irdro_drawn_count = 0
        self._irdro_commits = 0
        self._irdro_screen = irdro_screen
        self._irdro_screened = self._irdro_screen_judged = 0  # this rank's micro-batches since the last log
        # A user who set groups (even to None) has chosen; the note is for those who have not.
        self._irdro_noted_groups = isinstance(self._irdro_spec, dict) and "groups" in self._irdro_spec
        self.add_callback(_CommitCallback(self))  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ sampler and DataLoader
    def _irdro_build_sampler(self, size: int, dataset: Any = None) -> IRDROSampler | ShardedIRDROSampler:
        args = self.args  # type: ignore[attr-defined]
        batch, replicas, rank = train_batch_size(self), int(args.world_size), int(args.process_index)
        if isinstance(self._irdro_spec, ShardedIRDROSampler):
            return hf_sharded.check_sampler(self._irdro_spec, batch, replicas, rank, size)
        if isinstance(self._irdro_spec, IRDROSampler):
            s = self._irdro_spec
            for name, mine, theirs in (("batch_size", s.batch_size, batch), ("num_replicas", s.num_replicas, replicas),
                                       ("rank", s.rank, rank), ("dataset size", s.dataset_size, size)):
                if mine != theirs:
                    raise ValueError(
                        f"irdro: the IRDROSampler has {name}={mine} but the Trainer has {theirs} "
                        "(per_device_train_batch_size, world size, this rank, len(train_dataset)); "
                        "pass a dict of options instead and the Trainer builds it"
                    )
            return s
        options = dict(self._irdro_spec)
        sharded = options.pop("sharded", False)
        options.pop("initial_losses", None)  # not a sampler option: get_train_dataloader primes with them
        options.setdefault("seed", args.data_seed if args.data_seed is not None else args.seed)
        if "groups" not in options:
            # The data set declares its classes: judge each sample within its class (measured safer:
            # integrations/_class_targets.py). irdro=dict(groups=None) opts out.
            found = class_label_groups(dataset)
            if found is not None:
                column, options["groups"] = found
                log.info("IRDROTrainer: the %r column is a ClassLabel; its %d classes are the sampler's groups "
                         "(irdro=dict(groups=None) turns this off)", column, int(options["groups"].max()) + 1)
        if sharded:
            return hf_sharded.build_sampler(size, batch, options)
        return IRDROSampler(size, batch, num_replicas=replicas, rank=rank, **options)

    def _irdro_check_delay(self, sampler: IRDROSampler | ShardedIRDROSampler) -> None:
        args = self.args  # type: ignore[attr-defined]
        workers = int(args.dataloader_num_workers or 0)
        prefetch = int(args.dataloader_prefetch_factor or 2) if workers else 0
        ahead = int(args.gradient_accumulation_steps) + 1 + workers * prefetch
        if sampler.feedback_delay <= ahead:
            raise ValueError(
                f"irdro: feedback_delay={sampler.feedback_delay} must exceed the batches drawn before a step's "
                f"feedback is committed: gradient_accumulation_steps ({args.gradient_accumulation_steps}) + 1 + "
                f"dataloader_num_workers x prefetch_factor ({workers} x {prefetch}) = {ahead}; set "
                f"irdro=dict(feedback_delay={ahead + 1}) or more"
            )

    def get_train_dataloader(self) -> DataLoader:
        """The train DataLoader drawing from the IRDROSampler (built here; restored when resuming)."""
        dataset = self.train_dataset  # type: ignore[attr-defined]
        if dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if _is_iterable_dataset(dataset) or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"train_dataset: IRDROTrainer needs a map-style data set (with __len__ and __getitem__; a "
                f"datasets.Dataset or a torch Dataset) to draw samples by index; got {type(dataset).__name__}. "
                "For streamed data use irdro_sampler.integrations.streaming with Composer"
            )
        collate = self.data_collator  # type: ignore[attr-defined]
        try:
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = remove_unused_columns(self, dataset)
        else:
            collate = collator_without_unused_columns(self, collate)
        split = getattr(getattr(self.accelerator, "dataloader_config", None), "split_batches", False)  # type: ignore[attr-defined]
        if split:
            raise ValueError("IRDROTrainer does not support accelerator_config split_batches=True")
        sampler = self._irdro_build_sampler(len(dataset), self.train_dataset)  # type: ignore[attr-defined]
        self._irdro_check_delay(sampler)
        if self._irdro_resume_from is not None:
            self._irdro_load(sampler, self._irdro_resume_from)  # the state holds the primed losses, if any
        else:
            self._irdro_prime(sampler, len(dataset))
        self.irdro_sampler = sampler
        batches = _RankBatches(sampler)
        args = self.args  # type: ignore[attr-defined]
        params: dict[str, Any] = {
            "batch_sampler": batches,
            "collate_fn": _KeyedCollate(collate),
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
            "persistent_workers": args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
        }
        if args.dataloader_num_workers > 0:
            if getattr(args, "dataloader_prefetch_factor", None) is not None:
                params["prefetch_factor"] = args.dataloader_prefetch_factor
            if getattr(args, "dataloader_multiprocessing_context", None) is not None:
                params["multiprocessing_context"] = args.dataloader_multiprocessing_context
        prepared = self.accelerator.prepare(DataLoader(_KeyedDataset(dataset), **params))  # type: ignore[attr-defined]
        _neutralise_sharding(prepared, batches)
        return prepared

    def _irdro_prime(self, sampler: IRDROSampler | ShardedIRDROSampler, size: int) -> None:
        """``sampler.prime`` with ``irdro['initial_losses']`` (if given) of a fresh, not resumed, run."""
        initial = self._irdro_spec.get("initial_losses") if isinstance(self._irdro_spec, dict) else None
        if initial is not None:
            prime_from(sampler.prime, initial, size, _INITIAL_LOSSES)

    # ------------------------------------------------------------------ feedback
    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        if INDEX_KEY in inputs:
            idx = inputs.pop(INDEX_KEY)
            step = inputs.pop(STEP_KEY)
            self._irdro_current = ([int(i) for i in idx], int(step))
        try:
            out = super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc]
        finally:
            leftover, self._irdro_current = self._irdro_current, None
        if leftover is not None:
            raise RuntimeError(
                "IRDROTrainerMixin: training_step did not reach the mixin's compute_loss (a subclass overrides "
                "compute_loss without calling super().compute_loss): no per-sample losses for this batch"
            )
        return out

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        current, self._irdro_current = self._irdro_current, None
        if current is None:  # evaluation, or a batch without indices
            return super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs
            )
        view = dict(inputs)  # the Trainer pops labels from `inputs` when it computes the loss itself
        loss, outputs = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch, **kwargs
        )
        with torch.no_grad():
            per_sample = self._irdro_per_sample(model, outputs, view)
        self._irdro_note_class_targets(view)
        idx, step = current
        if not isinstance(per_sample, torch.Tensor) or per_sample.ndim != 1 or per_sample.shape[0] != len(idx):
            shape = tuple(per_sample.shape) if isinstance(per_sample, torch.Tensor) else type(per_sample).__name__
            raise ValueError(
                f"per_sample_loss must return a 1-D tensor with one loss per sample of the micro-batch ({len(idx)}), "
                f"got {shape}"
            )
        self._irdro_parts.append((step, torch.tensor(idx, dtype=torch.int64), per_sample.detach().float().cpu()))
        if self._irdro_screen:
            loss = self._irdro_screened_loss(model, loss, outputs, view, idx, per_sample)
        return (loss, outputs) if return_outputs else loss

    def _irdro_screened_loss(self, model: Any, loss: torch.Tensor, outputs: Any, inputs: Mapping[str, Any],
                             idx: list[int], per_sample: torch.Tensor) -> torch.Tensor:
        """``loss`` less the share of the micro-batch's first visits the cut would take (``irdro_screen``)."""
        keep = self.irdro_sampler.screen(np.asarray(idx, dtype=np.int64), per_sample.detach().float().cpu(),  # type: ignore[union-attr]
                                         block_only=self._irdro_screen == "block")
        self._irdro_screened += int(keep.size - np.count_nonzero(keep))
        self._irdro_screen_judged += int(keep.size)
        return screened_loss(loss, outputs, inputs, per_sample, keep, kind=self._irdro_kind(model),
                             logits_of=_logits, loss_fn=self._irdro_loss_fn)

    def _irdro_note_class_targets(self, inputs: Mapping[str, Any]) -> None:
        """Once per trainer: class-index labels but no groups (the cut then judges rare classes as noise)."""
        sampler = self.irdro_sampler
        if self._irdro_noted_groups or sampler is None or sampler.table.groups is not None:
            return
        if looks_like_class_indices(inputs.get("labels")):
            self._irdro_noted_groups = True
            log.warning(no_groups_note("IRDROTrainer(..., irdro=dict(groups=labels)), one class id per sample of "
                                       "train_dataset (a datasets.ClassLabel 'label' column is used by itself)"))

    def _irdro_per_sample(self, model: Any, outputs: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        if self._irdro_loss_fn is not None:
            return self._irdro_loss_fn(outputs, inputs)
        return default_per_sample_loss(outputs, inputs, kind=self._irdro_kind(model))

    def _irdro_kind(self, model: Any) -> str | None:
        """The per-sample loss's kind (``per_sample_loss``; with ``'auto'`` found from the model class)."""
        kind = self._irdro_loss_kind
        if kind == "auto":
            kind = _model_kind(self.accelerator.unwrap_model(model))  # type: ignore[attr-defined]
        return kind

    def _irdro_commit(self) -> None:
        """Gather the buffered micro-batches' feedback from every rank and apply it (every rank alike)."""
        sampler = self.irdro_sampler
        if sampler is None:
            return
        parts, self._irdro_parts = self._irdro_parts, []
        steps = [p[0] for p in parts]
        sizes = [int(p[1].numel()) for p in parts]
        # Every rank trained the same micro-batches (same steps, same sizes: the sampler's geometry); the
        # local layout is sent along and checked so that a rank that diverged fails loudly, not silently.
        layout = torch.tensor([len(parts), *steps, *sizes], dtype=torch.int64)
        idx = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        loss = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0, dtype=torch.float32)
        device = self._irdro_device()
        lay_all, _ = gather_feedback(layout, torch.zeros(layout.numel()), device=device)
        if world_size() > 1 and not torch.equal(lay_all, layout.repeat(world_size())):
            raise RuntimeError(
                f"IRDROTrainer: the ranks trained different micro-batches since the last optimizer step "
                f"(this rank: steps {steps}, sizes {sizes}; all ranks: {lay_all.tolist()})"
            )
        all_idx, all_loss = gather_feedback(idx, loss, device=device)
        n, total = world_size(), sum(sizes)
        offsets = np.cumsum([0, *sizes])
        for k, step in enumerate(steps):
            sel = np.concatenate([np.arange(r * total + offsets[k], r * total + offsets[k + 1]) for r in range(n)])
            sel_t = torch.from_numpy(sel)
            sampler.update(all_idx[sel_t], all_loss[sel_t], step=step)
        finite = torch.isfinite(all_loss)
        self._irdro_drawn_sum += float(all_loss[finite].double().sum())
        self._irdro_drawn_count += int(finite.sum())
        self._irdro_commits += 1
        if self._irdro_check_interval and self._irdro_commits % self._irdro_check_interval == 0:
            check_ranks_agree(sampler.fingerprint(), f"IRDROSampler fingerprint after step {steps[-1] if steps else '-'}",
                              device=device)

    def _irdro_device(self) -> torch.device:
        import torch.distributed as dist

        if world_size() > 1 and dist.get_backend() == "nccl":
            return self.args.device  # type: ignore[attr-defined]
        return torch.device("cpu")

    # ------------------------------------------------------------------ metrics
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with ``irdro/*`` metrics added to training logs (those with ``loss``)."""
        sampler = self.irdro_sampler
        if sampler is not None and "loss" in logs:
            for k, v in sampler.stats().items():
                if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                    logs[f"irdro/{k}"] = float(v)
            if self._irdro_drawn_count:
                logs["irdro/drawn_loss_mean"] = self._irdro_drawn_sum / self._irdro_drawn_count
            self._irdro_drawn_sum, self._irdro_drawn_count = 0.0, 0
            if self._irdro_screen_judged:
                logs["irdro/screened_fraction"] = self._irdro_screened / self._irdro_screen_judged
                self._irdro_screened = self._irdro_screen_judged = 0
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    # ------------------------------------------------------------------ checkpoints
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; with ``resume_from_checkpoint`` the sampler state in that folder is restored."""
        path: str | None = None
        if resume_from_checkpoint is True:
            path = get_last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
            # (None: the Trainer raises its own error about the missing checkpoint)
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            path = os.fspath(resume_from_checkpoint)
        self._irdro_resume_from = path
        self._irdro_parts = []
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        finally:
            self._irdro_resume_from = None

    def _irdro_load(self, sampler: IRDROSampler | ShardedIRDROSampler, folder: str) -> None:
        if isinstance(sampler, ShardedIRDROSampler):
            self._irdro_resume_step = hf_sharded.load(sampler, folder)
            return
        file = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(file):
            sharded = os.path.isdir(os.path.join(folder, hf_sharded.SHARDS_FOLDER))
            raise FileNotFoundError(
                f"resume_from_checkpoint: {folder} has no {STATE_FILE}: "
                + ("it holds a ShardedIRDROSampler state (resume with irdro=dict(sharded=True, ...))" if sharded else
                   "it was not written by IRDROTrainer (or the save was interrupted); resume from a checkpoint of an "
                   "IRDRO run")
            )
        state = torch.load(file, weights_only=True)
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT or "sampler" not in state:
            raise ValueError(f"resume_from_checkpoint: {file} is not an IRDROTrainer sampler state")
        sampler.load_state_dict(state["sampler"])
        self._irdro_resume_step = int(state["global_step"])

    def _irdro_train_begin(self, state: Any) -> None:
        step, self._irdro_resume_step = self._irdro_resume_step, None
        if step is not None and step != int(state.global_step):
            raise ValueError(
                f"resume_from_checkpoint: the sampler state was saved at global step {step} but the Trainer state "
                f"at {state.global_step}"
            )
        if self.irdro_sampler is not None and world_size() > 1:
            check_ranks_agree(self.irdro_sampler.fingerprint(), "IRDROSampler fingerprint at train begin",
                              device=self._irdro_device())

    def _irdro_save(self, args: Any, state: Any) -> None:
        """Write the sampler state into the checkpoint folder the Trainer has just written (``on_save``; every
        rank of a ``ShardedIRDROSampler`` writes its rows)."""
        sampler = self.irdro_sampler
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if isinstance(sampler, ShardedIRDROSampler):
            hf_sharded.save(sampler, folder, int(state.global_step))
            return
        if sampler is None or not args.should_save:
            return
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"IRDROTrainer: the Trainer's checkpoint folder {folder} does not exist after on_save (a "
                "hyperparameter-search run directory is not supported)"
            )
        save_state(
            {"format": _STATE_FORMAT, "version": _STATE_VERSION, "global_step": int(state.global_step),
             "sampler": sampler.state_dict()},
            os.path.join(folder, STATE_FILE),
        )


class IRDROTrainer(IRDROTrainerMixin, Trainer):
    """``transformers.Trainer`` with IR-DRO sampling: see :class:`IRDROTrainerMixin` and the module docstring."""
