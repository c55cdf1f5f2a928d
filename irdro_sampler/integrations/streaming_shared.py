"""The node-local shared state of a :class:`WeightedStreamingDataset`'s rounds.

Every process of a node that holds the dataset (the training ranks and their DataLoader workers) sees
the same five shared-memory blocks, created by the node's local leader rank and attached by the
others (and re-attached by workers, which receive the dataset pickled):

* the round header (:class:`RoundHeader`): which weight row is frozen for which round, which row
  holds the pending weights, the planner's error code, the last planned round and its worker count,
  and which round the carry belongs to;
* the weights, two rows of ``num_samples`` float64 probabilities (one frozen for the round in
  progress, one taking :meth:`SharedRoundState.set_pending`; a round never reads a row being written);
* the carry of the carried-rounding draws (``num_samples`` float64; one unused entry for i.i.d. draws);
* the planner's error message (UTF-8, NUL-padded);
* one "done" flag per worker of the node (set when a worker has handed out its share of the round).

:class:`SharedRoundState` owns them and is the only code that reads or writes the header. The blocks'
names come from streaming's shared-memory prefix of the dataset, so two datasets never share them.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from irdro_sampler.carried_rounding import balanced_counts, initial_carry
from irdro_sampler.integrations._streaming_compat import SharedMemory, shm_name

__all__ = [
    "ERROR_CACHE_LIMIT", "ERROR_PLANNING", "MAX_WORKERS_PER_NODE", "RoundHeader", "SharedRoundControl", "SharedRoundState",
]

#: Most workers per node whose "done" flags are kept (more still work; the round-end detection then
#: never fires and a checkpoint after a finished round resumes at the round's end, as streaming does).
MAX_WORKERS_PER_NODE = 4096
#: Error codes the planner sets for every worker of the node to raise (0: no error).
ERROR_PLANNING = 1
ERROR_CACHE_LIMIT = 2

_ERR_BYTES = 4096
_HEADER_NAME = "irdro_hdr"
_WEIGHTS_NAME = "irdro_w"
_CARRY_NAME = "irdro_carry"
_ERRMSG_NAME = "irdro_err"
_DONE_FLAG_NAME = "irdro_done"


def _unlink_stale(name: str) -> None:
    """Remove a leftover shared memory block of this name (from a crashed run), if any."""
    path = os.path.join("/dev/shm", name)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:  # pragma: no cover - non-Linux: the create below reports the problem
        pass


class ShmArray:
    """A numpy array in shared memory that pickles by name (DataLoader workers re-attach)."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: Any, create: bool) -> None:
        self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)
        size = max(int(np.prod(self.shape)) * self.dtype.itemsize, 1)
        self._shm: SharedMemory | None
        if create:
            _unlink_stale(name)
            self._shm = SharedMemory(name=name, create=True, size=size, auto_cleanup=True)
        else:
            self._shm = SharedMemory(name=name, create=False, size=size, auto_cleanup=False)

    def numpy(self) -> np.ndarray:
        """A view of the block (writes go to shared memory)."""
        if self._shm is None:
            raise ValueError(f"shared memory block {self.name!r} was released by close(): the dataset holding it "
                             "cannot be used any more")
        return np.ndarray(self.shape, dtype=self.dtype, buffer=self._shm.buf)

    def close(self) -> None:
        """Let go of the block: the process that created it also unlinks its name (the memory is freed once
        every process that attached has let go too); idempotent. Views taken by :meth:`numpy` must be gone."""
        if self._shm is not None:
            shm, self._shm = self._shm, None
            shm.cleanup()  # streaming's: close, and unlink what this process created (again at exit: a no-op)

    @property
    def closed(self) -> bool:
        return self._shm is None

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype.str, "closed": self.closed}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("closed"):  # released before pickling: its name may be gone, do not attach
            self.name, self.shape, self.dtype, self._shm = state["name"], tuple(state["shape"]), np.dtype(state["dtype"]), None
            return
        self.__init__(state["name"], state["shape"], state["dtype"], create=False)


def _header_field(index: int, doc: str) -> property:
    def get(self: RoundHeader) -> int:
        return int(self.values[index])

    def set_(self: RoundHeader, value: int) -> None:
        self.values[index] = value

    return property(get, set_, doc=doc)


