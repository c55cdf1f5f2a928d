"""Two-level i.i.d. draws from masses spread over gloo ranks: the unsharded distribution, the same global
batches on every rank and for every world size."""

from __future__ import annotations

import numpy as np
import pytest
from _core_helpers import P_THRESHOLD, chisquare_pvalue, gloo_group, spawn_gloo

from irdro_sampler.sharded_draws import ShardMasses, draw_global_batch
from irdro_sampler.virtual_shards import VirtualShards

N, SHARDS, BATCH, BATCHES, MIX, SEED = 3001, 16, 64, 300, 0.1, 5


def _masses() -> np.ndarray:
    rng = np.random.default_rng(11)
    m = rng.gamma(0.5, 1.0, N)
    m[rng.random(N) < 0.2] = 0.0  # cut samples: reachable through the floor only
    m[1500:1700] *= 20.0  # a heavy region spanning shards
    return m


def _worker(rank: int, world: int, port: int, results) -> None:
    with gloo_group(rank, world, port):
        shards = VirtualShards(N, SHARDS)
        held = ShardMasses(shards, rank, world)
        start, stop = shards.ids_of_rank(rank, world)
        m = _masses()
        held.set(np.arange(start, stop), m[start:stop])
        out = [draw_global_batch(held, SEED, b, BATCH, MIX) for b in range(BATCHES)]
        results[rank] = (np.stack([o[0] for o in out]), np.stack([o[1] for o in out]), [o[2] for o in out])


def _run(world: int):
    return spawn_gloo(_worker, world)


@pytest.mark.slow
def test_sharded_draws_follow_the_unsharded_distribution_on_any_world_size():
    m = _masses()
    runs = {world: _run(world) for world in (1, 2, 4)}
    ids, mass, totals = runs[1][0]
    for world, per_rank in runs.items():
        for rank, (i, ms, t) in enumerate(per_rank):
            assert np.array_equal(i, ids), f"world {world} rank {rank}: other global batches"
            assert np.array_equal(ms, mass) and t == totals
    np.testing.assert_array_equal(mass, m[ids])  # the owners' masses of the drawn ids
    assert np.allclose(totals, m.sum(), rtol=1e-12)
    p = MIX / N + (1 - MIX) * m / m.sum()
    counts = np.bincount(ids.ravel(), minlength=N)
    assert chisquare_pvalue(counts, p) > P_THRESHOLD
    # The floor reaches samples of mass 0, and no more than it should.
    zero = m == 0
    assert 0 < counts[zero].sum() < 2 * ids.size * p[zero].sum()


def test_a_rank_owning_no_shard_still_takes_part():
    """World 4 over 2 shards: two ranks own nothing and still receive every batch."""
    shards = VirtualShards(10, 2)
    assert [len(shards.shards_of_rank(r, 4)) for r in range(4)] == [0, 1, 0, 1]
    held = ShardMasses(shards, 0, 4)
    assert held.forest.rows == 0 and held.nbytes < 100 and held.totals().sum() == 0
