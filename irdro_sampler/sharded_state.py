"""Saving a :class:`~irdro_sampler.sharded_sampler.ShardedIRDROSampler` one file per rank, and loading it
on any number of ranks.

``save(sampler, folder)`` (a collective) writes ``rows-<first>-<stop>.pt`` per rank: the table rows of
ids ``[first, stop)`` it owns (and, for ``draws="balanced"``, the draw scheme's records of those ids:
masses, credit offsets, draw counts, per-shard totals), and ``common.pt`` (rank 0): the options, the
draw scheme's name and replicated state (the balanced clocks), the fitted parameters, the schedule,
the pending feedback, the drawn-batch buffer and the index of the row files. Every file is
written atomically (:func:`~irdro_sampler.saving.save_state`). ``load(sampler, folder)`` (a collective)
checks ``common.pt`` against the sampler (data set size, shard count, seed, global batch: a mismatch is a
``ValueError`` naming the field and the file), then reads only the row files overlapping the rank's own
ids (memory-mapped, so a rank reads about its N / world rows whatever the saving world size) and
commits nothing until every file it needs was read and checked. Since the draws do not depend on the
world size, a run saved on 4 ranks continues on 2 or 8 with the same global batches.

Versions: 1 (i.i.d. draws only, no ``draws`` field: loads as ``draws="iid"``), 2 (``draws``,
``draw_state`` in ``common.pt`` and ``draws`` in each row file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._validation import MAX_LOSS, state_entry, state_int
from .fingerprint import EMPTY_DIGEST
from .loss_table import check_table_state
from .sampler_state import _check_params, _check_records, _check_schedule, pack_records
from .saving import save_state

FORMAT = "irdro_sampler.ShardedIRDROSampler"
VERSION = 2
VERSIONS = (1, 2)  # what load reads
COMMON = "common.pt"
#: The fields of common.pt that must equal the loading sampler's.
MATCHING = ("dataset_size", "num_shards", "seed", "global_batch_size", "num_samples_global", "feedback_delay",
            "refresh_interval")


def save(sampler: Any, folder: str | os.PathLike) -> None:
    """Write ``sampler``'s state into ``folder`` (a collective: every rank calls it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = sampler.table
    rows = {"first": sampler.start, "stop": sampler.stop,
            "table": {**table.state_dict(), "groups": None},  # group ids are rebuilt from the groups callable
            "draws": sampler.scheme.row_state()}
    save_state(rows, folder / f"rows-{sampler.start}-{sampler.stop}.pt")
    dist.barrier(group=sampler.group)
    if sampler.rank == 0:
        save_state(_common(sampler), folder / COMMON)
    dist.barrier(group=sampler.group)


def _common(sampler: Any) -> dict[str, Any]:
    f, params = sampler.feedback, sampler.params
    pend = f.sorted_pending()
    drawn = sampler.drawn.sorted_items()
    world = sampler.world
    return {
        "format": FORMAT, "version": VERSION,
        **{k: _matching_value(sampler, k) for k in MATCHING},
        "epoch": sampler.epoch,
        "draws": sampler.draws, "draw_state": sampler.scheme.common_state(),
        "rule": sampler.rule.config(),
        "params": None if params is None else list(params[:4]),
        "group_threshold": None if params is None or params.group_threshold is None
        else torch.from_numpy(params.group_threshold.copy()),
        "schedule": {**f.schedule(), "last_drawn": sampler.last_drawn, "refresh_block": sampler.refresh_block,
                     "start_batch": sampler.start_batch},
        "feedback_digest": f.digest.hex(),
        "pending": pack_records([(e[0], e[1]) for e in pend], [e[2] for e in pend], [e[3] for e in pend]),
        "drawn": pack_records([(b, 0) for b, _ in drawn], [v[0] for _, v in drawn], [v[1] for _, v in drawn]),
        "row_files": [list(sampler.shards.ids_of_rank(r, world)) for r in range(world)],
    }  # fmt: skip


def _matching_value(sampler: Any, key: str) -> int:
    return {
        "dataset_size": sampler.dataset_size, "num_shards": sampler.shards.num_shards, "seed": sampler.seed,
        "global_batch_size": sampler.layout.global_batch_size,
        "num_samples_global": sampler.layout.num_samples * sampler.world,
        "feedback_delay": sampler.feedback_delay, "refresh_interval": sampler.refresh_interval,
    }[key]  # fmt: skip


