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

``import irdro_sampler`` never imports this module; importing this module imports ``streaming``. The
dataset's parts live next to it: what every round-planned dataset shares (``streaming_base``), the
shared round state (``streaming_shared``), the round planners
(``streaming_rounds``), the cache check (``streaming_cache``) and the checkpoint entry
(``streaming_state``). Every private name of streaming goes through
:mod:`irdro_sampler.integrations._streaming_compat` (accessor functions and the ``_get_work`` hook),
which records the streaming versions whose internals were checked; ``tests/test_private_names.py``
enforces it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset

from irdro_sampler.fingerprint import digest_to_int
from irdro_sampler.indexed import IndexedDataset
from irdro_sampler.integrations._streaming_compat import shm_prefix_int, unique_rank_world
from irdro_sampler.integrations.streaming_base import RoundPlannedDataset
from irdro_sampler.integrations.streaming_cache import CacheLimitError, working_set_bytes
from irdro_sampler.integrations.streaming_rounds import plan_round
from irdro_sampler.integrations.streaming_shared import SharedRoundState
from irdro_sampler.integrations.streaming_state import (
    RoundIdentity,
    as_weight_vector,
    irdro_entry,
    read_state,
)

__all__ = [
    "WeightedStreamingDataset",
    "StreamingMapDataset",
    "as_map_dataset",
    "CacheLimitError",
    "working_set_bytes",
]