class RoundHeader:
    """Named int fields over the int64 header block (or over a snapshot of it).

    A view: assigning a field writes shared memory. :meth:`snapshot` copies the fields so that a
    reader sees one consistent set while the planner may be writing.
    """

    LENGTH = 8

    frozen_slot = _header_field(0, "Weight row frozen for round `frozen_round`.")
    frozen_round = _header_field(1, "Round (= streaming epoch) the frozen row belongs to; -1: nothing frozen yet.")
    pending_slot = _header_field(2, "Weight row holding the latest set_weights (takes effect at the next round).")
    error = _header_field(3, "0, or the error code the planner set for every worker of the node to raise.")
    planned_round = _header_field(4, "Last round planned on this node; -1: none.")
    workers_per_node = _header_field(5, "Workers (processes iterating) per node in the last planned round.")
    carry_round = _header_field(6, "Round whose starting carry the carry block holds; -1: none yet.")
    pending_round = _header_field(7, "Round the pending plan belongs to (sharded rounds); -1: none.")

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def snapshot(self) -> RoundHeader:
        """A copy of the current fields, detached from shared memory."""
        return RoundHeader(self.values.copy())

    def reset(self) -> None:
        """The fresh state: row 0 frozen and pending, nothing frozen, planned or carried yet."""
        self.values[:] = 0
        self.frozen_round = -1
        self.planned_round = -1
        self.carry_round = -1
        self.pending_round = -1


class SharedRoundControl:
    """The blocks every round-planned dataset shares on a node: the header, the planner's error message
    and the workers' "done" flags, and the round bookkeeping over them. Subclasses add the rows their
    rounds are planned from and :meth:`freeze`.

    Construct with ``create=True`` in the node's local leader rank (which also resets the header) and
    with ``create=False`` in the other ranks after it; pickling re-attaches by name.
    """

    def __init__(self, prefix_int: int, *, create: bool) -> None:
        self._prefix_int, self._create = int(prefix_int), bool(create)
        self._header = self._block(_HEADER_NAME, (RoundHeader.LENGTH,), np.int64)
        self._error_message = self._block(_ERRMSG_NAME, (_ERR_BYTES,), np.uint8)
        self._done = self._block(_DONE_FLAG_NAME, (MAX_WORKERS_PER_NODE,), np.uint8)
        if create:
            self.header.reset()

    def _block(self, name: str, shape: tuple[int, ...], dtype: Any) -> ShmArray:
        # One path for the leader (create) and the other ranks (attach): same names, shapes and dtypes.
        return ShmArray(shm_name(self._prefix_int, name), shape, dtype, create=self._create)

    def blocks(self) -> list[ShmArray]:
        """Every shared-memory block this state holds (the subclasses' rows too)."""
        return [v for v in vars(self).values() if isinstance(v, ShmArray)]

    def close(self) -> None:
        """Release every block (:meth:`ShmArray.close`): unlinked by the leader rank that created them."""
        for block in self.blocks():
            block.close()

    @property
    def closed(self) -> bool:
        return all(block.closed for block in self.blocks())

    def freeze(self, round_idx: int) -> None:
        """Fix what round ``round_idx`` is drawn from (the planner's first step)."""
        raise NotImplementedError

    @property
    def header(self) -> RoundHeader:
        """The live header (writes go to shared memory)."""
        return RoundHeader(self._header.numpy())

    # ------------------------------------------------------------------ the planner
    def start_round(self, round_idx: int, workers_per_node: int) -> None:
        """The planner's first step: clear the error and done flags, record the round, freeze its weights."""
        hdr = self.header
        hdr.error = 0
        self._done.numpy()[:] = 0
        hdr.planned_round = round_idx
        hdr.workers_per_node = workers_per_node
        self.freeze(round_idx)

    def fail(self, code: int, message: str) -> None:
        """Record a planning error (``ERROR_*`` code) for every worker of the node to raise."""
        data = message.encode("utf-8")[: _ERR_BYTES - 1]
        err = self._error_message.numpy()
        err[:] = 0
        err[: len(data)] = np.frombuffer(data, np.uint8)
        self.header.error = code

    def recorded_error(self) -> tuple[int, str]:
        """The planner's error code (0: none) and message."""
        code = self.header.error
        if not code:
            return 0, ""
        raw = bytes(self._error_message.numpy())
        return code, raw[: raw.find(b"\0") if b"\0" in raw else len(raw)].decode("utf-8", "replace")

    # ------------------------------------------------------------------ end of round
    def mark_done(self, worker_of_node: int) -> None:
        """Record that worker ``worker_of_node`` has handed out its whole share of the round."""
        if worker_of_node < MAX_WORKERS_PER_NODE:
            self._done.numpy()[worker_of_node] = 1

    def round_exhausted(self, round_idx: int) -> bool:
        """Whether ``round_idx`` was the last planned round and every worker of the node finished it."""
        hdr = self.header
        if hdr.planned_round != round_idx:
            return False
        k = hdr.workers_per_node
        return 0 < k <= MAX_WORKERS_PER_NODE and bool(self._done.numpy()[:k].all())



