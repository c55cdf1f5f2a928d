"""IR-DRO rounds over mosaicml-streaming with the weights sharded over ranks (issue 17, streaming at scale).

:class:`ShardedWeightedStreamingDataset` is :class:`~irdro_sampler.integrations.streaming.WeightedStreamingDataset`
for data sets whose per-sample rows do not fit on one node. Each rank passes the weights of *its own*
samples only (the ids ``owned_ids`` of its virtual shards, :mod:`irdro_sampler.virtual_shards`); the next
round is planned when every rank calls :meth:`~ShardedWeightedStreamingDataset.set_weights`, by the ranks
together (:func:`irdro_sampler.sharded_rounds.plan_sharded_round`), and each node's leader rank writes
the planned round (``round_size`` ids and probabilities) into the node's shared memory
(:mod:`~irdro_sampler.integrations.streaming_shared_plans`), where streaming's partition, shuffle,
download and ``drop_first`` resumption take it as they do natively. Memory: O(N / world) per rank
(weights and the balanced draws' carry of its shards), O(round_size) per node; no row of length N.

The rounds are a pure function of (``seed``, round, weights) and, for balanced draws, of the carry of the
earlier rounds: the same on any world size (tested on 1, 2 and 4 ranks), and balanced draws are the
unsharded :func:`~irdro_sampler.carried_rounding.balanced_counts` for the same probabilities.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from irdro_sampler.fingerprint import digest_to_int
from irdro_sampler.integrations._streaming_compat import shm_prefix_int, unique_rank_world
from irdro_sampler.integrations.streaming_base import RoundPlannedDataset
from irdro_sampler.integrations.streaming_rounds import shard_units
from irdro_sampler.integrations.streaming_sharded_state import STATE_KEY, read_states, sharded_entry
from irdro_sampler.integrations.streaming_shared_plans import SharedRoundPlans
from irdro_sampler.sharded_rounds import max_over_ranks, plan_sharded_round, world_and_rank
from irdro_sampler.virtual_shards import VirtualShards, default_num_shards

__all__ = ["ShardedWeightedStreamingDataset"]


class ShardedWeightedStreamingDataset(RoundPlannedDataset):
    """A StreamingDataset whose epochs are IR-DRO rounds planned from weights sharded over the ranks.

    Same rounds, draws, options and guards as :class:`~irdro_sampler.integrations.streaming.WeightedStreamingDataset`
    (``round_size``, ``seed``, ``draws``, ``cache_check``, ``strict_round_size``, streaming's keywords), plus:

    Args:
        num_shards: virtual shards over the sample ids (a power of two, fixed for the run; default
            :func:`~irdro_sampler.virtual_shards.default_num_shards`). Rank ``r`` owns ``owned_ids``.
        group: the ``torch.distributed`` process group (default: the world; a single process needs none).

    Construct on every rank (round 0 is planned here, uniform: a collective). Then, once per round,
    every rank calls ``set_weights(w)`` with the weights of its ``owned_ids`` (a collective). Checkpoints:
    each rank saves its own ``state_dict`` (its carry and weights are its own) and loads it back, or, on
    another world size, every rank loads the list of all the saved states and takes its own ids' rows.
    """

    def __init__(self, *, num_shards: int | None = None, group: Any = None, **options: Any) -> None:
        super().__init__(**options)
        n = int(self.num_samples)
        self.group = group
        self.virtual_shards = VirtualShards(n, default_num_shards(n) if num_shards is None else num_shards)
        self.world, self.rank = world_and_rank(group)
        empty = [r for r in range(self.world) if not np.subtract(*self.virtual_shards.ids_of_rank(r, self.world))]
        if empty:
            raise ValueError(f"num_shards={self.virtual_shards.num_shards} leaves rank {empty[0]} of {self.world} no samples "
                             f"of {n}: use at least as many non-empty shards as ranks")
        self.start, self.stop = self.virtual_shards.ids_of_rank(self.rank, self.world)
        # The main process's part of the state: which round the pending plan is for, the carry at its
        # start and after it (balanced draws; None: the seeded phases), and the weights it was planned from.
        self._pending_round = -1
        self._carry_start: np.ndarray | None = None
        self._carry_after: np.ndarray | None = None
        self._weights = np.ones(self.stop - self.start)
        self._plan(0, self._weights, None)

    def __getstate__(self) -> dict[str, Any]:
        """What a DataLoader worker receives: not the main process's rows (O(N / world)) nor the process
        group (workers read planned rounds from shared memory and make no collective)."""
        state = dict(self.__dict__)
        for key in ("group", "_weights", "_carry_start", "_carry_after"):
            state[key] = None
        return state

    def _open_round_state(self, create: bool) -> SharedRoundPlans:
        return SharedRoundPlans(shm_prefix_int(self), self.round_size, create=create)

    @property
    def owned_ids(self) -> tuple[int, int]:
        """The sample ids ``[start, stop)`` whose weights this rank passes to :meth:`set_weights`."""
        return self.start, self.stop

    # ------------------------------------------------------------------ weights and plans
    def set_weights(self, weights: Any = None) -> None:
        """Plan the next round from this rank's weights of ``owned_ids`` (every rank; a collective).

        ``weights``: non-negative finite weights of ids ``owned_ids`` (any scale; normalized over all
        ranks), or None to repeat the last ones. Called during round ``r`` it plans round ``r + 1``;
        called again before that round starts it re-plans it. Bad weights on any rank raise
        ``ValueError`` on every rank and leave the plans as they were.
        """
        self._check_open()
        frozen = int(max_over_ranks(np.array([self._round_state.header.frozen_round]), self.group)[0])
        if frozen >= self._pending_round:  # the pending round has started: plan the one after it
            target, carry = self._pending_round + 1, self._carry_after
        else:
            target, carry = self._pending_round, self._carry_start
        self._plan(target, self._weights if weights is None else weights, carry)

    def _plan(self, round_idx: int, weights: Any, carry: np.ndarray | None) -> None:
        plan = plan_sharded_round(self.draws, weights, self.virtual_shards, seed=self.weight_seed, round_idx=round_idx,
                                  round_size=self.round_size, carry=carry, group=self.group)
        self._pending_round, self._carry_start, self._carry_after = round_idx, carry, plan.carry
        w = weights.detach().cpu().numpy() if isinstance(weights, torch.Tensor) else weights
        self._weights = np.array(w, dtype=np.float64)
        if unique_rank_world(self).is_local_leader:
            self._round_state.set_pending(round_idx, plan.ids, plan.probabilities)

    def round_plan(self, round_idx: int) -> tuple[np.ndarray, np.ndarray]:
        """Round ``round_idx``'s sample ids (ascending) and their probabilities (copies): the round in
        progress or the pending one."""
        state = self._round_state
        hdr = state.header.snapshot()
        if hdr.frozen_round == round_idx:
            slot = hdr.frozen_slot
        elif hdr.pending_round == round_idx:
            slot = hdr.pending_slot
        else:
            raise ValueError(f"round_idx: round {round_idx} is neither in progress ({hdr.frozen_round}) nor planned "
                             f"({hdr.pending_round})")
        ids, p = state.plan(slot)
        return ids.copy(), p.copy()

    def draw_probabilities(self, sample_ids: Any) -> np.ndarray:
        """Probabilities (float64) that the round in progress drew ``sample_ids`` with (ids of that round
        only: the others' weights live on their owners). ``1 / (num_samples * p)`` are importance weights."""
        hdr = self._round_state.header.snapshot()
        if hdr.frozen_round < 0:
            raise RuntimeError("draw_probabilities: no round has been planned yet (iterate the dataset first)")
        ids, p = self._round_state.plan(hdr.frozen_slot)
        q = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        pos = np.minimum(np.searchsorted(ids, q), ids.size - 1)
        missing = ids[pos] != q
        if missing.any():
            raise ValueError(f"sample_ids: {int(missing.sum())} ids were not drawn in round {hdr.frozen_round} "
                             f"(first: {int(q[missing][0])})")
        return p[pos].copy()

    def fingerprint(self) -> int:
        """A signed 64-bit digest of what decides the next batches: options, the frozen and pending rounds. O(round_size)."""
        hdr = self._round_state.header.snapshot()
        head = (int(self.num_samples), self.round_size, self.weight_seed, self.draws, self.virtual_shards.num_shards,
                hdr.frozen_round, hdr.pending_round)
        data = repr(head).encode()
        # In role order (frozen, then pending), not slot order: a restored state may hold them swapped.
        for slot in dict.fromkeys([hdr.frozen_slot if hdr.frozen_round >= 0 else hdr.pending_slot, hdr.pending_slot]):
            ids, p = self._round_state.plan(slot)
            data += ids.tobytes() + p.tobytes()
        return digest_to_int(data)

    # ------------------------------------------------------------------ planning (the node's planner)
    def resample_streams(self, epoch: int, stream_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Streaming's per-epoch hook: the frozen plan of round ``epoch`` as ``(shuffle_units, ids)``."""
        if stream_id is not None:
            raise ValueError(f"stream_id: per-stream planning is not supported (got {stream_id!r})")
        ids = self._round_state.frozen_plan(epoch)[0].copy()
        offsets = np.asarray(self.sample_offset_per_shard, np.int64)
        sizes = np.asarray(self.samples_per_shard, np.int64)
        counts = np.searchsorted(ids, offsets + sizes) - np.searchsorted(ids, offsets)
        return shard_units(counts, sizes), ids

    # ------------------------------------------------------------------ checkpoints
    def _identity(self) -> dict[str, Any]:
        return {"num_samples": int(self.num_samples), "round_size": self.round_size, "seed": self.weight_seed,
                "draws": self.draws, "num_shards": self.virtual_shards.num_shards}

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Streaming's resume state plus ``"irdro_sharded"`` (:mod:`.streaming_sharded_state`): the frozen
        and pending planned rounds, and this rank's carry and weights (O(N / world) + O(round_size); save
        one per rank)."""
        self._check_open()
        sd = self._resume_point(num_samples, from_beginning)
        hdr = self._round_state.header.snapshot()

        def planned(slot: int, round_idx: int) -> tuple | None:
            return None if round_idx < 0 else (round_idx, *self._round_state.plan(slot))

        pending = planned(hdr.pending_slot, hdr.pending_round) if hdr.pending_round != hdr.frozen_round else None
        rows = {"carry_start": self._carry_start, "carry_after": self._carry_after, "weights": self._weights}
        sd[STATE_KEY] = {**sharded_entry(self._identity(), self.start, self.stop,
                                         planned(hdr.frozen_slot, hdr.frozen_round), pending, rows),
                         "world_size": self.world, "rank": self.rank}
        return sd

    def load_state_dict(self, obj: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Restore this rank's :meth:`state_dict`, or cut this rank's rows out of the list of every rank's
        states of a run on another world size (every rank, before iterating). Everything is checked first
        (``ValueError`` naming the state and the field); a rejected state changes nothing."""
        self._check_open()
        streaming_state, saved = read_states(obj, self._identity(), self.start, self.stop)
        super().load_state_dict(streaming_state)
        self._pending_round = (saved.pending or saved.frozen)[0]
        self._carry_start, self._carry_after = saved.carry_start, saved.carry_after
        self._weights = np.ones(self.stop - self.start) if saved.weights is None else saved.weights
        if unique_rank_world(self).is_local_leader:
            self._round_state.restore(saved.frozen, saved.pending)
