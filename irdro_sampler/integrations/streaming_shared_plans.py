"""The node-local shared rounds of a :class:`ShardedWeightedStreamingDataset`: planned rounds, not weights.

Where :class:`~irdro_sampler.integrations.streaming_shared.SharedRoundState` keeps two rows of
``num_samples`` probabilities, this keeps two *planned rounds* of ``round_size`` sample ids and their
probabilities (frozen: the round in progress; pending: the next one, written by the node's leader
rank when every rank has planned it together). A node's shared memory is O(round_size), whatever N.
"""

from __future__ import annotations

import numpy as np

from irdro_sampler.integrations.streaming_shared import SharedRoundControl

__all__ = ["SharedRoundPlans"]

_IDS_NAME = "irdro_plan_ids"
_PROBS_NAME = "irdro_plan_p"


class SharedRoundPlans(SharedRoundControl):
    """Two planned rounds (ids int64, probabilities float64, ``round_size`` each) over the round control.

    The leader rank's main process writes the pending round (:meth:`set_pending`, :meth:`restore`); the
    node's planner freezes it when the round starts (:meth:`freeze`) and reads it (:meth:`frozen_plan`).
    A round is never written while it is frozen.
    """

    def __init__(self, prefix_int: int, round_size: int, *, create: bool) -> None:
        super().__init__(prefix_int, create=create)
        self.round_size = int(round_size)
        self._ids = self._block(_IDS_NAME, (2, self.round_size), np.int64)
        self._probs = self._block(_PROBS_NAME, (2, self.round_size), np.float64)

    def set_pending(self, round_idx: int, ids: np.ndarray, probabilities: np.ndarray) -> None:
        """Store the plan of ``round_idx`` in the slot the round in progress does not read."""
        hdr = self.header
        target = 1 - hdr.frozen_slot
        self._ids.numpy()[target] = ids
        self._probs.numpy()[target] = probabilities
        hdr.pending_slot = target
        hdr.pending_round = round_idx

    def freeze(self, round_idx: int) -> None:
        """Make the pending plan the round in progress (no-op if ``round_idx`` is already frozen)."""
        hdr = self.header
        if hdr.frozen_round == round_idx:
            return
        if hdr.pending_round != round_idx:
            raise RuntimeError(
                f"round {round_idx} has no plan (planned: round {hdr.pending_round}): a "
                "ShardedWeightedStreamingDataset plans round r + 1 when set_weights is called on every rank "
                "during round r; call set_weights(...) once per round (set_weights(None) repeats the last weights)"
            )
        hdr.frozen_slot = hdr.pending_slot
        hdr.frozen_round = round_idx

    def plan(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Slot ``slot``'s ids and probabilities (views of shared memory)."""
        return self._ids.numpy()[slot], self._probs.numpy()[slot]

    def frozen_plan(self, round_idx: int) -> tuple[np.ndarray, np.ndarray]:
        """The frozen round's ids and probabilities (views); ``RuntimeError`` if ``round_idx`` is not frozen."""
        hdr = self.header
        if hdr.frozen_round != round_idx:
            raise RuntimeError(f"round {round_idx} is not the round in progress (that is round {hdr.frozen_round})")
        return self.plan(hdr.frozen_slot)

    def restore(self, frozen: tuple | None, pending: tuple | None) -> None:
        """Load checked saved plans, each ``(round, ids, probabilities)`` or None; nothing planned afterwards."""
        hdr = self.header
        hdr.frozen_slot, hdr.frozen_round = 0, -1
        if frozen is not None:
            self._ids.numpy()[0], self._probs.numpy()[0] = frozen[1], frozen[2]
            hdr.frozen_round = frozen[0]
        hdr.pending_slot, hdr.pending_round = 0, hdr.frozen_round
        if pending is not None:
            slot = 1 if frozen is not None else 0
            self._ids.numpy()[slot], self._probs.numpy()[slot] = pending[1], pending[2]
            hdr.pending_slot, hdr.pending_round = slot, pending[0]
        hdr.planned_round = -1
        hdr.error = 0
