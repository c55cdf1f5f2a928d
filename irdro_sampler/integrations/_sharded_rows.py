"""A :class:`~irdro_sampler.sharded_sampler.ShardedIRDROSampler`'s rows in a folder of a trainer's checkpoint:
written by every rank, checked on every rank before anything is loaded (the Hugging Face and Lightning
integrations; Composer's sidecar has its own entry in the checkpoint, :mod:`.composer.sharded_target`, and
shares :func:`check_rows` and :func:`all_ok`).

A *rows folder* is the :mod:`irdro_sampler.sharded_state` layout (``rows-<first>-<stop>.pt`` per rank,
``common.pt``) plus rank 0's :data:`MARKER`: what the trainer needs back (its step) with the feedback
digest and the fingerprint of the saved state, written last (so a folder with a marker is complete).

* :func:`write` (a collective): a folder written again is removed first (no row files of another world
  size are left), then every rank writes its rows, then rank 0 the marker.
* :func:`check` (local, every rank): the marker, ``common.pt`` (its digest must be the marker's) and every
  row file listed in it, present; a ``ValueError`` names the first missing one. Every rank checks every
  row file, so all name the same file.
* :func:`check_rows` (local): the part of :func:`check` Composer's sidecar shares (its marker is the
  checkpoint's own entry).
* :func:`load` (a collective): :func:`check` on every rank, a failure on any rank raised on all with
  nothing loaded; then ``sampler.load`` and the fingerprint compared with the marker's.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from irdro_sampler.saving import save_state
from irdro_sampler.sharded_sampler import ShardedIRDROSampler
from irdro_sampler.sharded_state import COMMON

__all__ = ["MARKER", "all_ok", "check", "check_rows", "load", "write"]

#: Rank 0's file in a rows folder, written last.
MARKER = "trainer.pt"


def all_ok(error: str, group: Any, what: str = "irdro") -> str:
    """A collective: ``""`` if no rank has an ``error``, else this rank's (or a generic) message."""
    failed = torch.tensor([float(bool(error))])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if failed.item():
        return error or f"{what}: another rank could not read its part of the sharded sampler state; nothing loaded"
    return ""


def write(sampler: ShardedIRDROSampler, folder: str | Path, marker: Mapping[str, Any]) -> None:
    """Write ``sampler``'s rows into ``folder`` and rank 0's marker (``marker`` plus ``feedback_digest`` and
    ``fingerprint``). A collective."""
    folder = Path(folder)
    group = sampler.group
    if sampler.rank == 0 and folder.exists():
        shutil.rmtree(folder)
    dist.barrier(group=group)
    sampler.save(folder)
    if sampler.rank == 0:
        save_state({**marker, "feedback_digest": sampler.feedback.digest.hex(), "fingerprint": sampler.fingerprint()},
                   folder / MARKER)
    dist.barrier(group=group)


def check(folder: str | Path, fmt: str, what: str) -> dict[str, Any]:
    """The marker of a complete rows folder of format ``fmt``; ``ValueError`` (prefixed ``what``) naming the
    first missing or foreign file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{what}: {folder} is missing (the ShardedIRDROSampler rows saved with this checkpoint); "
                         "nothing loaded")
    marker = folder / MARKER
    if not marker.is_file():
        raise ValueError(f"{what}: {marker} is missing (the save was interrupted); nothing loaded")
    entry = torch.load(marker, map_location="cpu", weights_only=True)
    if not isinstance(entry, Mapping) or entry.get("format") != fmt:
        raise ValueError(f"{what}: {marker} is not a {fmt} entry; nothing loaded")
    check_rows(folder, entry.get("feedback_digest"), what, str(marker))
    return dict(entry)


def check_rows(folder: Path, feedback_digest: Any, what: str, owner: str) -> None:
    """``folder``'s ``common.pt`` carries ``feedback_digest`` (``owner``'s) and every row file it lists is
    present; else a ``ValueError`` (prefixed ``what``) naming the first missing or foreign file. Every rank
    checks every row file (a rank reads only its own), so all ranks name the same one."""
    common = folder / COMMON
    if not common.is_file():
        raise ValueError(f"{what}: {common} is missing; nothing loaded")
    saved = torch.load(common, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(saved, Mapping) or saved.get("feedback_digest") != feedback_digest:
        raise ValueError(f"{what}: {common} does not belong to {owner} (their feedback digests differ); "
                         "nothing loaded")
    for first, stop in saved.get("row_files", ()):
        rows = folder / f"rows-{first}-{stop}.pt"  # sharded_state's name of a rank's rows
        if not rows.is_file():
            raise ValueError(f"{what}: {rows} is missing (the rows of ids [{first}, {stop}) saved with this "
                             "checkpoint); nothing loaded")


def load(sampler: ShardedIRDROSampler, folder: str | Path, fmt: str, what: str, error: str = "") -> dict[str, Any]:
    """Restore ``sampler`` from ``folder`` (a collective); returns the marker. ``error``: this rank already
    failed to find the folder (raised on every rank). ``ValueError`` on every rank, nothing loaded, if any
    rank fails :func:`check`."""
    entry: dict[str, Any] = {}
    if not error:
        try:
            entry = check(folder, fmt, what)
        except ValueError as e:
            error = str(e)
    error = all_ok(error, sampler.group, what)
    if error:
        raise ValueError(error)
    sampler.load(folder)
    if sampler.fingerprint() != entry["fingerprint"]:
        raise ValueError(f"{what}: the sampler loaded from {folder} has another fingerprint than {Path(folder) / MARKER} "
                         "records (its options differ from the saved run's)")
    return entry
