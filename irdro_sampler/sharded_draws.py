"""I.i.d. draws of one global batch from masses spread over the ranks of a process group.

Groundwork of the sharded table (issue 17). Each rank holds the masses of its virtual shards
(:mod:`irdro_sampler.virtual_shards`), one :class:`~irdro_sampler.sum_tree.FanoutSumTree` per shard, so a
shard's total and its draws are computed the same way whichever rank owns it. Global batch ``b`` is
drawn in two levels, from streams keyed by the seed, ``b`` and the shard, never by a rank:

1. the shared stream ``(seed, b)`` decides, per position, the uniform floor (probability ``u``) or the
   tilted part, draws the floor's ids uniformly over all N, splits the tilted positions over the
   shards by a multinomial on the shard totals (reduced across ranks: S numbers), and permutes them;
2. the owner of shard ``s`` draws its share from its tree with the stream ``(seed, b, s)``;
3. one sum-reduction of two vectors of the batch's length hands every rank every id and its mass.

So ``p_i = u / N + (1 - u) m_i / sum(m)`` (the unsharded distribution), the global batch is the same
on every rank and for every world size over the same shards, and a step costs O(B log(N / S) / world)
draws per rank plus O(B + S) traffic; no rank touches O(N) data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .sum_tree import FanoutSumTree
from .virtual_shards import VirtualShards


class ShardMasses:
    """The masses of the virtual shards one rank owns, one sum tree per shard."""

    def __init__(self, shards: VirtualShards, rank: int, world_size: int, *, fanout: int = 8) -> None:
        self.shards = shards
        self.owned = shards.shards_of_rank(rank, world_size)
        self.trees: dict[int, FanoutSumTree] = {}
        for s in self.owned:
            start, stop = shards.shard_range(s)
            if stop > start:
                self.trees[s] = FanoutSumTree(stop - start, fanout=fanout)

    def set(self, ids: np.ndarray, mass: np.ndarray) -> None:
        """Set the masses of distinct owned sample ``ids`` (global ids; finite, >= 0)."""
        ids = np.asarray(ids, dtype=np.int64)
        shard = self.shards.shard_of(ids)
        for s in np.unique(shard):
            sel = shard == s
            start = self.shards.shard_range(int(s))[0]
            order = np.argsort(ids[sel], kind="stable")
            self.trees[int(s)].set(ids[sel][order] - start, np.asarray(mass, dtype=np.float64)[sel][order])

    def mass_of(self, ids: np.ndarray) -> np.ndarray:
        """Masses of owned sample ``ids``."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty(ids.size, dtype=np.float64)
        shard = self.shards.shard_of(ids)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.trees[int(s)].leaves()[ids[sel] - self.shards.shard_range(int(s))[0]]
        return out

    def totals(self) -> np.ndarray:
        """A length-S vector with this rank's shard totals (0 elsewhere): sum-reduce it across ranks."""
        out = np.zeros(self.shards.num_shards, dtype=np.float64)
        for s, tree in self.trees.items():
            out[s] = tree.total
        return out


def draw_global_batch(
    masses: ShardMasses, seed: int, b: int, size: int, uniform_mix: float, group: Any = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Global batch ``b`` of ``size`` ids, their masses and the masses' total (a collective).

    Every rank of ``group`` calls it with the same arguments but its own ``masses``; every rank gets
    the same result. The draw probability of a returned id is ``u / N + (1 - u) * mass / total``.
    """
    totals = torch.from_numpy(masses.totals())
    dist.all_reduce(totals, group=group)  # each shard's total comes from its owner alone: exact
    totals_np = totals.numpy()
    total = float(totals_np.sum())
    n = masses.shards.dataset_size
    rng = np.random.default_rng([seed, b])
    if total <= 0 or uniform_mix >= 1.0:
        from_floor = np.ones(size, dtype=bool)
    else:
        from_floor = rng.random(size) < uniform_mix if uniform_mix > 0.0 else np.zeros(size, dtype=bool)
    n_floor = int(np.count_nonzero(from_floor))
    ids = np.zeros(size, dtype=np.int64)
    ids[from_floor] = rng.integers(0, n, size=n_floor)
    n_tilted = size - n_floor
    counts = rng.multinomial(n_tilted, totals_np / total) if n_tilted else np.zeros(totals_np.size, np.int64)
    order = rng.permutation(n_tilted)
    # Each tilted draw is filled in by its shard's owner alone, so a sum over ranks hands it to all.
    tilted = np.zeros(n_tilted, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for s, tree in masses.trees.items():
        c = int(counts[s])
        if c:
            srng = np.random.default_rng([seed, b, s])
            draws = tree.find(srng.random(c) * tree.total) + masses.shards.shard_range(s)[0]
            tilted[offsets[s] : offsets[s] + c] = draws
    tilted_t = torch.from_numpy(tilted)
    dist.all_reduce(tilted_t, group=group)
    ids[~from_floor] = tilted_t.numpy()[order]
    # Every id has one owner, which fills in its mass.
    mine = _owned(masses, ids)
    mass = np.zeros(size, dtype=np.float64)
    mass[mine] = masses.mass_of(ids[mine])
    mass_t = torch.from_numpy(mass)
    dist.all_reduce(mass_t, group=group)
    return ids, mass_t.numpy(), total


def _owned(masses: ShardMasses, ids: np.ndarray) -> np.ndarray:
    shard = masses.shards.shard_of(ids)
    return (shard >= masses.owned.start) & (shard < masses.owned.stop)
