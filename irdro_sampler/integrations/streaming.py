"""IR-DRO sampling for mosaicml-streaming (``mosaicml-streaming>=0.12,<0.14``).

Two ways in:

* :class:`WeightedStreamingDataset` -- a :class:`streaming.StreamingDataset` whose epochs are *rounds*
  of ``round_size`` samples drawn with replacement, with probability proportional to weights that
  are frozen at the start of the round. Only the per-epoch sample-id planning is replaced
  (``resample_streams``); streaming's partitioning over nodes/ranks/workers, its shuffle, its
  downloading/caching and its ``drop_first`` resumption are used unchanged.
* :func:`as_map_dataset` -- a map-style view of any StreamingDataset (``len`` = number of samples,
  ``view[i]`` = sample ``i`` plus ``sample_idx``) for the core :class:`irdro_sampler.IRDROSampler`,
  which refreshes its weights every step. Random access re-downloads shards when ``cache_limit`` is
  small; see ``docs/streaming.md``.

``import irdro_sampler`` never imports this module; importing this module imports ``streaming``. Every
private name of streaming used here comes from :mod:`irdro_sampler.integrations._streaming_compat`,
which records the streaming versions whose internals were checked.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from streaming import StreamingDataset

from irdro_sampler._validation import state_entry, state_int
from irdro_sampler.carried_rounding import balanced_counts, initial_carry
from irdro_sampler.indexed import IndexedDataset
from irdro_sampler.integrations._streaming_compat import SharedMemory, generate_work, shm_name
from irdro_sampler.sampler import DRAW_SCHEMES, digest_to_int

__all__ = [
    "WeightedStreamingDataset",
    "StreamingMapDataset",
    "as_map_dataset",
    "CacheLimitError",
    "working_set_bytes",
]

# Layout of the int64 header that lives in shared memory next to the weights.
_FROZEN_SLOT = 0  # which of the two weight rows holds the weights frozen for `_FROZEN_ROUND`
_FROZEN_ROUND = 1  # round (= streaming epoch) the frozen row belongs to; -1: nothing frozen yet
_PENDING_SLOT = 2  # which row holds the latest `set_weights` (takes effect at the next round)
_PENDING_VERSION = 3  # number of accepted `set_weights` calls (diagnostics)
_ERROR = 4  # 0, or an error code set by the planner for every worker of the node to raise
_PLANNED_ROUND = 5  # last round planned on this node
_WORKERS_PER_NODE = 6  # workers (processes iterating) per node in the last planned round
_CARRY_ROUND = 7  # round whose starting carry the carry block holds (balanced draws); -1: none yet
_HEADER_LEN = 8
_MAX_WORKERS_PER_NODE = 4096
_ERR_BYTES = 4096

_DONE_FLAG_NAME = "irdro_done"
_NOTHING = object()
_HEADER_NAME = "irdro_hdr"
_WEIGHTS_NAME = "irdro_w"
_CARRY_NAME = "irdro_carry"
_ERRMSG_NAME = "irdro_err"


class CacheLimitError(ValueError):
    """The round's shard working set does not fit in ``cache_limit`` (streaming would thrash or hang)."""


def _unlink_stale(name: str) -> None:
    """Remove a leftover shared memory block of this name (from a crashed run), if any."""
    path = os.path.join("/dev/shm", name)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:  # pragma: no cover - non-Linux: the create below reports the problem
        pass


