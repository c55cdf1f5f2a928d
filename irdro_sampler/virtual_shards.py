"""Virtual shards: which rank owns which samples, independently of how many ranks there are.

The groundwork of a loss table sharded over ranks (issue 17): sample ids are split into a fixed
power-of-two number ``S`` of *virtual shards* (contiguous id ranges of ``ceil(N / S)``, the last ones
shorter or empty), and the shards into contiguous runs, one per rank. ``S`` is chosen once per run and
saved; the world size is not: state kept per shard moves unchanged to whichever rank owns the shard
after an elastic restart (as streaming's canonical nodes do for its partitions). A rank's samples are
one contiguous id range, so its rows are plain slices.

Pure arithmetic, no state and no communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._validation import check_int


@dataclass(frozen=True)
class VirtualShards:
    """``num_shards`` (a power of two) contiguous shards over ``dataset_size`` sample ids."""

    dataset_size: int
    num_shards: int

    def __post_init__(self) -> None:
        check_int(self.dataset_size, "dataset_size", minimum=1)
        n = check_int(self.num_shards, "num_shards", minimum=1)
        if n & (n - 1):
            raise ValueError(f"num_shards must be a power of two, got {n}")

    @property
    def shard_size(self) -> int:
        """Ids per shard (the last non-empty shard may hold fewer, later ones none)."""
        return -(-self.dataset_size // self.num_shards)

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        """The virtual shard of each sample id."""
        return np.asarray(ids, dtype=np.int64) // self.shard_size

    def shard_range(self, shard: int) -> tuple[int, int]:
        """The ids ``[start, stop)`` of ``shard`` (empty beyond the data set)."""
        size = self.shard_size
        start = min(shard * size, self.dataset_size)
        return start, min(start + size, self.dataset_size)

    def shards_of_rank(self, rank: int, world_size: int) -> range:
        """The contiguous run of shards rank ``rank`` of ``world_size`` owns (as even as possible)."""
        world_size = check_int(world_size, "world_size", minimum=1)
        rank = check_int(rank, "rank", minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        return range(rank * self.num_shards // world_size, (rank + 1) * self.num_shards // world_size)

    def ids_of_rank(self, rank: int, world_size: int) -> tuple[int, int]:
        """The contiguous ids ``[start, stop)`` rank ``rank`` owns."""
        shards = self.shards_of_rank(rank, world_size)
        if not shards:
            return (self.dataset_size, self.dataset_size)
        return self.shard_range(shards.start)[0], self.shard_range(shards.stop - 1)[1]

    def owner_of(self, ids: np.ndarray, world_size: int) -> np.ndarray:
        """The rank owning each sample id: the inverse of :meth:`shards_of_rank`."""
        shard = self.shard_of(ids)
        # Rank r owns shards [floor(r S / W), floor((r + 1) S / W)): the owner of s is the largest r with
        # floor(r S / W) <= s, i.e. floor(((s + 1) W - 1) / S).
        return ((shard + 1) * world_size - 1) // self.num_shards


def default_num_shards(dataset_size: int, *, per_shard: int = 1 << 16, least: int = 1 << 8,
                       most: int = 1 << 16) -> int:
    """A power of two giving about ``per_shard`` samples per shard, between ``least`` (fewer for a data set
    smaller than that) and ``most``: enough shards to spread over up to ``least`` ranks at any size and
    thousands at scale, few enough that per-shard totals cost nothing to reduce."""
    n = check_int(dataset_size, "dataset_size", minimum=1)
    want = max(1, -(-n // per_shard))
    return min(most, max(min(least, 1 << (n.bit_length() - 1)), 1 << (want - 1).bit_length()))
