"""What every round-planned streaming dataset shares: option checks, the round size, the node's planning
protocol with its error reporting, ``sample_idx``, the end-of-round flags and the resume point.

:class:`RoundPlannedDataset` is the base of :class:`~irdro_sampler.integrations.streaming.WeightedStreamingDataset`
(weights replicated in node-local shared memory) and of
:class:`~irdro_sampler.integrations.streaming_sharded.ShardedWeightedStreamingDataset` (weights held by
their owners, rounds planned in the training processes). A subclass provides ``_open_round_state``
(a :class:`~irdro_sampler.integrations.streaming_shared.SharedRoundControl`) and ``resample_streams``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from irdro_sampler import DRAW_SCHEMES
from irdro_sampler._warnings import stacklevel_outside_package
from irdro_sampler.distributed import process_group_up
from irdro_sampler.integrations._streaming_compat import (
    NodePlannedDataset,
    current_iteration,
    parallel_rank_world,
    stop_iteration,
    stream_mixing_options,
    unique_rank_world,
    unique_worker_world,
)
from irdro_sampler.integrations.streaming_cache import CACHE_CHECKS, CacheLimitError, check_round_cache
from irdro_sampler.integrations.streaming_shared import ERROR_CACHE_LIMIT, ERROR_PLANNING, SharedRoundControl

__all__ = ["RoundPlannedDataset"]

_NOTHING = object()


def _check_options(
    round_size: Any, seed: Any, draws: Any, cache_check: Any, streaming_kwargs: dict[str, Any]
) -> None:
    """The constructor's argument checks, before streaming builds anything (``ValueError`` naming the argument)."""
    if isinstance(round_size, bool) or not isinstance(round_size, (int, np.integer)) or round_size < 1:
        raise ValueError(f"round_size: expected a positive int, got {round_size!r}")
    if draws not in DRAW_SCHEMES:
        raise ValueError(f"draws: expected 'balanced' or 'iid', got {draws!r}")
    if cache_check not in CACHE_CHECKS:
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
        given = stream_mixing_options(stream)
        if given:
            raise ValueError(
                f"streams: stream mixing weights are not supported by WeightedStreamingDataset (got {given}"
                f" for {getattr(stream, 'remote', None) or getattr(stream, 'local', None)}); multiply "
                "them into the sample weights passed to set_weights instead"
            )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed: expected a non-negative int or None, got {seed!r}")


