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

Memory: ``save`` writes the table rows straight from the table's arrays (the row file holds the running
losses as float32 with NaN for unseen samples, the visit counts as uint32 and the last steps as int32:
no copy of the table). ``load`` checks the overlapping rows in chunks of :data:`CHUNK` rows, all files
first, then copies them into the table chunk by chunk, and releases the row file's pages behind each
chunk (``madvise``): its temporaries are bounded by the chunk size, not by N / world. Files written
with the table's ``state_dict`` layout (int64 counts, 0.0 for unseen losses: before this change) load
alike.

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

from ._validation import MAX_LOSS, MAX_STEP, check_fraction, state_entry, state_int
from .fingerprint import EMPTY_DIGEST
from .row_chunks import copy_rows, release_pages, row_chunk
from .sampler_state import _check_params, _check_records, _check_schedule, pack_records, params_state
from .saving import save_state

FORMAT = "irdro_sampler.ShardedIRDROSampler"
VERSION = 3  # 3: row files may hold first losses (cut_learned_ratio; without them they start as the running losses)
VERSIONS = (1, 2, 3)  # what load reads
COMMON = "common.pt"
#: Rows checked and copied at a time by ``load`` (bounds its temporaries: ~30 bytes per row).
CHUNK = 1 << 22
_TABLE_ARRAYS = ("losses", "counts", "last_step")
FIRST_LOSSES = "first_losses"  # in row files from version 3 on
#: The fields of common.pt that must equal the loading sampler's.
MATCHING = ("dataset_size", "num_shards", "seed", "global_batch_size", "num_samples_global", "feedback_delay",
            "refresh_interval")


def save(sampler: Any, folder: str | os.PathLike) -> None:
    """Write ``sampler``'s state into ``folder`` (a collective: every rank calls it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"first": sampler.start, "stop": sampler.stop, "table": _row_table(sampler.table),
            "draws": sampler.scheme.row_state()}
    save_state(rows, folder / f"rows-{sampler.start}-{sampler.stop}.pt")
    # The per-rank transition counters, summed (their total is what stats() reports on any world size).
    transitions = torch.tensor([sampler.remeasured_cut, sampler.readmitted], dtype=torch.int64)
    dist.all_reduce(transitions, group=sampler.group)
    if sampler.rank == 0:
        save_state(_common(sampler, transitions.tolist()), folder / COMMON)
    dist.barrier(group=sampler.group)


def _row_table(table: Any) -> dict[str, Any]:
    """The table's rows as :meth:`LossTable.state_dict` names them, sharing the table's memory (torch.save
    writes them from there: no copy). Unseen losses stay NaN and counts uint32 (``load`` takes both, and
    the state_dict layout); group ids are rebuilt from the ``groups`` callable on load."""
    return {"num_samples": table.dataset_size, "ema": table.ema, "prior": table.prior,
            **{key: torch.from_numpy(getattr(table, key)) for key in _TABLE_ARRAYS},
            **({} if table.first_losses is None else {FIRST_LOSSES: torch.from_numpy(table.first_losses)}),
            "num_skipped": table.num_skipped, "groups": None}


def _common(sampler: Any, transitions: list[int]) -> dict[str, Any]:
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
        **params_state(params),
        "schedule": {**f.schedule(), "last_drawn": sampler.last_drawn, "refresh_block": sampler.refresh_block,
                     "start_batch": sampler.start_batch},
        "feedback_digest": f.digest.hex(),
        "pending": pack_records([(e[0], e[1]) for e in pend], [e[2] for e in pend], [e[3] for e in pend]),
        "drawn": pack_records([(b, 0) for b, _ in drawn], [v[0] for _, v in drawn], [v[1] for _, v in drawn]),
        "row_files": [list(sampler.shards.ids_of_rank(r, world)) for r in range(world)],
        "counters": {"refreshes": sampler.refreshes, "rebases": sampler.rebases,
                     "stale_replays": sampler.drawn.stale_replays, "remeasured_cut": transitions[0],
                     "readmitted": transitions[1]},
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
    params = _check_params(common["params"], common.get("group_threshold"), sampler.table.groups,
                           common.get("tilt_cap"), sampler.rule, common.get("group_split"),
                           common.get("block_valley"))  # the rule (its gates) checked equal above
    epoch = state_int(common, "epoch", where, minimum=0)
    digest = common.get("feedback_digest")
    counters = _check_counters(common.get("counters"), f"{where}['counters']")
    return (rows, draw_state, sched, pending, drawn, params, epoch, bytes.fromhex(digest) if digest else EMPTY_DIGEST,
            counters)


_COUNTERS = ("refreshes", "rebases", "stale_replays", "remeasured_cut", "readmitted")


def _check_counters(counters: Any, where: str) -> dict[str, int]:
    """The saved event counters (files before they were saved: all 0)."""
    if counters is None:
        return dict.fromkeys(_COUNTERS, 0)
    if not isinstance(counters, dict):
        raise ValueError(f"{where}: expected a dict of counters, got {type(counters).__name__}")
    return {key: state_int(counters, key, where, minimum=0) for key in _COUNTERS}


def _commit(sampler: Any, rows: list, draw_state: Any, sched: dict, pending: list, drawn: list, params: Any,
            epoch: int, digest: bytes, counters: dict[str, int]) -> None:
    table = sampler.table
    sampler.refreshes, sampler.rebases = counters["refreshes"], counters["rebases"]
    sampler.drawn.stale_replays = counters["stale_replays"]
    # The transitions' totals go to rank 0 (stats() sums them over ranks, whatever the world size).
    mine = sampler.rank == 0
    sampler.remeasured_cut, sampler.readmitted = (counters["remeasured_cut"], counters["readmitted"]) if mine else (0, 0)
    table.num_seen = copy_rows(table, rows, sampler.start, CHUNK)
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


def _read_rows(folder: Path, ranges: Any, start: int, stop: int) -> tuple[list[tuple], list[tuple[str, Any]]]:
    """The saved rows of ids ``[start, stop)`` as pieces ``(lo, hi, first, arrays)`` (ids ``[lo, hi)`` of
    the file of ids from ``first``; ``arrays`` its memory-mapped tensors), every row checked chunk by
    chunk, and those files' draw-scheme parts ``(file, part)`` in id order. Nothing is copied."""
    covered, pieces, parts = 0, [], []
    for first, end in ranges:
        lo, hi = max(first, start), min(end, stop)
        if lo >= hi:
            continue
        path = folder / f"rows-{first}-{end}.pt"
        saved = _read(path)
        arrays = _check_row_table(saved.get("table"), end - first, f"{path}['table']")
        for a in range(lo - first, hi - first, CHUNK):
            _check_row_chunk(arrays, a, min(a + CHUNK, hi - first), f"{path}['table']")
        pieces.append((lo, hi, first, arrays))
        covered += hi - lo
        parts.append((str(path), saved.get("draws")))
    if covered != stop - start:
        raise ValueError(f"{folder / COMMON}: row_files cover {covered} of the {stop - start} rows [{start}, {stop})")
    return pieces, parts


