"""Lightning with the loss table sharded over the ranks: the
:class:`~irdro_sampler.sharded_sampler.ShardedIRDROSampler` side of
:class:`~irdro_sampler.integrations.lightning.IRDROCallback`.

Attach a ``ShardedIRDROSampler`` instead of an ``IRDROSampler`` (``irdro.attach(ShardedIRDROSampler(len(ds),
batch_size, ...))`` in ``train_dataloader()``, under a DDP strategy: it needs the process group, which
Lightning has set up by then). Feedback, metrics and positioning are the callback's own: every rank
passes the gathered feedback of all ranks (the sharded sampler's ``update`` contract, as the unsharded
one's) and applies the rows it owns; ``stats()`` for the ``irdro/*`` metrics is a collective, called by
every rank at the same steps.

**Checkpoints.** Lightning writes rank 0's checkpoint file only, with the callback states of rank 0, so
each rank's rows go into a *rows folder* beside the checkpoints: ``<dir>/irdro-shards/step-<b>-<key>/``
where ``<dir>`` is the first ``ModelCheckpoint``'s ``dirpath`` (else ``trainer.default_root_dir``), ``b`` the
next global batch and ``<key>`` names the sampler state (the last drawn batch and the feedback digest), in
the layout of :mod:`irdro_sampler.integrations._sharded_rows`. The callback's ``state_dict`` (called by
Lightning on every rank while it builds a checkpoint) writes the folder (a collective; a state already
written, e.g. for ``last.ckpt`` and a step file of the same step, is not written again) and returns the
entry rank 0's checkpoint keeps: the folder relative to ``<dir>``, its absolute path, the next batch, the
feedback digest and the fingerprint.

* **Found again** beside the checkpoint file Lightning resumes (``trainer.ckpt_path``, symlinks resolved),
  else at the absolute path recorded. Every rank checks the folder and every file in it before anything is
  loaded: a missing one is a ``ValueError`` naming its path, on every rank, nothing loaded.
* **Removed with the checkpoint.** Rank 0 notes which checkpoint files appeared (or were rewritten) after
  each save of this run and removes a rows folder once no such file that holds it exists any more
  (``ModelCheckpoint``'s ``save_top_k`` rotation removes the file only); checked at each training batch's
  end and at the end of fit. Folders of an earlier run's checkpoints are left alone.
* The folder must be one every rank sees (a shared file system across nodes).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from irdro_sampler.integrations import _sharded_rows
from irdro_sampler.sharded_sampler import ShardedIRDROSampler

__all__ = ["FORMAT", "SHARDS_FOLDER", "RowsFolders", "check_entry", "load", "rows_dir", "save"]

#: The folder, in the checkpoint directory, of the rows folders.
SHARDS_FOLDER = "irdro-shards"
#: The format of the callback's checkpoint entry with a sharded sampler (and of the rows folders' marker).
FORMAT = "irdro_sampler.lightning.sharded"
_VERSION = 1
_WHAT = "IRDROCallback"


def rows_dir(trainer: Any) -> Path:
    """Where the rows folders go: ``<first ModelCheckpoint's dirpath>/irdro-shards`` (the same on every
    rank: Lightning broadcasts it), else ``<trainer.default_root_dir>/irdro-shards``."""
    for callback in getattr(trainer, "checkpoint_callbacks", ()):
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            return Path(dirpath) / SHARDS_FOLDER
    return Path(trainer.default_root_dir) / SHARDS_FOLDER


def save(sampler: ShardedIRDROSampler, trainer: Any, next_batch: int) -> tuple[dict[str, Any], Path]:
    """Write ``sampler``'s rows folder (a collective: every rank, from ``state_dict``); returns the checkpoint
    entry and the folder."""
    digest = sampler.feedback.digest.hex()
    root = rows_dir(trainer)
    folder = root / f"step-{int(next_batch)}-{int(sampler.last_drawn) + 1}-{digest[:16]}"
    written = torch.tensor([0.0])
    if sampler.rank == 0:
        try:
            _sharded_rows.check(folder, FORMAT, _WHAT)
            written[0] = 1.0  # the same state, complete already
        except ValueError:
            pass
    dist.all_reduce(written, op=dist.ReduceOp.MAX, group=sampler.group)  # rank 0's finding, on every rank
    if not written.item():
        _sharded_rows.write(sampler, folder, {"format": FORMAT, "version": _VERSION, "next_batch": int(next_batch)})
    entry = {"format": FORMAT, "version": _VERSION, "next_batch": int(next_batch),
             "folder": f"{SHARDS_FOLDER}/{folder.name}", "path": str(folder.resolve()),
             "feedback_digest": digest, "fingerprint": sampler.fingerprint()}
    return entry, folder


def check_entry(state: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint entry's shape; ``ValueError`` naming the field on a bad one."""
    for key, kinds in (("next_batch", int), ("folder", str), ("path", str), ("feedback_digest", str),
                       ("fingerprint", int)):
        if not isinstance(state.get(key), kinds) or isinstance(state.get(key), bool):
            raise ValueError(f"IRDROCallback.load_state_dict: the sharded sampler entry's {key!r} is {state.get(key)!r}")
    return dict(state)


