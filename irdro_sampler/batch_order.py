"""The order contract: global batch ``b`` as a pure function of (seed, b, applied feedback).

:class:`BatchOrder` answers "which samples does global batch ``b`` hold, and with which
probabilities" for every rank alike. Before drawing ``b`` it applies exactly the feedback of steps
``<= b - feedback_delay`` (the :class:`~irdro_sampler.feedback.FeedbackQueue` hands it out in step
order), refits the rule when ``b`` starts a refresh block (:class:`~irdro_sampler.tilted_masses.TiltedMasses`),
and draws with a random stream keyed by ``(seed, b)`` through the draw scheme. Batches that are
drawn again (replays) come from the :class:`~irdro_sampler.drawn_batches.DrawnBatches` buffer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .drawn_batches import DrawnBatches
from .draws import DrawScheme
from .feedback import FeedbackQueue
from .layout import BatchLayout
from .loss_table import LossTable
from .tilted_masses import TiltedMasses
from .weights import DROWeighting


class BatchOrder:
    """Global batches drawn from ``table`` under ``rule`` through ``scheme``.

    ``last_drawn`` is the newest batch drawn; a batch at or before it that is no longer buffered is
    drawn again from the current weights without changing any state (a *stale replay*, counted).
    A scheme whose batches depend on history has skipped batches drawn first, so a loop that starts
    late gets the batches an uninterrupted run gets.
    """

    def __init__(
        self, table: LossTable, rule: DROWeighting, scheme: DrawScheme, layout: BatchLayout, *,
        seed: int, feedback_delay: int, refresh_interval: int,
    ) -> None:
        self.table, self.rule, self.scheme, self.layout = table, rule, scheme, layout
        self.seed, self.feedback_delay, self.refresh_interval = seed, feedback_delay, refresh_interval
        self.weights = TiltedMasses(table, rule, scheme)
        self.feedback = FeedbackQueue(table.dataset_size)
        self.drawn = DrawnBatches()
        self.last_drawn = -1

    def batch(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Global batch ``b``: the indices of all ranks and their draw probabilities."""
        buffered = self.drawn.get(b)
        if buffered is not None:
            return buffered
        if b <= self.last_drawn:
            if b > self.feedback.max_reported_step:  # not yet trained, yet no longer buffered
                self.drawn.stale_replays += 1
            self.ensure_params()
            return self._draw(b, commit=False)
        if self.scheme.depends_on_history:
            for skipped in range(self.last_drawn + 1, b):
                self.batch(skipped)
        self.advance_to(b)
        out = self._draw(b)
        self.drawn.put(b, out, self.feedback_delay)
        self.last_drawn = b
        return out

    def _draw(self, b: int, *, commit: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Draw global batch ``b``; ``commit=False`` (a stale replay) leaves the scheme's state as it is."""
        rng = np.random.default_rng([self.seed, b])
        out = self.scheme.draw(rng, self.layout.global_size(b), self.rule.uniform_mix, commit=commit)
        return out, self.weights.draw_probabilities(out)

    def advance_to(self, b: int) -> None:
        """Bring the weights to the state batch ``b`` is drawn from (idempotent for the same ``b``)."""
        self.weights.apply(self.feedback.take_due(b - self.feedback_delay))
        self.feedback.mark_applied(b - self.feedback_delay)
        self.weights.refresh_if_due(b, self.refresh_interval)

    def ensure_params(self) -> None:
        """Fit the rule if nothing was drawn yet (the weights the next batch would be drawn from)."""
        if self.weights.params is None:
            self.advance_to(self.last_drawn + 1)

    def prime(self, indices: Any, losses: Any) -> int:
        """Apply losses measured before training now; the first draw fits the rule on them. Only before the
        first batch is drawn. Returns the number of non-finite losses dropped."""
        if self.last_drawn >= 0:
            raise ValueError(f"prime() takes losses measured before training, but batch {self.last_drawn} was "
                             "already drawn: report losses of trained batches with update()")
        record, skipped = self.feedback.prime(indices, losses)
        self.weights.apply([record])
        self.weights.params = None  # fitted at the first draw (and by probabilities()) from the primed table
        return skipped

    def flush(self) -> None:
        """Apply all buffered feedback now, whatever its step."""
        self.ensure_params()
        self.weights.apply(self.feedback.take_due(float("inf")))

    def counters(self) -> dict[str, int]:
        """The event counters (in the order ``stats()`` and the saved state list them)."""
        f, w = self.feedback, self.weights
        return {
            "late_feedback": f.late_feedback, "skipped_nonfinite": f.skipped_nonfinite,
            "stale_replays": self.drawn.stale_replays, "refreshes": w.refreshes, "rebases": w.rebases,
            "remeasured_cut": w.remeasured_cut, "readmitted": w.readmitted,
        }  # fmt: skip

    def restore_counters(self, counters: dict[str, int]) -> None:
        """Take a saved state's counters (missing ones, from older states, start at 0)."""
        self.feedback.late_feedback = counters.get("late_feedback", 0)
        self.feedback.skipped_nonfinite = counters.get("skipped_nonfinite", 0)
        self.drawn.stale_replays = counters.get("stale_replays", 0)
        for key in ("refreshes", "rebases", "remeasured_cut", "readmitted"):
            setattr(self.weights, key, counters.get(key, 0))
