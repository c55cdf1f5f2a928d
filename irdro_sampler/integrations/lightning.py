"""Lightning integration: :class:`IRDROCallback`.

What a user adds to a Lightning script::

    irdro = IRDROCallback()                                              # 1. the callback
    trainer = L.Trainer(..., callbacks=[irdro], use_distributed_sampler=False)  # 2. (+ the flag)

    # in train_dataloader() (LightningModule or LightningDataModule): the sampler, attached to the callback
    sampler = irdro.attach(IRDROSampler(IndexedDataset(ds), batch_size, groups=labels))
    return DataLoader(IndexedDataset(ds), batch_size=batch_size, sampler=sampler)

    # in training_step: one loss per sample, returned under "per_sample_loss"
    per_sample = F.cross_entropy(model(x), y, reduction="none")
    return {"loss": per_sample.mean(), "per_sample_loss": per_sample.detach()}

The batch carries the samples' indices (``IndexedDataset``: a dict batch's ``"sample_idx"`` or a tuple
batch's last element); ``training_step`` may instead return them under ``"sample_idx"``.

Contract and facts about Lightning 2.6 this relies on (checked in its source):

* **Feedback.** After every training batch (``on_train_batch_end``; every micro-batch with
  ``accumulate_grad_batches``), the batch's indices and per-sample losses are gathered from all ranks
  (one collective pair, rank order) and every rank calls ``sampler.update`` with the same records, at
  step ``current_epoch * batches_per_epoch + batch_idx`` (the sampler's global batch). The sampler's
  ``feedback_delay`` must exceed the batches Lightning and the DataLoader draw ahead (1 + ``num_workers
  x prefetch_factor``; checked at ``on_train_start``).
* **The sampler is used as it is.** ``IRDROSampler`` already yields this rank's slice of a global batch
  drawn identically on every rank. Lightning replaces or wraps a DataLoader's sampler in
  ``DistributedSamplerWrapper`` (which materialises ``list(sampler)`` on every rank each epoch) when
  ``use_distributed_sampler=True`` and the sampler is not a ``DistributedSampler``. ``IRDROSampler`` is
  one, so Lightning 2.6 leaves it alone either way (tested on 2 ranks with the flag on: every sample
  once per epoch); ``use_distributed_sampler=False`` is the documented setting (Lightning needs it for
  a ``batch_sampler=``). At ``on_train_start`` the callback raises ``ValueError`` naming the flag if the
  train DataLoader's sampler is not the attached ``IRDROSampler`` (replaced or wrapped). (The flag
  itself lives only on a private Lightning object, so the effect is what is checked.)
* **Checkpoints.** The callback's ``state_dict`` (in every Lightning checkpoint) holds the sampler
  state and the next global batch. Lightning restores callback states before it builds the train
  DataLoader and draws its first batch (``FitLoop.setup_data`` iterates it at once), so the state is
  kept until :meth:`IRDROCallback.attach` is called from ``train_dataloader()``: it loads the state and
  positions the sampler at the next batch (epoch, and batch within the epoch with
  ``set_start_batch``: Lightning restarts a plain DataLoader at its beginning on a mid-epoch resume and
  counts ``batch_idx`` on from the checkpoint). The global order after resume is bitwise the
  uninterrupted run's, from a mid-epoch or an end-of-epoch checkpoint (tested).
* **Metrics.** ``irdro/*`` (the sampler's ``stats()``, O(N), and the drawn samples' mean loss) are logged
  with ``pl_module.log_dict`` every ``log_every_n_steps`` optimizer steps.

**The loss table sharded over the ranks:** attach a :class:`~irdro_sampler.ShardedIRDROSampler` instead
(N / world rows per rank); its rows are saved per rank in a folder beside the checkpoints. See
:mod:`irdro_sampler.integrations.lightning_sharded`.

Tested: lightning 2.6 on CPU, 1 process and 2 DDP ranks (gloo).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback  # type: ignore[no-redef]

from irdro_sampler import IRDROSampler, ShardedIRDROSampler
from irdro_sampler.distributed import check_ranks_agree, gather_feedback, process_group_up
from irdro_sampler.integrations import lightning_sharded
from irdro_sampler.integrations._class_targets import looks_like_class_indices, no_groups_note

__all__ = ["LOSS_KEY", "IRDROCallback"]

#: Where ``training_step`` returns the per-sample losses (default of ``IRDROCallback(loss_key=...)``).
LOSS_KEY = "per_sample_loss"
_STATE_FORMAT = "irdro_sampler.lightning"
_STATE_VERSION = 1

log = logging.getLogger(__name__)


def _find_sampler(dataloader: Any) -> Any:
    for obj in (getattr(dataloader, "sampler", None), getattr(dataloader, "batch_sampler", None)):
        for candidate in (obj, getattr(obj, "sampler", None)):
            if isinstance(candidate, (IRDROSampler, ShardedIRDROSampler)):
                return candidate
    return getattr(dataloader, "sampler", None)


class IRDROCallback(Callback):
    """Feed per-sample losses from ``training_step`` to an :class:`~irdro_sampler.IRDROSampler` (or a
    :class:`~irdro_sampler.ShardedIRDROSampler`: :mod:`irdro_sampler.integrations.lightning_sharded`).

    Args:
        loss_key: the key of ``training_step``'s returned dict holding one loss per sample of the batch
            (1-D tensor; detached or not). Default ``"per_sample_loss"``.
        index_key: where the batch's sample indices are: a key of ``training_step``'s returned dict or of
            a dict batch (default ``"sample_idx"``, what ``IndexedDataset`` adds), else a tuple batch's last
            element (``IndexedDataset`` over tuple samples).
        check_interval: compare the ranks' sampler fingerprints every this many batches (one all-gather of
            an int64; 0: only at train start). Default 50.
        log_metrics: log ``irdro/*`` every ``log_every_n_steps`` (default True).

    Attributes: ``sampler`` (the attached sampler, or None).
    """

    def __init__(self, *, loss_key: str = LOSS_KEY, index_key: str = "sample_idx", check_interval: int = 50,
                 log_metrics: bool = True) -> None:
        if not isinstance(loss_key, str) or not loss_key:
            raise TypeError(f"loss_key must be a non-empty str, got {loss_key!r}")
        if not isinstance(index_key, str) or not index_key:
            raise TypeError(f"index_key must be a non-empty str, got {index_key!r}")
        if isinstance(check_interval, bool) or not isinstance(check_interval, int) or check_interval < 0:
            raise ValueError(f"check_interval must be an int >= 0, got {check_interval!r}")
        self.loss_key = loss_key
        self.index_key = index_key
        self.check_interval = check_interval
        self.log_metrics = bool(log_metrics)
        self.sampler: IRDROSampler | ShardedIRDROSampler | None = None
        self._pending_state: dict[str, Any] | None = None
        self._trainer: Any = None  # set in setup(): a sharded sampler's rows folders need it
        self._rows_folders = lightning_sharded.RowsFolders()
        self._next_batch = 0
        self._batches = 0
        self._drawn_sum = 0.0
        self._drawn_count = 0
        self._noted_groups = False

    # ------------------------------------------------------------------ the sampler
    def attach(self, sampler: IRDROSampler | ShardedIRDROSampler) -> IRDROSampler | ShardedIRDROSampler:
        """Register ``sampler`` (call in ``train_dataloader()``, on every rank) and return it.

        When a checkpoint is being resumed, its state is loaded here and the sampler is positioned at the
        next batch to train, before Lightning draws the first batch (a ``ShardedIRDROSampler``'s rows are
        read from their folder: a collective). Raises ``TypeError`` for anything but an ``IRDROSampler`` or
        a ``ShardedIRDROSampler``, ``ValueError`` for a checkpoint saved with the other kind.
        """
        if not isinstance(sampler, (IRDROSampler, ShardedIRDROSampler)):
            raise TypeError(f"sampler must be an irdro_sampler.IRDROSampler, got {type(sampler).__name__} (or a "
                            "ShardedIRDROSampler)")
        if self._pending_state is not None:
            state = self._pending_state
            sharded = state.get("format") == lightning_sharded.FORMAT
            if sharded != isinstance(sampler, ShardedIRDROSampler):
                saved, given = ("a ShardedIRDROSampler", "an IRDROSampler") if sharded else (
                    "an IRDROSampler", "a ShardedIRDROSampler")
                raise ValueError(f"IRDROCallback.attach: the checkpoint holds {saved} state but {given} was attached; "
                                 "resume with the kind of sampler the checkpoint was saved with")
            self._pending_state = None
            if sharded:
                self._next_batch = lightning_sharded.load(sampler, self._trainer, state)
            else:
                sampler.load_state_dict(state["sampler"])
                self._next_batch = int(state["next_batch"])
            bpe = int(sampler.batches_per_epoch)
            sampler.set_epoch(self._next_batch // bpe)
            sampler.set_start_batch(self._next_batch % bpe)
        self.sampler = sampler
        return sampler

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        found = _find_sampler(trainer.train_dataloader)
        if self._pending_state is not None:
            raise RuntimeError(
                "IRDROCallback: a checkpoint's sampler state was restored but no sampler was attached; in "
                "train_dataloader() build the sampler as `sampler = irdro.attach(IRDROSampler(...))`"
            )
        if self.sampler is None and isinstance(found, IRDROSampler):
            self.sampler = found  # a fresh run that did not call attach(): fine
        if self.sampler is None or found is not self.sampler:
            raise ValueError(
                f"IRDROCallback: the train DataLoader's sampler is {type(found).__name__}, not the attached "
                "IRDROSampler: Lightning replaced or wrapped it (DistributedSamplerWrapper materialises "
                "list(sampler) on every rank each epoch); set Trainer(use_distributed_sampler=False) and pass "
                "the sampler as DataLoader(sampler=...)"
            )
        dl = trainer.train_dataloader
        workers = int(getattr(dl, "num_workers", 0) or 0)
        ahead = 1 + workers * int(getattr(dl, "prefetch_factor", 2) or 2 if workers else 0)
        if self.sampler.feedback_delay <= ahead + 1:
            raise ValueError(
                f"IRDROSampler(feedback_delay={self.sampler.feedback_delay}) must exceed the batches drawn before a "
                f"batch's feedback arrives (1 + num_workers x prefetch_factor = {ahead}) by at least 2; raise it"
            )
        if getattr(dl, "batch_size", None) is not None and dl.batch_size != self.sampler.batch_size:
            raise ValueError(
                f"the IRDROSampler has batch_size={self.sampler.batch_size} but the DataLoader has "
                f"batch_size={dl.batch_size}: they must be equal (the per-rank batch size)"
            )
        check_ranks_agree(self.sampler.fingerprint(), "IRDROSampler fingerprint at train start",
                          device=self._device(pl_module))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        sampler = self.sampler
        if sampler is None:
            return
        if isinstance(sampler, ShardedIRDROSampler) and sampler.rank == 0:
            self._rows_folders.settle(trainer)  # the rows folders of checkpoints rotated out since the last batch
        losses = self._losses(outputs)
        indices = self._indices(outputs, batch)
        self._note_class_targets(outputs, batch, sampler)
        if losses.shape[0] != indices.shape[0]:
            raise ValueError(
                f"training_step returned {losses.shape[0]} per-sample losses ({self.loss_key!r}) for a batch of "
                f"{indices.shape[0]} samples"
            )
        step = int(trainer.current_epoch) * int(sampler.batches_per_epoch) + int(batch_idx)
        device = self._device(pl_module)
        all_idx, all_loss = gather_feedback(indices.to(device), losses.to(device), device=device)
        sampler.update(all_idx, all_loss, step=step)
        self._next_batch = step + 1
        n_batches = float(trainer.num_training_batches)
        if math.isfinite(n_batches) and batch_idx + 1 >= n_batches:  # the epoch's last (limit_train_batches too)
            self._next_batch = (int(trainer.current_epoch) + 1) * int(sampler.batches_per_epoch)
        finite = torch.isfinite(all_loss)
        self._drawn_sum += float(all_loss[finite].double().sum())
        self._drawn_count += int(finite.sum())
        self._batches += 1
        if self.check_interval and self._batches % self.check_interval == 0:
            check_ranks_agree(sampler.fingerprint(), f"IRDROSampler fingerprint after step {step}", device=device)
        every = int(getattr(trainer, "log_every_n_steps", 50) or 0)
        if self.log_metrics and every and (int(trainer.global_step) % every == 0):
            self._log(pl_module)

    def _log(self, pl_module: Any) -> None:
        assert self.sampler is not None
        metrics = {f"irdro/{k}": float(v) for k, v in self.sampler.stats().items()
                   if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                   and math.isfinite(float(v))}
        if self._drawn_count:
            metrics["irdro/drawn_loss_mean"] = self._drawn_sum / self._drawn_count
        self._drawn_sum, self._drawn_count = 0.0, 0
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if isinstance(self.sampler, ShardedIRDROSampler) and self.sampler.rank == 0:
            self._rows_folders.settle(trainer)

    def _note_class_targets(self, outputs: Any, batch: Any, sampler: IRDROSampler | ShardedIRDROSampler) -> None:
        """Once per callback: class-index targets but a sampler without groups (see ``_class_targets``)."""
        if self._noted_groups or sampler.table.groups is not None:
            return
        if isinstance(batch, Mapping):
            targets = batch.get("labels")
        elif isinstance(batch, (tuple, list)):
            # (x, y, idx) from IndexedDataset: y is the second element unless it is the index itself
            fields = batch if isinstance(outputs, Mapping) and self.index_key in outputs else batch[:-1]
            targets = fields[1] if len(fields) >= 2 else None
        else:
            targets = None
        if looks_like_class_indices(targets):
            self._noted_groups = True
            log.warning(no_groups_note("IRDROSampler(IndexedDataset(ds), batch_size, groups=labels)"))

    def _losses(self, outputs: Any) -> torch.Tensor:
        if not isinstance(outputs, Mapping) or self.loss_key not in outputs:
            got = sorted(map(str, outputs)) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise KeyError(
                f"IRDROCallback: training_step must return a dict with the per-sample losses under {self.loss_key!r} "
                f"(e.g. {{'loss': per_sample.mean(), {self.loss_key!r}: per_sample.detach()}}); it returned {got}"
            )
        losses = torch.as_tensor(outputs[self.loss_key]).detach()
        if losses.ndim != 1 or not losses.dtype.is_floating_point:
            raise ValueError(
                f"training_step's {self.loss_key!r} must be a 1-D float tensor (one loss per sample), got dtype "
                f"{losses.dtype} and shape {tuple(losses.shape)}"
            )
        return losses.float()

    def _indices(self, outputs: Any, batch: Any) -> torch.Tensor:
        key = self.index_key
        if isinstance(outputs, Mapping) and key in outputs:
            idx = outputs[key]
        elif isinstance(batch, Mapping) and key in batch:
            idx = batch[key]
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            idx = batch[-1]
        else:
            raise KeyError(
                f"IRDROCallback: no sample indices: neither training_step's output nor the batch has {key!r}, and "
                "the batch is not a tuple whose last element is the index; wrap the data set in "
                "irdro_sampler.IndexedDataset"
            )
        idx = torch.as_tensor(idx).detach()
        if idx.ndim != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise TypeError(f"the batch's sample indices must be a 1-D integer tensor, got {idx.dtype} {tuple(idx.shape)}")
        return idx.to(torch.int64)

    @staticmethod
    def _device(pl_module: Any) -> torch.device:
        import torch.distributed as dist

        if process_group_up() and dist.get_backend() == "nccl":
            return pl_module.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The sampler state and the next global batch (tensors and primitives; the same on every rank). With a
        ``ShardedIRDROSampler``: every rank writes its rows folder (a collective: Lightning calls this on every
        rank while building a checkpoint) and the state is the folder's entry."""
        if self.sampler is None:
            return dict(self._pending_state) if self._pending_state is not None else {}
        if isinstance(self.sampler, ShardedIRDROSampler):
            entry, folder = lightning_sharded.save(self.sampler, self._trainer, self._next_batch)
            if self.sampler.rank == 0:
                self._rows_folders.wrote(self._trainer, folder)
            return entry
        return {"format": _STATE_FORMAT, "version": _STATE_VERSION, "next_batch": self._next_batch,
                "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's state until :meth:`attach` (or load it now if a sampler is attached)."""
        if not state_dict:
            return
        if isinstance(state_dict, Mapping) and state_dict.get("format") == lightning_sharded.FORMAT:
            self._pending_state = lightning_sharded.check_entry(state_dict)
        else:
            if not isinstance(state_dict, Mapping) or state_dict.get("format") != _STATE_FORMAT:
                raise ValueError(f"IRDROCallback.load_state_dict: not an IRDROCallback state: {sorted(state_dict)}")
            IRDROSampler.check_state_dict(state_dict["sampler"])
            self._pending_state = dict(state_dict)
        if self.sampler is not None:
            sampler, self.sampler = self.sampler, None
            self.attach(sampler)