def _rounded_round_size(
    requested: int, world: Any, batch_size: int, num_canonical_nodes: int | None, shuffle_algo: str, strict: bool
) -> int:
    """``requested`` rounded up to a multiple of num_ranks x batch_size and of the canonical node count
    (``world``: streaming's parallel rank world); ``strict`` raises instead of rounding with a warning."""
    # The canonical node count streaming will use (it is set lazily, in `_resume`): rows of the partition
    # that are not equally long get padded with repeats, so the round must divide evenly.
    canonical = num_canonical_nodes or (
        64 * world.num_nodes if shuffle_algo in ("py1s", "py2s") else world.num_nodes
    )
    unit = math.lcm(int(world.num_ranks) * int(batch_size), int(canonical))
    rounded = -(-requested // unit) * unit
    if rounded != requested:
        msg = (
            f"round_size={requested} is not a multiple of num_ranks x batch_size "
            f"(x canonical nodes) = {unit}; streaming would pad the round by repeating samples"
        )
        if strict:
            raise ValueError("round_size: " + msg)
        warnings.warn(msg + f"; rounding up to {rounded}", stacklevel=stacklevel_outside_package())
    return rounded


class RoundPlannedDataset(NodePlannedDataset):
    """A StreamingDataset whose epochs are rounds of ``round_size`` planned draws (see the subclasses)."""

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
        _check_options(round_size, seed, draws, cache_check, streaming_kwargs)
        super().__init__(**streaming_kwargs)
        self.weight_seed = int(self.shuffle_seed if seed is None else seed)
        self.draws = draws
        self.cache_check = cache_check
        self.round_size = _rounded_round_size(
            int(round_size), parallel_rank_world(self), int(self.batch_size), self.num_canonical_nodes,
            self.shuffle_algo, strict_round_size,
        )
        # Streaming partitions `epoch_size` samples per epoch; a round is an epoch.
        self.epoch_size = self.round_size
        self.length = math.ceil(self.round_size / parallel_rank_world(self).num_ranks)

        # The node's local leader rank creates the shared blocks; the other ranks attach once it has.
        leader = unique_rank_world(self).is_local_leader
        if leader:
            self._round_state = self._open_round_state(create=True)
        from torch import distributed as dist

        if process_group_up():
            dist.barrier()  # the local leader created the blocks above
        if not leader:
            self._round_state = self._open_round_state(create=False)

    def _open_round_state(self, create: bool) -> SharedRoundControl:
        raise NotImplementedError

    # ------------------------------------------------------------------ releasing the shared memory
    def close(self) -> None:
        """Release this dataset's shared memory now rather than at process exit: the rows its rounds are
        drawn from (for :class:`WeightedStreamingDataset` 24 bytes per sample with the default balanced
        draws: two weight rows and the carry) and the round control.

        Call it on every rank once done with the dataset, after its last epoch and ``state_dict``: the
        node's local leader rank unlinks the blocks and the memory is freed when the last process of the
        node has let go. This process's iteration threads are stopped first. Afterwards the dataset cannot
        be iterated, checkpointed or given weights (a ValueError says so). Idempotent; also the exit of a
        ``with`` block. Streaming's own shared memory of the dataset (its shard and cache bookkeeping) is
        freed at process exit, as for any StreamingDataset.
        """
        iteration = current_iteration(self)
        if iteration is not None:
            stop_iteration(iteration)
        self._round_state.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` released the shared memory."""
        return self._round_state.closed

    def __enter__(self) -> RoundPlannedDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"this {type(self).__name__} was closed (close() released its shared memory): "
                             "build a new one to iterate again")

    def plan_node_work(self, epoch: int, sample_in_epoch: int, world: Any) -> np.ndarray:
        """The node leader's plan of round ``epoch`` (see :class:`NodePlannedDataset`).

        Added to streaming's planning: freezing the round's weights first, and checking the plan (its
        length, and the cache when ``cache_limit`` is set). A planning error is recorded for every
        worker of the node to raise (:meth:`planning_error`) and an empty plan returned: raising in the
        leader alone would leave the others waiting at the barrier forever.
        """
        state = self._round_state
        state.start_round(epoch, unique_worker_world(self).workers_per_node)
        try:
            plan = super().plan_node_work(epoch, sample_in_epoch, world)
            self._check_plan(plan, epoch, sample_in_epoch)
        except CacheLimitError as e:
            state.fail(ERROR_CACHE_LIMIT, str(e))
            plan = np.full((world.num_nodes, world.ranks_per_node, world.workers_per_rank, 0, 1), -1)
        except Exception as e:  # noqa: BLE001 - every worker re-raises it (planning_error)
            state.fail(ERROR_PLANNING, f"{type(e).__name__}: {e}")
            plan = np.full((world.num_nodes, world.ranks_per_node, world.workers_per_rank, 0, 1), -1)
        return plan

    def planning_error(self) -> Exception | None:
        """The error the node's planner recorded for the round (CacheLimitError or RuntimeError), if any."""
        code, message = self._round_state.recorded_error()
        if not code:
            return None
        return (CacheLimitError if code == ERROR_CACHE_LIMIT else RuntimeError)(message)

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
        if self.cache_limit and self.cache_check != "off":
            node_plan = plan[unique_worker_world(self).node]
            check_round_cache(self, node_plan, epoch, self.cache_check)

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
        self._check_open()
        it = super().__iter__()
        prev: Any = _NOTHING
        started = None
        try:
            for sample in it:
                if prev is not _NOTHING:
                    yield prev
                else:
                    started = current_iteration(self)  # the threads this generator's __iter__ started
                prev = sample
            self._round_state.mark_done(unique_worker_world(self).worker_of_node)
            if prev is not _NOTHING:
                yield prev
        finally:
            # Abandoned mid-round (a trainer's batch limit, a loop that breaks): streaming would leave its
            # prepare and ready threads polling, holding the dataset, until the next __iter__.
            it.close()
            if started is not None:
                stop_iteration(started)

    def _resume_point(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Streaming's state, pointing at the next round when this one was handed out completely and the
        count is back at 0 (Composer checkpoints after an epoch ends), so resuming does not replay it."""
        sd = super().state_dict(num_samples, from_beginning)
        epoch = max(int(sd["epoch"]), 0)
        sample_in_epoch = int(sd["sample_in_epoch"])
        if sample_in_epoch == 0 and self.next_epoch == epoch + 1 and self._round_state.round_exhausted(epoch):
            epoch += 1
        sd["epoch"], sd["sample_in_epoch"] = epoch, sample_in_epoch
        return sd
