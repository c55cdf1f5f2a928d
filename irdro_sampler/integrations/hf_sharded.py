"""Hugging Face ``Trainer`` with the loss table sharded over the ranks: the
:class:`~irdro_sampler.sharded_sampler.ShardedIRDROSampler` side of :class:`~irdro_sampler.integrations.hf.IRDROTrainerMixin`.

Turned on with ``IRDROTrainer(..., irdro=dict(sharded=True, ...))`` (the other keys are
``ShardedIRDROSampler`` options; the Trainer sets ``dataset_size`` and ``batch_size``), or by passing a
``ShardedIRDROSampler`` built by the user (checked against the Trainer's geometry). Everything else of the
mixin (the DataLoader, the per-sample losses, the per-step commit, the ``irdro/*`` metrics) is shared with
the unsharded path; this module holds what differs:

* **Building.** The sampler needs an initialised process group (the Trainer's: run under ``torchrun``);
  without one a ``ValueError`` says so (on one process the unsharded sampler is the same thing). ``groups``
  may be one id per sample of ``train_dataset`` (as for ``IRDROSampler``; a ``ClassLabel`` column is found
  as there) or the sharded sampler's callable ``(start, stop) -> ids``: an array is sliced per rank, so a
  rank's table holds the group ids of its own rows only.
* **Feedback.** The sharded sampler's ``update`` contract is the unsharded one: every rank passes the
  *gathered* feedback of all ranks, in the same order; each rank applies the rows it owns. The mixin's
  commit already gathers every micro-batch's indices and losses in rank order (= the global batch's
  order), so nothing changes there.
* **Checkpoints** (:func:`save`, :func:`load`). The Trainer runs ``on_save`` on every rank after writing
  ``checkpoint-<step>/``; every rank writes its rows into ``checkpoint-<step>/irdro-shards/`` (the
  :mod:`irdro_sampler.sharded_state` layout: ``rows-<first>-<stop>.pt`` per rank, ``common.pt``) and rank 0
  adds ``trainer.pt`` (the Trainer's global step, the feedback digest and the fingerprint). The folder
  lives inside the checkpoint, so the Trainer's ``save_total_limit`` rotation removes it with the
  checkpoint. On resume every rank checks the folder, ``trainer.pt``, ``common.pt`` and every row file
  listed there before anything is loaded: a missing one is a ``ValueError`` naming its path, raised on
  every rank, with the sampler unchanged. A checkpoint saved on any number of ranks loads on any other
  (the draws do not depend on the world size). The folder must be one all ranks see (a shared file
  system across nodes).
* **Metrics.** ``stats()`` of a sharded sampler is a collective: the ``irdro/*`` metrics are computed in
  ``Trainer.log`` on every rank (as the Trainer's own training logs are); a ``log({"loss": ...})`` made on
  one rank only would wait for the others.

Cost and gain: per-rank memory for the table and the draw structure is N / world rows instead of N; each
draw and refresh is a collective (a reduction of the S virtual shards' totals and of the batch's ids), so
the sampler adds a few small all-reduces per micro-batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from irdro_sampler._validation import as_groups
from irdro_sampler.distributed import process_group_up
from irdro_sampler.integrations import _sharded_rows
from irdro_sampler.sharded_sampler import ShardedIRDROSampler

__all__ = ["SHARDS_FOLDER", "TRAINER_FILE", "build_sampler", "check_sampler", "load", "save"]

#: The folder of the sampler's per-rank rows inside each ``checkpoint-<step>`` folder.
SHARDS_FOLDER = "irdro-shards"
#: Rank 0's file in :data:`SHARDS_FOLDER`: the Trainer's global step, the feedback digest and the fingerprint.
TRAINER_FILE = _sharded_rows.MARKER
_FORMAT = "irdro_sampler.hf.sharded"
_VERSION = 1
_WHAT = "resume_from_checkpoint"


def _row_groups(groups: Any, size: int) -> Callable[[int, int], np.ndarray] | None:
    """The sharded sampler's ``groups`` callable from one id per sample (sliced per rank), or the callable."""
    if groups is None or callable(groups):
        return groups
    ids = as_groups(groups, size)
    return lambda start, stop: ids[start:stop]


def build_sampler(size: int, batch_size: int, options: Mapping[str, Any]) -> ShardedIRDROSampler:
    """A ``ShardedIRDROSampler`` over ``size`` samples with the per-rank ``batch_size``, over the default
    process group (the Trainer's). ``options`` are its keyword options (``groups`` one id per sample or a
    callable). ``ValueError`` without an initialised process group."""
    if not process_group_up():
        raise ValueError(
            "irdro: sharded=True needs an initialised torch.distributed process group (run the Trainer under "
            "torchrun with more than one process); on one process use the unsharded sampler (sharded=False)"
        )
    opts = dict(options)
    if "groups" in opts:
        opts["groups"] = _row_groups(opts["groups"], size)
    return ShardedIRDROSampler(size, batch_size, **opts)


def check_sampler(sampler: ShardedIRDROSampler, batch_size: int, world: int, rank: int, size: int) -> ShardedIRDROSampler:
    """``sampler`` if its geometry is the Trainer's, else ``ValueError`` naming the first difference."""
    for name, mine, theirs in (("batch_size", sampler.batch_size, batch_size), ("world size", sampler.world, world),
                               ("rank", sampler.rank, rank), ("dataset size", sampler.dataset_size, size)):
        if mine != theirs:
            raise ValueError(
                f"irdro: the ShardedIRDROSampler has {name}={mine} but the Trainer has {theirs} "
                "(per_device_train_batch_size, world size, this rank, len(train_dataset)); pass "
                "irdro=dict(sharded=True, ...) instead and the Trainer builds it"
            )
    return sampler


def save(sampler: ShardedIRDROSampler, checkpoint: str | os.PathLike, global_step: int) -> None:
    """Write ``sampler`` into ``<checkpoint>/irdro-shards/`` (a collective: every rank calls it from
    ``on_save``). ``FileNotFoundError`` on every rank if rank 0 does not see the checkpoint folder."""
    checkpoint = Path(checkpoint)
    dist.barrier(group=sampler.group)  # the Trainer's main process has written the checkpoint folder
    error = ""
    if sampler.rank == 0 and not checkpoint.is_dir():
        error = (f"IRDROTrainer: the Trainer's checkpoint folder {checkpoint} does not exist after on_save (a "
                 "hyperparameter-search run directory is not supported)")
    error = _sharded_rows.all_ok(error, sampler.group)
    if error:
        raise FileNotFoundError(error)
    _sharded_rows.write(sampler, checkpoint / SHARDS_FOLDER,
                        {"format": _FORMAT, "version": _VERSION, "global_step": int(global_step)})


def load(sampler: ShardedIRDROSampler, checkpoint: str | os.PathLike) -> int:
    """Restore ``sampler`` from ``<checkpoint>/irdro-shards/`` (a collective); returns the Trainer's global
    step it was saved at. ``ValueError`` on every rank naming a missing folder or file, nothing loaded."""
    checkpoint = Path(checkpoint)
    folder, error = checkpoint / SHARDS_FOLDER, ""
    if not folder.is_dir() and (checkpoint / "irdro_sampler.pt").is_file():
        error = (f"{_WHAT}: {folder} is missing: {checkpoint} holds an unsharded IRDROSampler state (resume with "
                 "sharded=False); nothing loaded")
    entry = _sharded_rows.load(sampler, folder, _FORMAT, _WHAT, error)
    return int(entry["global_step"])