class SharedRoundState(SharedRoundControl):
    """The replicated weights of :class:`WeightedStreamingDataset`: two rows of ``num_samples``
    probabilities (frozen, pending) and the carried-rounding carry, on top of the round control.

    Only the leader rank and the node's planning worker write: ``set_pending`` and ``restore`` from the
    leader rank's main process, ``start_round``/``fail`` from the planner. ``seed`` and ``round_size``
    are the carried-rounding parameters, used to advance the carry.
    """

    def __init__(
        self, prefix_int: int, num_samples: int, *, carried: bool, seed: int, round_size: int, create: bool
    ) -> None:
        super().__init__(prefix_int, create=create)
        self.num_samples, self.carried = int(num_samples), bool(carried)
        self.seed, self.round_size = int(seed), int(round_size)
        n = self.num_samples
        self._weights = self._block(_WEIGHTS_NAME, (2, n), np.float64)
        self._carry = self._block(_CARRY_NAME, (n if carried else 1,), np.float64)
        if create:
            self._weights.numpy()[0] = 1.0 / n  # uniform until the first set_weights

    # ------------------------------------------------------------------ weights
    def set_pending(self, probabilities: np.ndarray) -> None:
        """Store the next round's probabilities in the row the round in progress does not read."""
        hdr = self.header
        target = 1 - hdr.frozen_slot  # never overwrite the round in progress
        self._weights.numpy()[target] = probabilities
        hdr.pending_slot = target

    def weight_row(self, slot: int) -> np.ndarray:
        """Row ``slot`` of the weights (a view of shared memory)."""
        return self._weights.numpy()[slot]

    def round_weights(self, round_idx: int) -> np.ndarray:
        """The probabilities of ``round_idx`` (a copy): the frozen row if that round was planned, else the pending one."""
        hdr = self.header
        slot = hdr.frozen_slot if hdr.frozen_round == round_idx else hdr.pending_slot
        return self.weight_row(slot).copy()

    # ------------------------------------------------------------------ carried rounding
    def round_carry(self, round_idx: int) -> np.ndarray:
        """The carried-rounding carry at the start of round ``round_idx`` (a copy).

        Known for the round the stored carry belongs to, the round after it (advanced by that round's
        frozen weights) and, before any round was planned, any round (the seeded initial phases).
        """
        hdr = self.header
        have, frozen = hdr.carry_round, hdr.frozen_round
        if have == -1:
            return initial_carry(self.num_samples, self.seed)
        if have == round_idx:
            return self._carry.numpy().copy()
        if have == round_idx - 1 and frozen == have:
            return balanced_counts(self._carry.numpy(), self.weight_row(hdr.frozen_slot), self.round_size)[1]
        raise RuntimeError(
            f"round {round_idx}: the balanced draws' carry is known for round {have} only (rounds must be "
            "planned in order; resume from a checkpoint of this run to jump)"
        )

    def freeze(self, round_idx: int) -> None:
        """Freeze the pending weights for ``round_idx`` (no-op if already frozen), advancing the carry first."""
        hdr = self.header
        if hdr.frozen_round != round_idx:
            if self.carried and hdr.carry_round != round_idx:
                # Advance the carry with the weights of the round that ended, before they are replaced.
                self._carry.numpy()[:] = self.round_carry(round_idx)
                hdr.carry_round = round_idx
            hdr.frozen_slot = hdr.pending_slot
            hdr.frozen_round = round_idx

    # ------------------------------------------------------------------ checkpoints
    def restore(
        self,
        frozen: np.ndarray | None,
        frozen_round: int,
        pending: np.ndarray | None,
        carry: np.ndarray | None,
        carry_round: int,
    ) -> None:
        """Load checked saved weights and carry (leader rank); nothing planned afterwards.

        ``frozen`` goes to row 0 for ``frozen_round`` and ``pending`` (None: same as frozen) to row 1;
        without frozen weights the pending ones go to row 0, which the next planned round freezes.
        """
        hdr = self.header
        w = self._weights.numpy()
        if frozen is not None:
            w[0] = frozen
            hdr.frozen_slot = 0
            hdr.frozen_round = frozen_round
            if pending is not None:
                w[1] = pending
                hdr.pending_slot = 1
            else:
                hdr.pending_slot = 0
        else:
            w[0] = pending
            hdr.frozen_slot = 0
            hdr.pending_slot = 0
            hdr.frozen_round = -1
        hdr.planned_round = -1
        hdr.error = 0
        if carry is not None:
            self._carry.numpy()[:] = carry
            hdr.carry_round = carry_round
        else:
            hdr.carry_round = -1