def load(sampler: Any, folder: str | os.PathLike) -> None:
    """Restore ``sampler`` from ``folder`` (a collective); ``ValueError`` naming the file and the field on a
    mismatch or a missing file, on every rank (a rank that fails tells the others), ``sampler`` unchanged."""
    error = ""
    try:
        checked = _check(sampler, Path(folder))
    except ValueError as e:
        error = str(e)
    failed = torch.tensor([float(bool(error))])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=sampler.group)
    if failed.item():
        raise ValueError(error or f"{folder}: another rank could not load its part of the sharded state")
    _commit(sampler, *checked)


def _check(sampler: Any, folder: Path) -> tuple:
    """Everything ``load`` needs, read and checked; nothing assigned."""
    where = f"{folder / COMMON}"
    common = _read(folder / COMMON)
    if not isinstance(common, dict) or common.get("format") != FORMAT:
        raise ValueError(f"{where}: not a ShardedIRDROSampler state (missing format marker)")
    if common.get("version") not in VERSIONS:
        raise ValueError(f"{where}: version is {common.get('version')!r}, this library reads {VERSIONS}")
    draws = common.get("draws", "iid")  # version 1: i.i.d. draws
    if draws != sampler.draws:
        raise ValueError(f"{where}: draws is {draws!r} but this sampler has draws={sampler.draws!r}")
    for key in MATCHING:
        saved, mine = state_int(common, key, where, minimum=0), _matching_value(sampler, key)
        if saved != mine:
            raise ValueError(f"{where}: {key} is {saved} but this sampler has {key}={mine}")
    rule = common.get("rule")
    if rule != sampler.rule.config():
        raise ValueError(f"{where}: rule is {rule!r} but this sampler's rule is {sampler.rule.config()!r}")
    rows, parts = _read_rows(folder, common["row_files"], sampler.start, sampler.stop)
    draw_state = sampler.scheme.read_state(common.get("draw_state"), where, parts)
    n = sampler.dataset_size
    sched = _check_schedule(state_entry(common, "schedule", where), sampler.batches_per_epoch)
    pending = _check_records(state_entry(common, "pending", where), f"{where}['pending']", n, -MAX_LOSS, MAX_LOSS)
    drawn = _check_records(state_entry(common, "drawn", where), f"{where}['drawn']", n, 0.0, 1.0 + 1e-9)
    params = _check_params(common["params"], common.get("group_threshold"), sampler.table.groups)
    epoch = state_int(common, "epoch", where, minimum=0)
    digest = common.get("feedback_digest")
    return rows, draw_state, sched, pending, drawn, params, epoch, bytes.fromhex(digest) if digest else EMPTY_DIGEST


def _commit(sampler: Any, rows: dict, draw_state: Any, sched: dict, pending: list, drawn: list, params: Any,
            epoch: int, digest: bytes) -> None:
    for key in ("losses", "counts", "last_step"):
        getattr(sampler.table, key)[:] = rows[key]
    sampler.table.num_seen = int(np.count_nonzero(rows["counts"]))
    sampler.epoch, sampler.start_batch = epoch, sched["start_batch"]
    sampler.feedback.restore(sched, [(k[0], k[1], i, v) for k, i, v in pending], digest)
    sampler.drawn.batches = {k[0]: (i, p) for k, i, p in drawn}
    sampler.last_drawn, sampler.refresh_block, sampler.params = sched["last_drawn"], sched["refresh_block"], params
    # A scheme that saved its own masses (with their credits) takes them; else they follow from the table.
    if not sampler.scheme.load_state(draw_state) and params is not None:
        sampler._rebuild()


def _read(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"{path}: missing (a sharded sampler state needs {COMMON} and every rows-*.pt file)")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _read_rows(folder: Path, ranges: Any, start: int, stop: int) -> tuple[dict[str, np.ndarray], list[tuple[str, Any]]]:
    """The saved rows of ids ``[start, stop)``, from the row files that overlap them, and those files'
    draw-scheme parts ``(file, part)`` in id order."""
    out = {"losses": np.empty(stop - start, np.float32), "counts": np.empty(stop - start, np.uint32),
           "last_step": np.empty(stop - start, np.int32)}
    covered, parts = 0, []
    for first, end in ranges:
        lo, hi = max(first, start), min(end, stop)
        if lo >= hi:
            continue
        path = folder / f"rows-{first}-{end}.pt"
        saved = _read(path)
        table = check_table_state(saved.get("table"), end - first, f"{path}['table']")
        for key in out:
            out[key][lo - start : hi - start] = np.asarray(table[key])[lo - first : hi - first]
        covered += hi - lo
        parts.append((str(path), saved.get("draws")))
    if covered != stop - start:
        raise ValueError(f"{folder / COMMON}: row_files cover {covered} of the {stop - start} rows [{start}, {stop})")
    return out, parts
