"""Batches drawn but not yet reported as trained: served again on a replay, and their probabilities."""

from __future__ import annotations

import numpy as np


class DrawnBatches:
    """A small buffer ``b -> (indices, probabilities)`` of global batches not yet known to be trained.

    A replay (Composer re-iterates an epoch from its start on resume) is served from here without
    touching any state; ``importance_weights(..., step=b)`` reads the probabilities a batch was drawn
    with. Batches are dropped once feedback for a later step arrived, and once they fall
    ``feedback_delay + 2`` batches behind the newest draw.
    """

    def __init__(self) -> None:
        self.batches: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.stale_replays = 0  # replays of untrained batches no longer buffered

    def get(self, b: int) -> tuple[np.ndarray, np.ndarray] | None:
        return self.batches.get(b)

    def put(self, b: int, drawn: tuple[np.ndarray, np.ndarray], feedback_delay: int) -> None:
        self.batches[b] = drawn
        # Keep only what a restore may need to replay: drawn batches not yet reported as trained.
        for old in [x for x in self.batches if x <= b - feedback_delay - 2]:
            del self.batches[old]

    def forget_trained(self, max_reported_step: int) -> None:
        """Batches before the last reported step have been trained: they will not be replayed."""
        for b in [b for b in self.batches if b < max_reported_step]:
            del self.batches[b]

    def probabilities_of(self, b: int, indices: np.ndarray) -> np.ndarray | None:
        """The probabilities batch ``b`` drew ``indices`` with, or ``None`` (not buffered, or an index it
        did not draw)."""
        if b not in self.batches:
            return None
        drawn, probs = self.batches[b]
        order = np.argsort(drawn, kind="stable")
        pos = np.minimum(np.searchsorted(drawn[order], indices), drawn.size - 1)
        if not (drawn[order][pos] == indices).all():
            return None
        return probs[order][pos]

    def sorted_items(self) -> list[tuple[int, tuple[np.ndarray, np.ndarray]]]:
        return sorted(self.batches.items())
