"""The feedback queue: per-sample losses reported by the training loop, held until their batch is due.

Every record ``(step, seq, indices, losses)`` waits until the sampler draws batch
``step + feedback_delay``; then the due records are handed out in ``(step, seq)`` order, whatever order
they arrived in, and each one extends a running digest. So what the table has learned by batch ``b``
is a function of ``b`` and of the records, not of when they arrived: the first half of the order
contract (:mod:`irdro_sampler.sampler`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validation import check_step, validate_feedback
from .fingerprint import EMPTY_DIGEST, chain_digest

Record = tuple[int, int, np.ndarray, np.ndarray]  # (step, seq, indices int64, losses float64)


class FeedbackQueue:
    """Pending feedback records, their sequence numbers, and the digest of those applied.

    ``applied_through``: feedback of steps ``<= applied_through`` has been handed out (a record that
    arrives for such a step is *late*: handed out at the next :meth:`take_due`, and counted).
    ``max_reported_step``: the largest step reported, i.e. the last batch known to be trained.
    """

    def __init__(self, dataset_size: int) -> None:
        self.dataset_size = int(dataset_size)
        self.pending: list[Record] = []
        self.seq = 0
        self.next_auto_step = 0
        self.applied_through = -1
        self.max_reported_step = -1
        self.digest = EMPTY_DIGEST  # chained over every record handed out
        self.late_feedback = 0
        self.skipped_nonfinite = 0

    def add(self, indices: Any, losses: Any, step: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """Validate and queue one record (``step`` defaults to the previous step + 1).

        Returns the validated ``(indices, losses, skipped)``: non-finite losses are dropped and counted.
        Raises ``ValueError``/``TypeError`` naming the argument, and queues nothing, on bad input.
        """
        idx, val, skipped = validate_feedback(indices, losses, self.dataset_size)
        step = self.next_auto_step if step is None else check_step(step)
        self.skipped_nonfinite += skipped
        if step <= self.applied_through:
            self.late_feedback += 1
        self.pending.append((step, self.seq, idx, val))
        self.seq += 1
        self.next_auto_step = max(self.next_auto_step, step + 1)
        self.max_reported_step = max(self.max_reported_step, step)
        return idx, val, skipped

    def prime(self, indices: Any, losses: Any) -> tuple[Record, int]:
        """Validate losses measured before training (see ``IRDROSampler.prime``) and return them as a record of
        step 0, handed out at once and chained into the digest, with the number of non-finite losses dropped.
        The step counters are left alone: the training loop's own steps (and automatic steps) are unchanged."""
        idx, val, skipped = validate_feedback(indices, losses, self.dataset_size)
        self.skipped_nonfinite += skipped
        record = (0, self.seq, idx, val)
        self.seq += 1
        self.digest = chain_digest(self.digest, 0, idx, val)
        return record, skipped

    def take_due(self, through: float) -> list[Record]:
        """Remove and return the records of steps ``<= through`` in ``(step, seq)`` order; extend the digest."""
        due = [e for e in self.pending if e[0] <= through]
        if not due:
            return due
        self.pending = [e for e in self.pending if e[0] > through]
        due.sort(key=lambda e: (e[0], e[1]))
        for step, _, idx, val in due:
            self.digest = chain_digest(self.digest, step, idx, val)
        return due

    def mark_applied(self, through: int) -> None:
        self.applied_through = max(self.applied_through, through)

    def sorted_pending(self) -> list[Record]:
        return sorted(self.pending, key=lambda e: (e[0], e[1]))

    def schedule(self) -> dict[str, int]:
        """The queue's entries of ``state['schedule']``."""
        return {
            "seq": self.seq,
            "next_auto_step": self.next_auto_step,
            "applied_through": self.applied_through,
            "max_reported_step": self.max_reported_step,
        }

    def restore(self, schedule: dict[str, int], pending: list[Record], digest: bytes) -> None:
        """Take a checked state's queue entries."""
        self.seq = schedule["seq"]
        self.next_auto_step = schedule["next_auto_step"]
        self.applied_through = schedule["applied_through"]
        self.max_reported_step = schedule["max_reported_step"]
        self.pending = pending
        self.digest = digest