def _check_row_table(state: Any, n: int, where: str) -> dict[str, torch.Tensor]:
    """The entries of a row file's table that need no pass over the rows: size, ``ema``, ``prior``, and
    the three arrays' kinds and shapes (as :func:`~irdro_sampler.loss_table.check_table_state`)."""
    saved = state_int(state, "num_samples", where, minimum=1)
    if saved != n:
        raise ValueError(f"{where}['num_samples'] is {saved} but the file name promises {n} rows")
    check_fraction(state_entry(state, "ema", where), f"{where}['ema']", low_open=False, high_open=True)
    prior = state_entry(state, "prior", where)
    if prior != "mean" and (isinstance(prior, bool) or not isinstance(prior, (int, float)) or not np.isfinite(prior)):
        raise ValueError(f"{where}['prior'] must be 'mean' or a finite number, got {prior!r}")
    out = {}
    for key in (*_TABLE_ARRAYS, *((FIRST_LOSSES,) if state.get(FIRST_LOSSES) is not None else ())):
        value = state_entry(state, key, where)
        kind = "float" if key in ("losses", FIRST_LOSSES) else "int"
        ok = isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == n and not value.is_complex() \
            and value.dtype != torch.bool and value.is_floating_point() == (kind == "float")
        if not ok:
            got = f"{value.dtype}{tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{where}['{key}'] must be a 1-d {kind} tensor of {n} entries, got {got}")
        out[key] = value
    return out


def _check_row_chunk(arrays: dict[str, torch.Tensor], a: int, z: int, where: str) -> None:
    """Rows ``[a, z)`` of a row file: counts in the uint32 range, last steps in [-1, MAX_STEP], and for seen
    rows (counts > 0) finite float32 losses and steps >= 0. ``ValueError`` naming the row otherwise."""
    losses, counts, last_step = (row_chunk(arrays[key], a, z) for key in _TABLE_ARRAYS)
    _check_where(counts, None, f"{where}['counts']", 0, np.iinfo(np.uint32).max, a)
    _check_where(last_step, None, f"{where}['last_step']", -1, MAX_STEP, a)
    seen = counts > 0
    _check_where(losses, seen, f"{where}['losses'] of seen samples (counts > 0)", -MAX_LOSS, MAX_LOSS, a)
    _check_where(last_step, seen, f"{where}['last_step'] of seen samples (counts > 0)", 0, MAX_STEP, a)
    if FIRST_LOSSES in arrays:
        first = row_chunk(arrays[FIRST_LOSSES], a, z)
        _check_where(first, seen, f"{where}['{FIRST_LOSSES}'] of seen samples (counts > 0)", -MAX_LOSS, MAX_LOSS, a)
    release_pages(*(arrays[key][a:z] for key in arrays))


def _check_where(arr: np.ndarray, mask: np.ndarray | None, name: str, low: float, high: float, offset: int) -> None:
    with np.errstate(invalid="ignore"):
        bad = ~((arr >= low) & (arr <= high))
    if mask is not None:
        bad &= mask
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must lie in [{low:.8g}, {high:.8g}], got {arr[i].item()!r} at position {i + offset}")
