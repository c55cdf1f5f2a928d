"""Where each global batch falls: epochs, batches and the ranks' slices (no state, no randomness)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchLayout:
    """An epoch of ``num_samples`` indices per rank in batches of ``batch_size`` (the last may be shorter).

    Global batch ``b = epoch * batches_per_epoch + batch_in_epoch`` holds ``global_size(b)`` indices;
    rank ``r`` takes positions ``[r * n, (r + 1) * n)`` of it, ``n = global_size(b) / num_replicas``.
    """

    num_samples: int
    batch_size: int
    num_replicas: int
    rank: int

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def rank_size(self, b: int) -> int:
        """Indices each rank takes from global batch ``b``."""
        j = b % self.batches_per_epoch
        return min(self.batch_size, self.num_samples - j * self.batch_size)

    def global_size(self, b: int) -> int:
        return self.rank_size(b) * self.num_replicas

    def rank_slice(self, b: int) -> slice:
        n = self.rank_size(b)
        return slice(self.rank * n, (self.rank + 1) * n)
