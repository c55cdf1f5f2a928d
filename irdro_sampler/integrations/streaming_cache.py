"""Whether a planned round's shards fit in streaming's ``cache_limit`` on one node.

Weighted rounds can concentrate a node's workers on more distinct shards at once than native epochs
do. A cache smaller than the shards still needed evicts them: streaming then re-downloads them, fails
after its retries, or waits forever for a shard nobody re-downloads. :func:`check_round_cache` refuses
(or warns about) such a round before any worker starts it.
"""

from __future__ import annotations

import warnings

import numpy as np
from streaming import StreamingDataset

from irdro_sampler._warnings import stacklevel_outside_package

__all__ = ["CACHE_CHECKS", "CacheLimitError", "check_round_cache", "working_set_bytes"]

#: Values of ``WeightedStreamingDataset(cache_check=...)``.
CACHE_CHECKS = ("raise", "warn", "off")


class CacheLimitError(ValueError):
    """The round's shard working set does not fit in ``cache_limit`` (streaming would thrash or hang)."""


def _shard_of(sample_offset_per_shard: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.searchsorted(sample_offset_per_shard, ids, side="right") - 1


def working_set_bytes(
    dataset: StreamingDataset, node_plan: np.ndarray, window: int
) -> tuple[int, np.ndarray]:
    """Peak bytes of distinct shards one node needs within any ``window`` consecutive samples per worker.

    ``node_plan`` is one node's slice of streaming's epoch plan, shape (ranks per node, workers per
    rank, batches per worker, batch size), ``-1`` for padding. Each worker reads its samples in order and
    streaming downloads up to ``predownload`` samples ahead, so at per-worker position ``t`` the node
    needs every shard that occurs at a position in ``[t, t + window)`` of any of its workers. Returns the
    peak over ``t`` of the summed persistent shard sizes, and the per-position profile. A cache smaller
    than the peak (plus room for one more download) evicts shards that are still needed: streaming then
    re-downloads them, fails after its retries, or waits forever for a shard nobody re-downloads.
    """
    ranks, workers, batches, bsz = node_plan.shape
    seq = node_plan.reshape(ranks * workers, batches * bsz)
    length = seq.shape[1]
    if length == 0:
        return 0, np.zeros(0, np.int64)
    pos = np.broadcast_to(np.arange(length, dtype=np.int64), seq.shape)
    valid = seq >= 0
    ids, pos = seq[valid], pos[valid]
    if ids.size == 0:
        return 0, np.zeros(length, np.int64)
    shard = _shard_of(dataset.sample_offset_per_shard, ids)
    order = np.lexsort((pos, shard))
    shard, pos = shard[order], pos[order]
    # Occurrence at position p keeps the shard needed for window starts in [p - window + 1, p]; merge
    # the intervals of each shard that touch, then add the shard's size over each merged interval.
    start = np.maximum(pos - window + 1, 0)
    new_run = np.ones(shard.size, bool)
    new_run[1:] = (shard[1:] != shard[:-1]) | (start[1:] > pos[:-1] + 1)
    run_id = np.cumsum(new_run) - 1
    run_start = start[new_run]
    run_end = np.zeros(int(run_id[-1]) + 1, np.int64)
    np.maximum.at(run_end, run_id, pos)
    run_shard = shard[new_run]
    keep_zip = any(s.keep_zip for s in dataset.streams)
    size = np.array([s.get_persistent_size(keep_zip) for s in dataset.shards], np.int64)
    diff = np.zeros(length + 1, np.int64)
    np.add.at(diff, run_start, size[run_shard])
    np.add.at(diff, run_end + 1, -size[run_shard])
    profile = np.cumsum(diff[:-1])
    return int(profile.max()), profile


def check_round_cache(dataset: StreamingDataset, node_plan: np.ndarray, round_idx: int, cache_check: str) -> None:
    """Raise :class:`CacheLimitError` (``cache_check='raise'``) or warn (``'warn'``) when round
    ``round_idx``'s working set on this node (``node_plan``, see :func:`working_set_bytes`), plus room
    for the next download and the streams' indexes, exceeds ``dataset.cache_limit``.

    Nothing to check without a ``cache_limit`` or with ``cache_check='off'``.
    """
    if not dataset.cache_limit or cache_check == "off":
        return
    bsz = int(dataset.batch_size)
    window = int(dataset.predownload or 0) + bsz
    peak, _ = working_set_bytes(dataset, node_plan, window)
    index_bytes = sum(s.get_index_size() for s in dataset.streams)
    headroom = max(s.get_max_size() for s in dataset.shards)
    need = peak + headroom + index_bytes
    if need > int(dataset.cache_limit):
        msg = (
            f"cache_limit={dataset.cache_limit} bytes is too small for round {round_idx}: the node's workers "
            f"need up to {peak} bytes of distinct shards within predownload+batch_size={window} samples "
            f"each, plus {headroom} for the next download and {index_bytes} for the index, i.e. {need} "
            "bytes. Streaming would evict shards that are still needed and thrash or wait forever. "
            "Raise cache_limit, or lower predownload, num_workers or shuffle_block_size "
            "(cache_check='off' disables this check)."
        )
        if cache_check == "raise":
            raise CacheLimitError(msg)
        warnings.warn(msg, stacklevel=stacklevel_outside_package())
