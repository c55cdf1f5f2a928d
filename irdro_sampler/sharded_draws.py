"""I.i.d. draws of one global batch from masses spread over the ranks of a process group.

Each rank holds the masses of its virtual shards (:mod:`irdro_sampler.virtual_shards`) as rows of a
:class:`~irdro_sampler.shard_forest.ShardForest`, so a shard's total and its searches are computed the
same way whichever rank owns it. Global batch ``b`` is drawn in two levels from the shared stream
``(seed, b)``, never from anything about a rank:

1. the shard totals are max-reduced (S numbers, each non-zero on its owner only; the caller may fuse
   this with its own checks, :func:`reduce_totals`);
2. the stream decides, per position, the uniform floor (probability ``u``) or the tilted part, draws
   the floor's ids uniformly over all N, and gives each tilted position a shard (with probability
   proportional to the shard's total, by a search in their cumulative sums) and a fraction in [0, 1);
3. the owner of each tilted position's shard finds the sample at that fraction of the shard's mass
   (one vectorised search over all its positions), and fills in the masses of the ids it owns;
4. one sum-reduction of ``B + tilted`` numbers hands every rank every id and mass.

So ``p_i = u / N + (1 - u) m_i / sum(m)`` (the unsharded distribution), the global batch is the same on
every rank and for every world size over the same shards, and a step costs two collectives of
O(B + S) numbers and O(B log(N / S)) work per rank; no rank touches O(N) data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .shard_forest import ShardForest
from .virtual_shards import VirtualShards


class ShardMasses:
    """The masses of the virtual shards one rank owns: a :class:`~irdro_sampler.shard_forest.ShardForest`
    with one row per owned shard (every row as wide as the largest shard, on every rank)."""

    def __init__(self, shards: VirtualShards, rank: int, world_size: int, *, fanout: int = 8) -> None:
        self.shards = shards
        self.owned = shards.shards_of_rank(rank, world_size)
        self.forest = ShardForest(len(self.owned), shards.shard_size, fanout=fanout)

    @property
    def nbytes(self) -> int:
        return self.forest.nbytes

    def _rows_offsets(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard, offset = np.divmod(np.asarray(ids, dtype=np.int64), self.shards.shard_size)
        return shard - self.owned.start, offset

    def set(self, ids: np.ndarray, mass: np.ndarray) -> None:
        """Set the masses of distinct owned sample ``ids`` (global ids; finite, >= 0)."""
        self.forest.set(*self._rows_offsets(ids), mass)

    def fill(self, masses_of_range) -> None:
        """Set every owned mass: ``masses_of_range(start, stop)`` gives the masses of ids [start, stop)
        (called once per owned shard, so no O(N / world) temporary), then refresh the sums."""
        leaves = self.forest.leaf_buffer()
        for row, s in enumerate(self.owned):
            a, z = self.shards.shard_range(s)
            leaves[row, : z - a] = masses_of_range(a, z)
        self.forest.refresh()

    def mass_of(self, ids: np.ndarray) -> np.ndarray:
        """Masses of owned sample ``ids``."""
        rows, offsets = self._rows_offsets(ids)
        return self.forest.levels[0][rows, offsets]

    def totals(self) -> np.ndarray:
        """A length-S vector with this rank's shard totals (0 elsewhere): sum-reduce it across ranks."""
        out = np.zeros(self.shards.num_shards, dtype=np.float64)
        out[self.owned.start : self.owned.stop] = self.forest.totals
        return out


def reduce_totals(masses: ShardMasses, flag: float = 0.0, digest: bytes = b"",
                  group: Any = None) -> tuple[np.ndarray, float, bool]:
    """The global S-vector of shard totals, the largest ``flag`` of any rank, and whether every rank
    passed the same ``digest`` (one collective). ``masses``: anything with ``shards`` and ``totals()``
    (a :class:`ShardMasses` or a scheme of :mod:`irdro_sampler.sharded_schemes`).

    A max-reduction: a shard's total is non-negative and non-zero on its owner only, so the maximum is
    the owner's value, exact and the same for every world size. The digest rides along as 21-bit chunks
    ``c`` and ``-c`` (exact in float64): all ranks agree iff ``max(c) == -max(-c)`` for every chunk.
    """
    word = int.from_bytes(digest[:8].ljust(8, b"\0"), "little")
    chunks = np.array([(word >> shift) & 0x1FFFFF for shift in (0, 21, 42)], dtype=np.float64)
    both = torch.from_numpy(np.concatenate([masses.totals(), [float(flag)], chunks, -chunks]))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    out = both.numpy()
    s = masses.shards.num_shards
    agree = bool(np.array_equal(out[s + 1 : s + 4], -out[s + 4 :]))
    return out[:s], float(out[s]), agree


def draw_global_batch(
    masses: ShardMasses, seed: int, b: int, size: int, uniform_mix: float, group: Any = None,
    totals: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Global batch ``b`` of ``size`` ids, their masses and the masses' total (a collective).

    Every rank of ``group`` calls it with the same arguments but its own ``masses``; every rank gets
    the same result. The draw probability of a returned id is ``u / N + (1 - u) * mass / total``.
    ``totals``: the reduced shard totals if the caller has them (:func:`reduce_totals`), saving a collective.
    """
    if totals is None:
        totals = reduce_totals(masses, group=group)[0]
    # Cumulative shard masses in shard order: the same bits on every world size. A position's shard is
    # found in it (O(B log S); a multinomial over the S shards would cost O(S) per batch).
    cdf = np.cumsum(totals)
    total = float(cdf[-1]) if cdf.size else 0.0
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
    # Each tilted position's shard (side="right": a shard of mass 0 adds nothing to the cdf, so it is
    # never chosen) and its fraction of that shard's mass, from the shared stream: a position's draw
    # does not depend on who owns its shard.
    shard = np.searchsorted(cdf, rng.random(n_tilted) * total, side="right")
    shard[shard >= totals.size] = np.searchsorted(cdf, total, side="left")  # rounding: the last shard with mass
    fraction = rng.random(n_tilted)
    owned = masses.owned
    mine = np.flatnonzero((shard >= owned.start) & (shard < owned.stop))
    # One sum over ranks hands every rank the tilted ids and every mass: each is filled by its owner alone
    # (ids as float64: exact below 2**53).
    packed = np.zeros(n_tilted + size, dtype=np.float64)
    offsets = masses.forest.find(shard[mine] - owned.start, fraction[mine])
    packed[mine] = shard[mine] * masses.shards.shard_size + offsets
    floor_ids = ids[from_floor]
    floor_mine = np.flatnonzero(_owned(masses, floor_ids))
    mass = packed[n_tilted:]
    mass[np.flatnonzero(from_floor)[floor_mine]] = masses.mass_of(floor_ids[floor_mine])
    mass[np.flatnonzero(~from_floor)[mine]] = masses.forest.levels[0][shard[mine] - owned.start, offsets]
    reduced = torch.from_numpy(packed)
    dist.all_reduce(reduced, group=group)
    out = reduced.numpy()
    ids[~from_floor] = out[:n_tilted].astype(np.int64)
    return ids, out[n_tilted:].copy(), total


def _owned(masses: ShardMasses, ids: np.ndarray) -> np.ndarray:
    shard = masses.shards.shard_of(ids)
    return (shard >= masses.owned.start) & (shard < masses.owned.stop)