class WeightedStreamingDataset(RoundPlannedDataset):
    """A StreamingDataset whose epochs are IR-DRO rounds of weighted draws with replacement.

    Round ``r`` (= streaming epoch ``r``) consists of ``round_size`` sample ids drawn with replacement
    from the probabilities frozen at its start (uniform until the first ``set_weights``), by one of two
    schemes (``draws``):

    * ``'balanced'`` (default): per-sample counts by carried rounding
      (:func:`irdro_sampler.carried_rounding.balanced_counts`), which carries each sample's undrawn
      expectation to the next round, so every sample's cumulative count stays within two draws of ``round_size * sum_r p_i(r)`` (plus a random phase). Round 0's
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
    def _open_round_state(self, create: bool) -> SharedRoundState:
        return SharedRoundState(
            shm_prefix_int(self),
            int(self.num_samples),
            carried=self.draws == "balanced",
            seed=self.weight_seed,
            round_size=self.round_size,
            create=create,
        )

    def _identity(self) -> RoundIdentity:
        return RoundIdentity(int(self.num_samples), int(self.round_size), int(self.weight_seed), self.draws)

    # ------------------------------------------------------------------ weights
    def set_weights(self, weights: Any) -> None:
        """Set the sampling weights of the next round (call on every rank with identical weights).

        ``weights``: one non-negative finite weight per sample (numpy array or torch tensor, any real
        dtype; normalized here, so ``DROWeighting.probabilities(table)`` can be passed directly). The
        round already in progress keeps the weights frozen at its start. Invalid weights raise
        ValueError/TypeError and leave the previous weights in place.
        """
        self._check_open()
        p = as_weight_vector(weights, int(self.num_samples))
        # Only the node's local leader writes: every rank passes identical weights, and the planner (a
        # process of the local leader rank) reads them at the start of the next round.
        if unique_rank_world(self).is_local_leader:
            self._round_state.set_pending(p)

    def fingerprint(self) -> int:
        """A signed 64-bit digest of what decides the next plans: seed, round size, draws, the frozen
        round and the frozen and pending weights (O(N)). Equal on ranks that agree; the Composer IRDRO
        algorithm compares it across ranks."""
        state = self._round_state
        hdr = state.header
        head = (int(self.num_samples), int(self.round_size), int(self.weight_seed), self.draws, hdr.frozen_round)
        data = (
            repr(head).encode()
            + state.weight_row(hdr.frozen_slot).tobytes()
            + state.weight_row(hdr.pending_slot).tobytes()
        )
        return digest_to_int(data)

    def pending_weights(self) -> np.ndarray:
        """The probabilities the next round will use (a copy)."""
        return self._round_state.weight_row(self._round_state.header.pending_slot).copy()

    def round_weights(self, round_idx: int) -> np.ndarray:
        """The probabilities of round ``round_idx``: frozen ones if that round was planned, else pending."""
        return self._round_state.round_weights(round_idx)

    def draw_probabilities(self, sample_ids: Any) -> np.ndarray:
        """Probabilities (float64) that the round in progress drew ``sample_ids`` from: its frozen weights.

        A round holds sample ``i`` ``round_size * p_i`` times in expectation (i.i.d. draws exactly;
        balanced draws over their seeded phase), so ``1 / (num_samples * p_i)`` are importance weights
        for the uniform (ERM) objective. Reads only the requested entries (no O(N) copy per batch).
        """
        hdr = self._round_state.header
        if hdr.frozen_round < 0:
            raise RuntimeError("draw_probabilities: no round has been planned yet (iterate the dataset first)")
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        n = int(self.num_samples)
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise IndexError(f"sample_ids: out of range for a dataset of {n} samples (got {ids.min()}..{ids.max()})")
        return self._round_state.weight_row(hdr.frozen_slot)[ids]

    def round_carry(self, round_idx: int) -> np.ndarray:
        """The balanced draws' carry at the start of round ``round_idx`` (a copy).

        Known for the round the stored carry belongs to, the round after it (advanced by that round's
        frozen weights) and, before any round was planned, any round (the seeded initial phases).
        """
        return self._round_state.round_carry(round_idx)

    def _freeze(self, round_idx: int) -> None:
        """Freeze the pending weights for ``round_idx`` (what the node's planner does first)."""
        self._round_state.freeze(round_idx)

    # ------------------------------------------------------------------ planning
    def plan_round(
        self, p: np.ndarray, round_idx: int, carry: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw round ``round_idx`` from probabilities ``p``: ``(shuffle_units, small_per_big)``.

        Deterministic in (``seed``, ``round_idx``, ``p``) for i.i.d. draws, in (``p``, ``carry``) for
        balanced ones (``carry`` defaults to :meth:`round_carry`). ``small_per_big`` holds ``round_size``
        sample ids grouped by shard (sorted within a shard); ``shuffle_units`` are the sizes of the runs.
        """
        if self.draws == "balanced" and carry is None:
            carry = self.round_carry(round_idx)
        return plan_round(
            self.draws,
            p,
            seed=self.weight_seed,
            round_idx=round_idx,
            round_size=self.round_size,
            offsets=np.asarray(self.sample_offset_per_shard, np.int64),
            sizes=np.asarray(self.samples_per_shard, np.int64),
            carry=carry,
        )

    def resample_streams(self, epoch: int, stream_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Streaming's per-epoch hook, replaced by the weighted draws of round ``epoch``."""
        if stream_id is not None:
            raise ValueError(f"stream_id: per-stream planning is not supported (got {stream_id!r})")
        return self.plan_round(self.round_weights(epoch), epoch)

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
        self._check_open()
        sd = self._resume_point(num_samples, from_beginning)
        state, epoch = self._round_state, int(sd["epoch"])
        hdr = state.header.snapshot()  # one consistent set of slots while the planner may write
        frozen = None
        if hdr.frozen_round == epoch:
            frozen = torch.from_numpy(state.weight_row(hdr.frozen_slot).copy())
        pending = None
        if frozen is None or hdr.pending_slot != hdr.frozen_slot:
            pending = torch.from_numpy(state.weight_row(hdr.pending_slot).copy())
        carry, carry_round = None, -1
        if self.draws == "balanced" and hdr.carry_round != -1:
            carry, carry_round = torch.from_numpy(self.round_carry(epoch)), epoch
        sd["irdro"] = irdro_entry(self._identity(), hdr.frozen_round, frozen, pending, carry_round, carry)
        return sd

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (call on every rank before iterating, as Composer does).

        Everything is checked first (``ValueError`` naming the entry); a rejected state changes nothing.
        """
        self._check_open()
        streaming_state, saved = read_state(obj, self._identity())
        super().load_state_dict(streaming_state)
        if unique_rank_world(self).is_local_leader:
            self._round_state.restore(saved.frozen, saved.frozen_round, saved.pending, saved.carry, saved.carry_round)


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