class _ShmArray:
    """A numpy array in shared memory that pickles by name (DataLoader workers re-attach)."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: Any, create: bool) -> None:
        self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)
        size = max(int(np.prod(self.shape)) * self.dtype.itemsize, 1)
        if create:
            _unlink_stale(name)
            self._shm = SharedMemory(name=name, create=True, size=size, auto_cleanup=True)
        else:
            self._shm = SharedMemory(name=name, create=False, size=size, auto_cleanup=False)

    def numpy(self) -> np.ndarray:
        return np.ndarray(self.shape, dtype=self.dtype, buffer=self._shm.buf)

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype.str}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], state["shape"], state["dtype"], create=False)


def _saved_float64(value: Any) -> np.ndarray:
    """A vector from a state dict (torch tensor or array-like) as float64, bit for bit."""
    return np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value, np.float64)


def _as_weight_vector(weights: Any, num_samples: int) -> np.ndarray:
    """Validate ``weights`` and return them normalized to float64 probabilities (a new array)."""
    if isinstance(weights, torch.Tensor):
        arr = weights.detach().cpu().numpy()
    else:
        try:
            arr = np.asarray(weights)
        except Exception as e:  # noqa: BLE001 - re-raised with the argument named
            raise TypeError(f"weights: expected a 1-D array or tensor of floats, got {type(weights)!r}") from e
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"weights: expected a real-valued array, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != num_samples:
        raise ValueError(
            f"weights: expected shape ({num_samples},) (one weight per sample of the dataset), got {arr.shape}"
        )
    arr = arr.astype(np.float64, copy=True)
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"weights: {int(bad.sum())} entries are NaN or inf (first at index {i}: {arr[i]})")
    neg = arr < 0
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        raise ValueError(f"weights: {int(neg.sum())} entries are negative (first at index {i}: {arr[i]})")
    total = float(arr.sum())
    if not total > 0.0:
        raise ValueError("weights: all weights are zero; at least one sample must have positive weight")
    if not math.isfinite(total):
        raise ValueError("weights: the sum of the weights overflows float64; rescale them")
    arr /= total
    return arr


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


class WeightedStreamingDataset(StreamingDataset):
    """A StreamingDataset whose epochs are IR-DRO rounds of weighted draws with replacement.

    Round ``r`` (= streaming epoch ``r``) consists of ``round_size`` sample ids drawn with replacement
    from the probabilities frozen at its start (uniform until the first ``set_weights``), by one of two
    schemes (``draws``):

    * ``'balanced'`` (default): per-sample counts from :func:`irdro_sampler.carried_rounding.balanced_counts`,
      which carries each sample's undrawn expectation to the next round, so every sample's cumulative
      count stays within two draws of ``round_size * sum_r p_i(r)`` (plus a random phase). Round 0's
      expected counts are ``round_size * p`` as for i.i.d. draws; the variance is far lower, and with
      uniform weights a pass over the data is an epoch without replacement, as in native streaming.
    * ``'iid'``: i.i.d. draws, two-stage for shard locality -- per-shard counts ~ Multinomial(round_size,
      shard masses), then per-sample counts within each shard ~ Multinomial(count, within-shard
      probabilities) -- which is exactly the multinomial of flat i.i.d. draws.

    Each shard's draws form shuffle units (at most a shard's size each, as streaming does for
    upsampling) that streaming's own shuffle (``shuffle_algo``, ``shuffle_block_size``) spreads and
    interleaves, so a batch touches about as few shards as native streaming. The plan is a deterministic
    function of (``seed``, round, frozen weights, and for balanced draws the carry, itself a function of
    ``seed`` and the earlier rounds' frozen weights), so every node's local leader computes bitwise the
    same plan for the whole world.

    Every sample is returned with its global sample id under ``"sample_idx"`` (for loss reporting).

    Args:
        round_size: samples per round (per epoch, over all ranks). Rounded up to a multiple of
            ``num_ranks * batch_size`` (and of the canonical node count) so that streaming's
            partitioner neither repeats nor drops samples; ``strict_round_size=True`` raises instead.
        seed: seed of the weighted draws (default: ``shuffle_seed``).
        draws: ``'balanced'`` (default) or ``'iid'``, see above.
        cache_check: ``'raise'`` (default), ``'warn'`` or ``'off'``: what to do when ``cache_limit`` is
            set and the planned round's shard working set (see :func:`working_set_bytes`) does not fit.
        strict_round_size: refuse a ``round_size`` that needs rounding.
        **streaming_kwargs: passed to :class:`streaming.StreamingDataset`. ``batch_size`` is required
            (per-rank batch size, equal to the DataLoader's); ``batching_method`` must be ``'random'``;
            ``epoch_size``, stream mixing weights (``proportion``/``repeat``/``choose``) and
            ``replication`` are refused (fold mixing into the sample weights instead).

    ``set_weights`` is called from the training loop's main process with identical weights on every
    rank; the weights live in node-local shared memory, so persistent DataLoader workers see them.
    ``state_dict``/``load_state_dict`` carry the frozen and pending weights (and the balanced draws'
    carry) as float64 torch tensors next to streaming's resume block (which is limited to 4 KiB of JSON),
    so a Composer checkpoint carries them.
    """

    def __init__(
        self,
        *,
        round_size: int,
        seed: int | None = None,
        draws: str = "balanced",
        cache_check: str = "raise",
        strict_round_size: bool = False,
        **streaming_kwargs: Any,
    ) -> None:
        if isinstance(round_size, bool) or not isinstance(round_size, (int, np.integer)) or round_size < 1:
            raise ValueError(f"round_size: expected a positive int, got {round_size!r}")
        if draws not in DRAW_SCHEMES:
            raise ValueError(f"draws: expected 'balanced' or 'iid', got {draws!r}")
        if cache_check not in ("raise", "warn", "off"):
            raise ValueError(f"cache_check: expected 'raise', 'warn' or 'off', got {cache_check!r}")
        batching = streaming_kwargs.get("batching_method", "random")
        if batching != "random":
            raise ValueError(
                f"batching_method: WeightedStreamingDataset supports only 'random' (got {batching!r}); the "
                "other methods plan each stream separately and bypass the weighted draws"
            )
        if streaming_kwargs.get("epoch_size") is not None:
            raise ValueError(
                f"epoch_size: not supported (got {streaming_kwargs['epoch_size']!r}); a round of round_size "
                "samples is one epoch"
            )
        if streaming_kwargs.get("replication") not in (None, 1):
            raise ValueError(f"replication: not supported (got {streaming_kwargs['replication']!r})")
        bsz = streaming_kwargs.get("batch_size")
        if isinstance(bsz, bool) or not isinstance(bsz, (int, np.integer)) or bsz < 1:
            raise ValueError(
                f"batch_size: required, the per-rank batch size of the DataLoader (got {bsz!r}); streaming "
                "needs it to partition rounds for exact resumption"
            )
        for stream in streaming_kwargs.get("streams") or ():
            given = {k: getattr(stream, "_" + k, None) for k in ("proportion", "repeat", "choose")}
            given = {k: v for k, v in given.items() if v is not None}
            if given:
                raise ValueError(
                    f"streams: stream mixing weights are not supported by WeightedStreamingDataset (got {given}"
                    f" for {getattr(stream, 'remote', None) or getattr(stream, 'local', None)}); multiply "
                    "them into the sample weights passed to set_weights instead"
                )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed: expected a non-negative int or None, got {seed!r}")

        super().__init__(**streaming_kwargs)

        self.weight_seed = int(self.shuffle_seed if seed is None else seed)
        self.draws = draws
        self.cache_check = cache_check
        world = self._parallel_rank_world
        # The canonical node count streaming will use (it is set lazily, in `_resume`): rows of the partition
        # that are not equally long get padded with repeats, so the round must divide evenly.
        canonical = self.num_canonical_nodes or (
            64 * world.num_nodes if self.shuffle_algo in ("py1s", "py2s") else world.num_nodes
        )
        unit = math.lcm(int(world.num_ranks) * int(self.batch_size), int(canonical))
        requested = int(round_size)
        rounded = -(-requested // unit) * unit
        if rounded != requested:
            msg = (
                f"round_size={requested} is not a multiple of num_ranks x batch_size "
                f"(x canonical nodes) = {unit}; streaming would pad the round by repeating samples"
            )
            if strict_round_size:
                raise ValueError("round_size: " + msg)
            warnings.warn(msg + f"; rounding up to {rounded}", stacklevel=2)
        self.round_size = rounded
        # Streaming partitions `epoch_size` samples per epoch; a round is an epoch.
        self.epoch_size = rounded
        self.length = math.ceil(rounded / world.num_ranks)

        n = int(self.num_samples)
        leader = self._unique_rank_world.is_local_leader
        prefix = self._shm_prefix_int
        names = {k: shm_name(prefix, k) for k in (_HEADER_NAME, _WEIGHTS_NAME, _ERRMSG_NAME, _DONE_FLAG_NAME,
                                                    _CARRY_NAME)}
        carry_len = n if draws == "balanced" else 1
        if leader:
            self._hdr = _ShmArray(names[_HEADER_NAME], (_HEADER_LEN,), np.int64, create=True)
            self._w = _ShmArray(names[_WEIGHTS_NAME], (2, n), np.float64, create=True)
            self._err = _ShmArray(names[_ERRMSG_NAME], (_ERR_BYTES,), np.uint8, create=True)
            self._done = _ShmArray(names[_DONE_FLAG_NAME], (_MAX_WORKERS_PER_NODE,), np.uint8, create=True)
            self._carry = _ShmArray(names[_CARRY_NAME], (carry_len,), np.float64, create=True)
            hdr = self._hdr.numpy()
            hdr[:] = 0
            hdr[_FROZEN_ROUND] = -1
            hdr[_PLANNED_ROUND] = -1
            hdr[_CARRY_ROUND] = -1
            self._w.numpy()[0] = 1.0 / n  # uniform until the first set_weights
        from torch import distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # the local leader created the blocks above
        if not leader:
            self._hdr = _ShmArray(names[_HEADER_NAME], (_HEADER_LEN,), np.int64, create=False)
            self._w = _ShmArray(names[_WEIGHTS_NAME], (2, n), np.float64, create=False)
            self._err = _ShmArray(names[_ERRMSG_NAME], (_ERR_BYTES,), np.uint8, create=False)
            self._done = _ShmArray(names[_DONE_FLAG_NAME], (_MAX_WORKERS_PER_NODE,), np.uint8, create=False)
            self._carry = _ShmArray(names[_CARRY_NAME], (carry_len,), np.float64, create=False)

    # ------------------------------------------------------------------ weights
    def set_weights(self, weights: Any) -> None:
        """Set the sampling weights of the next round (call on every rank with identical weights).

        ``weights``: one non-negative finite weight per sample (numpy array or torch tensor, any real
        dtype; normalized here, so ``DROWeighting.probabilities(table)`` can be passed directly). The
        round already in progress keeps the weights frozen at its start. Invalid weights raise
        ValueError/TypeError and leave the previous weights in place.
        """
        p = _as_weight_vector(weights, int(self.num_samples))
        # Only the node's local leader writes: every rank passes identical weights, and the planner (a
        # process of the local leader rank) reads them at the start of the next round.
        if self._unique_rank_world.is_local_leader:
            hdr = self._hdr.numpy()
            target = 1 - int(hdr[_FROZEN_SLOT])  # never overwrite the round in progress
            self._w.numpy()[target] = p
            hdr[_PENDING_SLOT] = target
            hdr[_PENDING_VERSION] += 1

    def fingerprint(self) -> int:
        """A signed 64-bit digest of what decides the next plans: seed, round size, draws, the frozen
        round and the frozen and pending weights (O(N)). Equal on ranks that agree; the Composer IRDRO
        algorithm compares it across ranks."""
        hdr = self._hdr.numpy()
        w = self._w.numpy()
        head = (int(self.num_samples), int(self.round_size), int(self.weight_seed), self.draws, int(hdr[_FROZEN_ROUND]))
        data = repr(head).encode() + w[int(hdr[_FROZEN_SLOT])].tobytes() + w[int(hdr[_PENDING_SLOT])].tobytes()
        return digest_to_int(data)

    def pending_weights(self) -> np.ndarray:
        """The probabilities the next round will use (a copy)."""
        hdr = self._hdr.numpy()
        return self._w.numpy()[int(hdr[_PENDING_SLOT])].copy()

    def round_weights(self, round_idx: int) -> np.ndarray:
        """The probabilities of round ``round_idx``: frozen ones if that round was planned, else pending."""
        hdr = self._hdr.numpy()
        slot = int(hdr[_FROZEN_SLOT]) if int(hdr[_FROZEN_ROUND]) == round_idx else int(hdr[_PENDING_SLOT])
        return self._w.numpy()[slot].copy()

    def draw_probabilities(self, sample_ids: Any) -> np.ndarray:
        """Probabilities (float64) that the round in progress drew ``sample_ids`` from: its frozen weights.

        A round holds sample ``i`` ``round_size * p_i`` times in expectation (i.i.d. draws exactly;
        balanced draws over their seeded phase), so ``1 / (num_samples * p_i)`` are importance weights
        for the uniform (ERM) objective. Reads only the requested entries (no O(N) copy per batch).
        """
        hdr = self._hdr.numpy()
        if int(hdr[_FROZEN_ROUND]) < 0:
            raise RuntimeError("draw_probabilities: no round has been planned yet (iterate the dataset first)")
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        n = int(self.num_samples)
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise IndexError(f"sample_ids: out of range for a dataset of {n} samples (got {ids.min()}..{ids.max()})")
        return self._w.numpy()[int(hdr[_FROZEN_SLOT])][ids]

    def round_carry(self, round_idx: int) -> np.ndarray:
        """The balanced draws' carry at the start of round ``round_idx`` (a copy).

        Known for the round the stored carry belongs to, the round after it (advanced by that round's
        frozen weights) and, before any round was planned, any round (the seeded initial phases).
        """
        hdr = self._hdr.numpy()
        have, frozen = int(hdr[_CARRY_ROUND]), int(hdr[_FROZEN_ROUND])
        if have == -1:
            return initial_carry(int(self.num_samples), self.weight_seed)
        if have == round_idx:
            return self._carry.numpy().copy()
        if have == round_idx - 1 and frozen == have:
            p = self._w.numpy()[int(hdr[_FROZEN_SLOT])]
            return balanced_counts(self._carry.numpy(), p, self.round_size)[1]
        raise RuntimeError(
            f"round {round_idx}: the balanced draws' carry is known for round {have} only (rounds must be "
            "planned in order; resume from a checkpoint of this run to jump)"
        )

    def _freeze(self, round_idx: int) -> None:
        hdr = self._hdr.numpy()
        if int(hdr[_FROZEN_ROUND]) != round_idx:
            if self.draws == "balanced" and int(hdr[_CARRY_ROUND]) != round_idx:
                # Advance the carry with the weights of the round that ended, before they are replaced.
                self._carry.numpy()[:] = self.round_carry(round_idx)
                hdr[_CARRY_ROUND] = round_idx
            hdr[_FROZEN_SLOT] = hdr[_PENDING_SLOT]
            hdr[_FROZEN_ROUND] = round_idx

    # ------------------------------------------------------------------ planning
    def plan_round(
        self, p: np.ndarray, round_idx: int, carry: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw round ``round_idx`` from probabilities ``p``: ``(shuffle_units, small_per_big)``.

        Deterministic in (``seed``, ``round_idx``, ``p``) for i.i.d. draws, in (``p``, ``carry``) for
        balanced ones (``carry`` defaults to :meth:`round_carry`). ``small_per_big`` holds ``round_size``
        sample ids grouped by shard (sorted within a shard); ``shuffle_units`` are the sizes of the runs.
        """
        offsets = np.asarray(self.sample_offset_per_shard, np.int64)
        sizes = np.asarray(self.samples_per_shard, np.int64)
        ends = offsets + sizes
        if self.draws == "balanced":
            counts = balanced_counts(self.round_carry(round_idx) if carry is None else carry, p, self.round_size)[0]
            ids = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
            cum = np.concatenate([[0], np.cumsum(counts)])
            return self._shard_units(cum[ends] - cum[offsets], sizes), ids
        return self._plan_iid(p, round_idx, offsets, sizes, ends)

    def _plan_iid(self, p: np.ndarray, round_idx: int, offsets: np.ndarray, sizes: np.ndarray,
                  ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.weight_seed, int(round_idx), 0x1D20])
        # Stage 1: per-shard counts ~ Multinomial(round_size, shard masses). The masses are differences of
        # the cumulative sum used in stage 2, so a shard that gets draws always has a non-empty range.
        cdf = np.cumsum(p)
        lo = np.where(offsets > 0, cdf[np.maximum(offsets - 1, 0)], 0.0)
        hi = np.where(sizes > 0, cdf[np.maximum(ends - 1, 0)], lo)
        mass = np.maximum(hi - lo, 0.0)
        shard_counts = rng.multinomial(self.round_size, mass / mass.sum())
        # Stage 2: within each shard, i.i.d. draws proportional to p, by inverting the CDF: a draw of shard s
        # is u ~ U[C[start-1], C[end-1]) mapped to the sample whose interval [C[i-1], C[i]) holds it. O(N) for
        # the cumulative sum plus O(round_size log N), vectorized over all shards. A sample of probability 0
        # has an empty interval and is never drawn; `u` is kept below the shard's upper edge so a draw cannot
        # leave its shard.
        shard_of_draw = np.repeat(np.arange(len(sizes)), shard_counts)
        d_lo, d_hi = lo[shard_of_draw], hi[shard_of_draw]
        u = d_lo + (d_hi - d_lo) * rng.random(shard_of_draw.size)
        u = np.minimum(np.maximum(u, d_lo), np.nextafter(d_hi, -np.inf))
        # Sorting keeps every draw in its shard's range of u (the ranges are ordered like the shards) and
        # makes the binary searches cache-friendly; the ids come out grouped by shard, ascending.
        u.sort()
        ids = np.searchsorted(cdf, u, side="right").astype(np.int64)
        ids = np.clip(ids, offsets[shard_of_draw], ends[shard_of_draw] - 1)
        return self._shard_units(shard_counts, sizes), ids

    @staticmethod
    def _shard_units(shard_counts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """Shuffle units: each shard's run, split like streaming's upsampling into pieces of at most one
        shard's size so that the shuffle can place them."""
        nz = np.flatnonzero(shard_counts)
        full, rem = np.divmod(shard_counts[nz], sizes[nz])
        pieces = full + (rem > 0)
        units = np.repeat(sizes[nz], pieces)
        last = np.cumsum(pieces) - 1
        units[last[rem > 0]] = rem[rem > 0]
        return units.astype(np.int64)

    def resample_streams(self, epoch: int, stream_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Streaming's per-epoch hook, replaced by the weighted draws of round ``epoch``."""
        if stream_id is not None:
            raise ValueError(f"stream_id: per-stream planning is not supported (got {stream_id!r})")
        return self.plan_round(self.round_weights(epoch), epoch)

    def _fail(self, code: int, message: str) -> None:
        data = message.encode("utf-8")[: _ERR_BYTES - 1]
        err = self._err.numpy()
        err[:] = 0
        err[: len(data)] = np.frombuffer(data, np.uint8)
        self._hdr.numpy()[_ERROR] = code

    def _get_work(self, epoch: int, sample_in_epoch: int) -> np.ndarray:
        # Same protocol as StreamingDataset._get_work (0.12.0 = 0.13.0, see _streaming_compat): the local leader plans the whole world
        # and shares it through shared memory. Added: freezing the round's weights, checking the plan,
        # and reporting a planning error to every worker of the node (raising in the leader alone
        # would leave the others waiting at the barrier forever).
        if not hasattr(self._shared_barrier, "lock"):
            self._shared_barrier.lock = FileLock(self._shared_barrier.filelock_path)
        u_world = self._unique_worker_world
        p_world = self._parallel_worker_world
        if u_world.is_local_leader:
            hdr = self._hdr.numpy()
            hdr[_ERROR] = 0
            self._done.numpy()[:] = 0
            hdr[_PLANNED_ROUND] = epoch
            hdr[_WORKERS_PER_NODE] = u_world.workers_per_node
            self._freeze(epoch)
            try:
                plan = generate_work(self.batching_method, self, p_world, epoch, sample_in_epoch)
                self._check_plan(plan, epoch, sample_in_epoch)
            except CacheLimitError as e:
                self._fail(2, str(e))
                plan = np.full((p_world.num_nodes, p_world.ranks_per_node, p_world.workers_per_rank, 0, 1), -1)
            except Exception as e:  # noqa: BLE001 - every worker re-raises it below
                self._fail(1, f"{type(e).__name__}: {e}")
                plan = np.full((p_world.num_nodes, p_world.ranks_per_node, p_world.workers_per_rank, 0, 1), -1)
            shape_shm, data_shm = self._share_work(plan.astype(np.int64))
            self._shared_barrier(u_world.workers_per_node)
        else:
            self._shared_barrier(u_world.workers_per_node)
            plan, shape_shm, data_shm = self._attach_work()
        code = int(self._hdr.numpy()[_ERROR])
        worker_ids = np.array(plan[p_world.node, p_world.rank_of_node, p_world.worker_of_rank]).flatten()
        self._shared_barrier(u_world.workers_per_node)
        shape_shm.cleanup()
        if data_shm is not None:
            data_shm.cleanup()
        if code:
            raw = bytes(self._err.numpy())
            msg = raw[: raw.find(b"\0") if b"\0" in raw else len(raw)].decode("utf-8", "replace")
            raise (CacheLimitError if code == 2 else RuntimeError)(msg)
        return worker_ids

    def _check_plan(self, plan: np.ndarray, epoch: int, sample_in_epoch: int) -> None:
        got = int((plan >= 0).sum())
        want = self.round_size - int(sample_in_epoch)
        if got != want:
            raise ValueError(
                f"round {epoch}: streaming partitioned {got} samples where {want} remain (round_size="
                f"{self.round_size}, resuming at sample {sample_in_epoch}); the partition would repeat or "
                "drop samples. Use a round_size that is a multiple of num_ranks x batch_size and resume at "
                "a multiple of the global batch size"
            )
        if not self.cache_limit or self.cache_check == "off":
            return
        node = self._unique_worker_world.node
        bsz = int(self.batch_size)
        window = int(self.predownload or 0) + bsz
        peak, _ = working_set_bytes(self, plan[node], window)
        index_bytes = sum(s.get_index_size() for s in self.streams)
        headroom = max(s.get_max_size() for s in self.shards)
        need = peak + headroom + index_bytes
        if need > int(self.cache_limit):
            msg = (
                f"cache_limit={self.cache_limit} bytes is too small for round {epoch}: the node's workers "
                f"need up to {peak} bytes of distinct shards within predownload+batch_size={window} samples "
                f"each, plus {headroom} for the next download and {index_bytes} for the index, i.e. {need} "
                "bytes. Streaming would evict shards that are still needed and thrash or wait forever. "
                "Raise cache_limit, or lower predownload, num_workers or shuffle_block_size "
                "(cache_check='off' disables this check)."
            )
            if self.cache_check == "raise":
                raise CacheLimitError(msg)
            warnings.warn(msg, stacklevel=2)

    # ------------------------------------------------------------------ iteration
    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        """Sample ``sample_id`` (global id) with ``"sample_idx"`` added."""
        sample = super().get_item(sample_id, retry)
        if isinstance(sample, dict):
            sample = dict(sample)
            sample["sample_idx"] = int(sample_id)
        return sample

    def __iter__(self):  # type: ignore[override]
        # Look one sample ahead so this worker can record that it has handed out its whole share of the
        # round *before* yielding the last sample: trainers stop after len(dataloader) batches (Composer
        # uses islice) and never ask for more. state_dict uses the flags to tell "round finished, counter
        # reset by the trainer" from "round started, nothing consumed yet".
        it = super().__iter__()
        prev: Any = _NOTHING
        for sample in it:
            if prev is not _NOTHING:
                yield prev
            prev = sample
        world = self._unique_worker_world
        if world.worker_of_node < _MAX_WORKERS_PER_NODE:
            self._done.numpy()[world.worker_of_node] = 1
        if prev is not _NOTHING:
            yield prev

    def _round_exhausted(self, round_idx: int) -> bool:
        hdr = self._hdr.numpy()
        if int(hdr[_PLANNED_ROUND]) != round_idx:
            return False
        k = int(hdr[_WORKERS_PER_NODE])
        return 0 < k <= _MAX_WORKERS_PER_NODE and bool(self._done.numpy()[:k].all())

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Streaming's resume state plus ``"irdro"``: the round's frozen and pending weights and carry.

        Same arguments as :meth:`streaming.StreamingDataset.state_dict` (Composer passes the samples
        trained in the current epoch and ``from_beginning=True``). When the round has been fully
        iterated and the count is back at 0 (Composer checkpoints after an epoch ends), the state points
        at the start of the next round, so resuming does not replay the finished round. The weights are
        float64 torch tensors (``pending_weights`` is None when equal to the frozen ones); ``carry`` is
        the balanced draws' carry at the start of round ``carry_round`` (None: the initial phases).
        """
        sd = super().state_dict(num_samples, from_beginning)
        epoch = max(int(sd["epoch"]), 0)
        sample_in_epoch = int(sd["sample_in_epoch"])
        if sample_in_epoch == 0 and self.next_epoch == epoch + 1 and self._round_exhausted(epoch):
            epoch += 1
        sd["epoch"], sd["sample_in_epoch"] = epoch, sample_in_epoch
        hdr = self._hdr.numpy().copy()
        w = self._w.numpy()
        frozen_round = int(hdr[_FROZEN_ROUND])
        frozen = None
        if frozen_round == epoch:
            frozen = torch.from_numpy(w[int(hdr[_FROZEN_SLOT])].copy())
        pending = None
        if frozen is None or int(hdr[_PENDING_SLOT]) != int(hdr[_FROZEN_SLOT]):
            pending = torch.from_numpy(w[int(hdr[_PENDING_SLOT])].copy())
        carry, carry_round = None, -1
        if self.draws == "balanced" and int(hdr[_CARRY_ROUND]) != -1:
            carry, carry_round = torch.from_numpy(self.round_carry(epoch)), epoch
        sd["irdro"] = {
            "version": 2,
            "num_samples": int(self.num_samples),
            "round_size": int(self.round_size),
            "seed": int(self.weight_seed),
            "draws": self.draws,
            "frozen_round": frozen_round if frozen is not None else -1,
            "frozen_weights": frozen,
            "pending_weights": pending,
            "carry_round": carry_round,
            "carry": carry,
        }
        return sd

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (call on every rank before iterating, as Composer does).

        Everything is checked first (``ValueError`` naming the entry); a rejected state changes nothing.
        """
        if not isinstance(obj, dict):
            raise TypeError(f"obj: expected the dict returned by state_dict, got {type(obj)!r}")
        obj = dict(obj)
        ir = obj.pop("irdro", None)
        if ir is None:
            raise ValueError(
                "obj: no 'irdro' entry; this state was not saved by WeightedStreamingDataset, so the round "
                "weights cannot be restored"
            )
        n = int(self.num_samples)
        state_int(obj, "epoch", "obj", minimum=0)
        state_int(obj, "sample_in_epoch", "obj", minimum=0, maximum=self.round_size)
        for key in ("num_samples", "round_size", "seed"):
            state_int(ir, key, "obj['irdro']", minimum=0)
        frozen_round = state_int(ir, "frozen_round", "obj['irdro']", minimum=-1)
        carry_round = state_int(ir, "carry_round", "obj['irdro']", minimum=-1) if "carry_round" in ir else -1
        state_entry(ir, "frozen_weights", "obj['irdro']")
        state_entry(ir, "pending_weights", "obj['irdro']")
        if int(ir["num_samples"]) != n:
            raise ValueError(f"obj: saved for a dataset of {ir['num_samples']} samples, this one has {n}")
        if int(ir["round_size"]) != self.round_size or int(ir["seed"]) != self.weight_seed:
            raise ValueError(
                f"obj: saved with round_size={ir['round_size']}, seed={ir['seed']}; this dataset has "
                f"round_size={self.round_size}, seed={self.weight_seed}; exact resumption needs the same"
            )
        saved_draws = ir.get("draws", "iid")  # version 1 knew only i.i.d. draws
        if saved_draws != self.draws:
            raise ValueError(
                f"obj: saved with draws={saved_draws!r}, this dataset has draws={self.draws!r}; exact "
                f"resumption needs the same (construct it with draws={saved_draws!r})"
            )
        carry = ir.get("carry")
        carry_np = None
        if carry is not None:
            if not isinstance(carry, torch.Tensor | np.ndarray):
                raise ValueError(f"obj: 'carry' must be a tensor, got {type(carry).__name__}")
            carry_np = _saved_float64(carry)
            if carry_np.shape != (n,) or not np.isfinite(carry_np).all() or carry_round < 0:
                raise ValueError(f"obj: 'carry' must hold {n} finite values, got shape {carry_np.shape}")
        frozen = ir.get("frozen_weights")
        pending = ir.get("pending_weights")
        frozen_np = None if frozen is None else _as_weight_vector(frozen, n)
        pending_np = None if pending is None else _as_weight_vector(pending, n)
        if frozen_np is None and pending_np is None:
            raise ValueError("obj: the 'irdro' entry holds no weights")
        # Bitwise restore: the vectors were normalized when set; re-normalizing could change the last bit.
        if frozen is not None:
            frozen_np = _saved_float64(frozen)
        if pending is not None:
            pending_np = _saved_float64(pending)
        for name, vec in (("frozen_weights", frozen_np), ("pending_weights", pending_np)):
            if vec is not None and abs(float(vec.sum()) - 1.0) > 1e-9:
                raise ValueError(f"obj: '{name}' must be probabilities summing to 1, got sum {float(vec.sum())!r}")
        super().load_state_dict(obj)
        if self._unique_rank_world.is_local_leader:
            hdr = self._hdr.numpy()
            w = self._w.numpy()
            if frozen_np is not None:
                w[0] = frozen_np
                hdr[_FROZEN_SLOT] = 0
                hdr[_FROZEN_ROUND] = frozen_round
                if pending_np is not None:
                    w[1] = pending_np
                    hdr[_PENDING_SLOT] = 1
                else:
                    hdr[_PENDING_SLOT] = 0
            else:
                # Nothing frozen: the next round planned freezes row 0 (the pending weights).
                w[0] = pending_np
                hdr[_FROZEN_SLOT] = 0
                hdr[_PENDING_SLOT] = 0
                hdr[_FROZEN_ROUND] = -1
            hdr[_PLANNED_ROUND] = -1
            hdr[_ERROR] = 0
            if carry_np is not None:
                self._carry.numpy()[:] = carry_np
                hdr[_CARRY_ROUND] = carry_round
            else:
                hdr[_CARRY_ROUND] = -1


class _StreamingItems:
    """A StreamingDataset's ``get_item`` as a checked sequence (``len`` = number of samples)."""

    def __init__(self, dataset: StreamingDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return int(self.dataset.num_samples)

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(f"index: {i} out of range for a dataset of {len(self)} samples")
        return self.dataset.get_item(i)


class StreamingMapDataset(IndexedDataset):
    """Map-style view of a StreamingDataset: ``len`` = number of samples, ``view[i]`` = sample ``i``.

    The samples carry their index as :class:`~irdro_sampler.IndexedDataset` adds it (dict samples get
    ``index_key``, default ``"sample_idx"``). Reads go through ``StreamingDataset.get_item``, which
    downloads the shard if it is missing (and evicts the coldest shard when ``cache_limit`` is
    reached): random access over many shards with a small ``cache_limit`` re-downloads shards many
    times.
    """

    def __init__(self, dataset: StreamingDataset, index_key: str = "sample_idx") -> None:
        if not isinstance(dataset, StreamingDataset):
            raise TypeError(f"dataset: expected a streaming.StreamingDataset, got {type(dataset)!r}")
        if not isinstance(index_key, str):
            raise TypeError(f"index_key: expected a str, got {type(index_key)!r}")
        super().__init__(_StreamingItems(dataset), index_key)


def as_map_dataset(dataset: StreamingDataset, index_key: str = "sample_idx") -> StreamingMapDataset:
    """Map-style view of ``dataset`` for ``DataLoader(view, sampler=IRDROSampler(view, ...))``."""
    return StreamingMapDataset(dataset, index_key)
