"""IRDRO over a :class:`~irdro_sampler.sharded_sampler.ShardedIRDROSampler`: the target, and its rows in
files of their own beside each Composer checkpoint.

Composer 0.32 writes one checkpoint file, rank 0's, unless the state dict is FSDP-sharded; a sharded
sampler's table rows live on every rank. So each rank's rows go into a *sidecar folder* named after the
checkpoint file: ``<checkpoint file>.irdro-shards/`` holding the :mod:`irdro_sampler.sharded_state` layout
(``rows-<first>-<stop>.pt`` per rank and ``common.pt``). The checkpoint itself holds only a small entry:
the sidecar's name, its absolute path when written, the feedback digest and the sampler's fingerprint.

* **Saving.** Composer calls ``state.state_dict()`` (and so :meth:`ShardedSamplerTarget.state_dict`) on
  every rank inside ``CheckpointSaver``'s save, after the saver recorded the new file's name in its
  public ``all_saved_checkpoints_to_timestamp``. The target takes rank 0's name (broadcast: the others'
  copies are formatted with their own rank) and every rank writes its rows into the sidecar before rank 0
  writes the checkpoint file. A ``state_dict()`` call that is not such a save (``Trainer.save_checkpoint``,
  a call by hand) writes nothing, warns, and records that the rows were not saved.
* **Finding it again.** At ``FIT_START`` the sidecar is looked up beside the checkpoint Composer loaded
  (``state.load_path``, symlinks such as autoresume's ``latest-rank0.pt`` resolved), else at the
  absolute path recorded; the feedback digest of its ``common.pt`` must match the checkpoint's. A missing
  folder or rank file is a ``ValueError`` naming it, raised on every rank, with nothing loaded.
* **Removed with it.** Rank 0 removes a sidecar it wrote once its checkpoint file is gone (Composer's
  ``save_num_checkpoints_to_keep`` rotation removes the file only), checked after every batch and at
  ``FIT_END``; and at ``FIT_START`` it removes sidecars in the saver folders whose checkpoint no longer exists (a crash
  between the two).

Only public Composer names are used, imported inside the functions that need them (importing this module
does not import Composer). The behaviour relied on (the name recorded before ``state.state_dict()``; the
rotation removing the file only) is pinned in :mod:`irdro_sampler.integrations._composer_compat`.
Local folders only: a checkpoint uploaded to an object store is uploaded without its sidecar.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from irdro_sampler._validation import as_groups
from irdro_sampler.sharded_sampler import ShardedIRDROSampler

from .._sharded_rows import all_ok, check_rows
from .targets import FeedbackOptions, SamplerTarget, option_conflicts

__all__ = ["ENTRY", "SIDECAR_SUFFIX", "ShardedBatchSampler", "ShardedSamplerTarget"]

#: The key of the sharded sampler's entry in IRDRO's checkpoint state.
ENTRY = "sharded_sampler"
#: ``<checkpoint file> + SIDECAR_SUFFIX`` is the folder of the checkpoint's per-rank rows.
SIDECAR_SUFFIX = ".irdro-shards"
_FORMAT = "irdro_sampler.composer.ShardedSidecar"
_VERSION = 1


class ShardedBatchSampler(DistributedSampler):
    """This rank's batches of a :class:`~irdro_sampler.sharded_sampler.ShardedIRDROSampler`, one list of
    indices per batch: ``DataLoader(IndexedDataset(ds), batch_sampler=ShardedBatchSampler(sampler))``.

    A ``DistributedSampler`` only so that Composer accepts it on more than one rank (its ``DataSpec``
    refuses a DataLoader whose sampler and batch sampler are not) and calls :meth:`set_epoch` on it; the
    indices are the sampler's (``len()`` is its batches per epoch, each batch drawn when the DataLoader
    asks for it, a collective). All state stays in the sampler.
    """

    def __init__(self, sampler: ShardedIRDROSampler) -> None:
        if not isinstance(sampler, ShardedIRDROSampler):
            raise TypeError(f"sampler must be a ShardedIRDROSampler, got {type(sampler).__name__}")
        super().__init__(range(sampler.dataset_size), num_replicas=sampler.world, rank=sampler.rank, shuffle=False)
        self.sampler = sampler

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:  # type: ignore[override]
        for batch in self.sampler.iter_batches():
            yield batch.tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)


class ShardedSamplerTarget(SamplerTarget):
    """A :class:`~irdro_sampler.sharded_sampler.ShardedIRDROSampler` in the train DataLoader (``sampler=``,
    or inside ``batch_sampler=``): fed the gathered feedback like :class:`SamplerTarget`, checkpointed in
    per-rank sidecar files (see the module docstring).

    Every method is called on every rank in step: :meth:`update`, :meth:`stats`, :meth:`state_dict` (inside
    Composer's checkpoint save) and :meth:`load_state_dict` run collectives of the sampler's group.
    Composer calls ``set_epoch`` only on a ``DistributedSampler``, so the target sets the sampler's epoch
    from the run's timestamp at ``FIT_START``, after loading and at every ``EPOCH_END``.
    """

    name = "ShardedIRDROSampler"
    sampler_type = ShardedIRDROSampler
    wants_epoch_end = True

    def __init__(self, sampler: ShardedIRDROSampler, dataloader: Any = None) -> None:
        super().__init__(sampler, dataloader)  # type: ignore[arg-type]
        self.sampler: ShardedIRDROSampler = sampler
        self.composer_state: Any = None
        self._handled: set[tuple[str, int]] = set()  # (checkpoint name, batch) of saves seen already
        self._written: list[tuple[Path, Path]] = []  # rank 0: (checkpoint file, its sidecar), oldest first

    @staticmethod
    def check_state(state: Mapping[str, Any]) -> None:
        """The checkpoint entry's shape (before any DataLoader exists); ``ValueError`` on a bad one."""
        if ENTRY not in state:
            return
        entry = state[ENTRY]
        if not isinstance(entry, Mapping) or entry.get("format") != _FORMAT:
            raise ValueError(f"IRDRO checkpoint: {ENTRY!r} is not a sharded sampler entry (format {_FORMAT!r})")
        for key, kinds in (("folder", (str, type(None))), ("path", (str, type(None))), ("fingerprint", (int,)),
                           ("feedback_digest", (str,))):  # fmt: skip
            if not isinstance(entry.get(key), kinds) or isinstance(entry.get(key), bool):
                raise ValueError(f"IRDRO checkpoint: {ENTRY}[{key!r}] is {entry.get(key)!r}")

    def _conflicts(self, options: FeedbackOptions) -> list[str]:
        s = self.sampler  # its table holds the group ids of its own rows only
        return option_conflicts(s.rule.config(), s.table, options,
                                lambda groups: as_groups(groups, s.dataset_size)[s.start : s.stop])

    def bind(self, state: Any) -> None:
        """Called by IRDRO at ``FIT_START`` (after :meth:`attach`, before loading): keep Composer's ``State``,
        mark the saves recorded so far as not ours to write, clear orphaned sidecars, set the epoch."""
        self.composer_state = state
        for saver in _savers(state):
            self._handled.update((k, int(t.batch)) for k, t in saver.all_saved_checkpoints_to_timestamp.items())
        if self.sampler.rank == 0:
            _remove_orphans(state)
        self.sampler.set_epoch(int(state.timestamp.epoch))

    # ------------------------------------------------------------------ feeding
    def update(self, indices: np.ndarray, losses: np.ndarray, step: int) -> None:
        self.sampler.update(indices, losses, step=step)
        self._prune()

    def importance_weights(self, indices: np.ndarray, step: int) -> np.ndarray:
        """``1 / (N p_i)`` from the probabilities batch ``step`` was drawn with (buffered by the sampler until
        its feedback arrives); ``RuntimeError`` when the batch is no longer buffered."""
        idx = np.asarray(indices, dtype=np.int64)
        p = self.sampler.drawn.probabilities_of(int(step), idx)
        if p is None:
            raise RuntimeError(f"ShardedIRDROSampler: batch {step} is not buffered any more (or did not draw {idx})")
        with np.errstate(divide="ignore"):
            return 1.0 / (self.sampler.dataset_size * np.asarray(p, dtype=np.float64))

    def stats(self) -> dict[str, float]:
        """The seen fraction and mean loss of the whole table (two sums reduced over the ranks)."""
        table = self.sampler.table
        sums = torch.tensor([float(table.num_seen), float(np.nansum(table.losses, dtype=np.float64))], dtype=torch.float64)
        dist.all_reduce(sums, group=self.sampler.group)
        seen, total = float(sums[0]), float(sums[1])
        return {"seen_fraction": seen / self.sampler.dataset_size, "table_mean_loss": total / seen if seen else float("nan")}

    def fit_end(self) -> None:
        """Called by IRDRO at ``FIT_END``: remove the sidecars of checkpoints rotated out by the last save."""
        if self.sampler.rank == 0:
            self._prune()

    def epoch_end(self, want_stats: bool) -> dict[str, float]:
        if self.composer_state is not None:
            self.sampler.set_epoch(int(self.composer_state.timestamp.epoch))  # already the next epoch here
        return {}

    def missing_index_help(self, index_key: str | int) -> str:
        return ". Wrap the dataset in irdro_sampler.IndexedDataset (adds 'sample_idx') or set IRDRO(index_key=...)"

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Inside a ``CheckpointSaver`` save (a collective): every rank writes its rows into the checkpoint's
        sidecar; returns the checkpoint entry (``folder``, ``path``, ``feedback_digest``, ``fingerprint``).
        Otherwise writes nothing, warns, and the entry's ``folder`` is None."""
        sampler = self.sampler
        entry: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "folder": None, "path": None,
                                 "feedback_digest": sampler.feedback.digest.hex(), "fingerprint": sampler.fingerprint()}  # fmt: skip
        checkpoint = self._checkpoint_being_saved()
        if checkpoint is None:
            warnings.warn(
                "IRDRO: a state_dict of the ShardedIRDROSampler outside a CheckpointSaver save: its per-rank rows "
                "are not saved with it (checkpoint with the Trainer's save_folder/save_interval, or call "
                "sampler.save(folder) on every rank)",
                stacklevel=2,
            )
            return {ENTRY: entry}
        sidecar = Path(checkpoint + SIDECAR_SUFFIX)
        if sampler.rank == 0:
            self._prune()
            if sidecar.exists():  # an overwritten checkpoint: no stale row files of another world size
                shutil.rmtree(sidecar)
        dist.barrier(group=sampler.group)
        sampler.save(sidecar)
        if sampler.rank == 0:
            self._written.append((Path(checkpoint), sidecar))
        entry.update(folder=sidecar.name, path=str(sidecar.resolve()))
        return {ENTRY: entry}

    def _checkpoint_being_saved(self) -> str | None:
        """Rank 0's name of the checkpoint file a ``CheckpointSaver`` is writing now, or None. Every rank
        decides alike (the savers' records are replicated); the name is broadcast only when there is one."""
        state = self.composer_state
        if state is None:
            return None
        name = None
        for saver in _savers(state):
            records = saver.all_saved_checkpoints_to_timestamp
            if not records:
                continue
            key, stamp = next(reversed(records.items()))
            if (key, int(stamp.batch)) not in self._handled and stamp == state.timestamp:
                self._handled.add((key, int(stamp.batch)))
                name = key
                break
        if name is None:
            return None
        from composer.utils import dist as composer_dist

        names = [name]
        composer_dist.broadcast_object_list(names, src=0)
        return str(names[0])

    def _prune(self) -> None:
        """Rank 0: remove the sidecars whose checkpoint file is gone (rotated out by Composer)."""
        keep = []
        for checkpoint, sidecar in self._written:
            if checkpoint.exists():
                keep.append((checkpoint, sidecar))
            else:
                shutil.rmtree(sidecar, ignore_errors=True)
        self._written = keep

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load the rows from the checkpoint's sidecar (a collective). ``ValueError`` on every rank naming
        the missing folder or file, or a sidecar that belongs to another checkpoint; nothing loaded then."""
        entry = state.get(ENTRY)
        if entry is None:
            if "sampler" in state:
                raise ValueError("IRDRO: the checkpoint holds an unsharded IRDROSampler state, but the train "
                                 "DataLoader has a ShardedIRDROSampler; resume with the sampler it was saved with")
            warnings.warn("IRDRO: the checkpoint holds no ShardedIRDROSampler state; the sampler starts fresh",
                          stacklevel=2)
            return
        sampler = self.sampler
        error = ""
        try:
            folder = self._locate(entry)
        except ValueError as e:
            error, folder = str(e), Path()
        error = all_ok(error, sampler.group, "IRDRO")
        if error:
            raise ValueError(error)
        sampler.load(folder)
        if sampler.fingerprint() != entry["fingerprint"]:  # pragma: no cover - the digest check comes first
            raise ValueError(f"{folder}: the loaded sampler's fingerprint differs from the checkpoint's")
        if self.composer_state is not None:
            sampler.set_epoch(int(self.composer_state.timestamp.epoch))

    def _locate(self, entry: Mapping[str, Any]) -> Path:
        """The sidecar of the loaded checkpoint: beside the file Composer loaded, else where it was written."""
        if entry.get("folder") is None:
            raise ValueError("IRDRO: the checkpoint's ShardedIRDROSampler rows were not saved (it was written "
                             "outside a CheckpointSaver save); nothing loaded")
        candidates = []
        loaded = _loaded_file(self.composer_state)
        if loaded is not None:
            candidates.append(loaded.parent / entry["folder"])
        if entry.get("path"):
            candidates.append(Path(entry["path"]))
        for folder in candidates:
            if folder.is_dir():
                check_rows(folder, entry["feedback_digest"], "IRDRO", "the checkpoint")
                return folder
        raise ValueError(f"IRDRO: {candidates[0] if candidates else entry['folder']} is missing (the folder of the "
                         "ShardedIRDROSampler rows saved with this checkpoint); nothing loaded")


def _savers(state: Any) -> list[Any]:
    from composer.callbacks import CheckpointSaver

    return [c for c in getattr(state, "callbacks", ()) if isinstance(c, CheckpointSaver)]


def _loaded_file(state: Any) -> Path | None:
    """The local checkpoint file Composer loaded (``state.load_path`` formatted as Composer formats it for
    rank 0, symlinks resolved), or None (none loaded, or one from an object store)."""
    path = getattr(state, "load_path", None)
    if not path:
        return None
    from composer.utils import parse_uri, partial_format

    scheme, _, local = parse_uri(path)
    if scheme:
        return None
    local = partial_format(local, run_name=state.run_name, rank=0, local_rank=0, node_rank=0)
    return Path(os.path.realpath(local))


def _remove_orphans(state: Any) -> None:
    """Rank 0: remove the sidecars in the savers' folders whose checkpoint file no longer exists."""
    from composer.utils import format_name_with_dist

    for saver in _savers(state):
        folder = Path(format_name_with_dist(saver.folder, state.run_name))
        if not folder.is_dir():
            continue
        for sidecar in folder.glob(f"*{SIDECAR_SUFFIX}"):
            checkpoint = sidecar.with_name(sidecar.name[: -len(SIDECAR_SUFFIX)])
            if sidecar.is_dir() and not checkpoint.exists():
                shutil.rmtree(sidecar, ignore_errors=True)

