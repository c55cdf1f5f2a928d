"""The rule fitted on a loss table whose rows are spread over the ranks of a process group.

Groundwork of the sharded table (issue 17). :meth:`DROWeighting.fit` calibrates prior, cut thresholds
and temperature on every ``calibration_stride``-th sample (at most ``calibration_size``, 2**20 by
default) and takes the shift (the largest kept loss) over all samples. So a table split into contiguous
id ranges, one per rank in rank order, fits *exactly* as the whole table does: the ranks all-gather
their strided rows (at most ``calibration_size`` losses and group ids in all, independent of N),
max-reduce the number of groups, fit the calibration sample identically, and max-reduce the shift
(two numbers). Per rank: O(N / world) work, O(calibration_size) traffic. No sketch error: every
rank gets the parameters the unsharded fit gives, bit for bit (tested on 2 and 4 gloo ranks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .distributed import process_group_up
from .loss_table import LossTable, count_groups
from .weights import DROWeighting, WeightParams, finish_max_kept, max_kept_parts


def fit_sharded(rule: DROWeighting, table: LossTable, start: int, dataset_size: int, group: Any = None) -> WeightParams:
    """``rule.fit`` of the whole table, from this rank's rows: ids ``[start, start + len(table))``.

    The ranks of ``group`` (default: the world) hold contiguous ranges that cover ``[0, dataset_size)``
    in rank order, all with or all without groups; ``ValueError`` naming the ranges otherwise. A
    collective: every rank of ``group`` must call it with the same ``rule`` and ``dataset_size``.
    """
    _check_ranges(start, len(table), dataset_size, group)
    rule.check_table(table)  # the same table options on every rank: every rank raises or none
    mine = float(table.groups is not None)
    most, least = max_over_ranks(np.array([mine, -mine]), group)
    if most != -least:  # every rank sees the same reduction, so every rank raises
        raise ValueError("fit_sharded: some ranks' tables have groups and others have none")
    stride = rule.calibration_stride(dataset_size)
    first = (-start) % stride  # the first local row whose id is a multiple of the stride
    losses = _all_gather_rows(table.losses[first::stride], group)
    # Group ids travel as int64 (gloo has no uint16 collectives).
    groups = None if table.groups is None else _all_gather_rows(table.groups[first::stride].astype(np.int64), group)
    num_groups = int(max_over_ranks(np.array([count_groups(table.groups)]), group)[0]) if table.groups is not None else 0
    # First losses travel only when the rule gates its cut on them.
    first_losses = _all_gather_rows(table.first_losses[first::stride], group) if rule.reads_first_losses else None
    params = rule.fit_calibration(losses, groups, num_groups=num_groups, prior=table.prior, first=first_losses)
    best, has_unseen = max_kept_parts(table.losses, params, table.groups, first=table.first_losses)
    best, has_unseen = max_over_ranks(np.array([best, float(has_unseen)]), group)
    return params._replace(shift=finish_max_kept(float(best), bool(has_unseen), params.prior))


def _check_ranges(start: int, size: int, dataset_size: int, group: Any) -> None:
    ranges = _all_gather_rows(np.array([start, size], dtype=np.int64), group).reshape(-1, 2)
    stops = np.cumsum(ranges[:, 1])
    if ranges[0, 0] != 0 or stops[-1] != dataset_size or not np.array_equal(ranges[1:, 0], stops[:-1]):
        listing = ", ".join(f"rank {r}: [{a}, {a + n})" for r, (a, n) in enumerate(ranges.tolist()))
        raise ValueError(f"fit_sharded: the ranks' rows must cover [0, {dataset_size}) in rank order; got {listing}")


def _all_gather_rows(rows: np.ndarray, group: Any) -> np.ndarray:
    """The ranks' 1-D ``rows`` concatenated in rank order (any length per rank)."""
    tensor = torch.from_numpy(np.ascontiguousarray(rows))
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([tensor.numel()], dtype=torch.int64), group=group)
    most = max(int(s) for s in sizes)
    padded = torch.zeros(most, dtype=tensor.dtype)
    padded[: tensor.numel()] = tensor
    parts = [torch.empty(most, dtype=tensor.dtype) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(n)] for p, n in zip(parts, sizes, strict=True)]).numpy()


def max_over_ranks(values: np.ndarray, group: Any = None) -> np.ndarray:
    """Element-wise maximum of ``values`` (as float64) over the ranks of ``group``; a float64 copy of
    ``values`` when no process group is up (a single process is the whole world). The one max-reduce of
    the sharded code (the fit, the sampler's queries, the streaming rounds)."""
    tensor = torch.from_numpy(np.array(values, dtype=np.float64))
    if process_group_up():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.numpy()