def load(sampler: ShardedIRDROSampler, trainer: Any, entry: Mapping[str, Any]) -> int:
    """Restore ``sampler`` from the rows folder of ``entry`` (a collective); returns the next global batch.
    ``ValueError`` on every rank naming the missing folder or file; nothing loaded then."""
    candidates = []
    ckpt = getattr(trainer, "ckpt_path", None) if trainer is not None else None
    if ckpt:
        candidates.append(Path(os.path.realpath(ckpt)).parent / entry["folder"])
    candidates.append(Path(entry["path"]))
    folder = next((c for c in candidates if c.is_dir()), candidates[0])
    error = "" if folder.is_dir() else (
        f"{_WHAT}: {folder} is missing (the ShardedIRDROSampler rows saved with this checkpoint"
        + (f"; also not at {candidates[-1]}" if len(candidates) > 1 else "") + "); nothing loaded")
    marker = _sharded_rows.load(sampler, folder, FORMAT, _WHAT, error)
    if marker.get("feedback_digest") != entry["feedback_digest"] or marker.get("next_batch") != entry["next_batch"]:
        raise ValueError(f"{_WHAT}: {folder} belongs to another checkpoint (its feedback digest or next batch "
                         "differs from the checkpoint's)")
    return int(entry["next_batch"])


class RowsFolders:
    """Rank 0's record of the rows folders this run wrote and the checkpoint files that hold each, to remove
    a folder once every such file is gone (see the module docstring)."""

    def __init__(self) -> None:
        self.pending: Path | None = None  # written since the last settle
        self.held: dict[str, tuple[float, Path]] = {}  # checkpoint file -> (its mtime, the folder it holds)
        self.before: dict[str, float] | None = None  # checkpoint files (and mtimes) before this run's first save

    @staticmethod
    def _files(trainer: Any) -> dict[str, float]:
        found = {}
        for callback in getattr(trainer, "checkpoint_callbacks", ()):
            dirpath = getattr(callback, "dirpath", None)
            if dirpath and os.path.isdir(dirpath):
                for entry in os.scandir(dirpath):
                    if entry.name.endswith(".ckpt") and entry.is_file():
                        path = os.path.realpath(entry.path)
                        found[path] = os.stat(path).st_mtime_ns
        return found

    def wrote(self, trainer: Any, folder: Path) -> None:
        if self.before is None:
            self.before = self._files(trainer)
        self.pending = folder

    def settle(self, trainer: Any) -> None:
        """Map the checkpoint files written since the last save to its folder; remove folders none holds."""
        if self.pending is None and not self.held:
            return
        files = self._files(trainer)
        if self.pending is not None:
            for path, mtime in files.items():
                known = self.held.get(path)
                if (known is None or known[0] != mtime) and (self.before or {}).get(path) != mtime:
                    self.held[path] = (mtime, self.pending)
            self.pending = None
        live = {folder for path, (_, folder) in self.held.items() if path in files}
        for path in [p for p in self.held if p not in files]:
            folder = self.held.pop(path)[1]
            if folder not in live:
                shutil.rmtree(folder, ignore_errors=True)
