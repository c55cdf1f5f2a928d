"""Virtual shards: ownership of sample ids by ranks, independent of the world size."""

from __future__ import annotations

import numpy as np
import pytest

from irdro_sampler.virtual_shards import VirtualShards, default_num_shards


@pytest.mark.parametrize(("n", "shards"), [(1, 1), (10, 16), (1000, 64), (12_345, 128), (2**20 + 3, 1024)])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 8, 64])
def test_ranks_partition_the_ids_in_contiguous_runs(n, shards, world):
    vs = VirtualShards(n, shards)
    ranges = [vs.ids_of_rank(r, world) for r in range(world)]
    covered = np.zeros(n, dtype=np.int64)
    for start, stop in ranges:
        assert 0 <= start <= stop <= n
        covered[start:stop] += 1
    assert (covered == 1).all()  # every id owned exactly once
    ids = np.arange(n)
    owner = vs.owner_of(ids, world)
    for r, (start, stop) in enumerate(ranges):
        assert (owner[start:stop] == r).all()
    # Shard counts per rank differ by at most one: the layout is as even as the shard count allows.
    sizes = [len(vs.shards_of_rank(r, world)) for r in range(world)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == shards


def test_a_shard_moves_whole_between_world_sizes():
    vs = VirtualShards(10_000, 64)
    ids = np.arange(10_000)
    for world in (2, 4, 8):
        owner = vs.owner_of(ids, world)
        shard = vs.shard_of(ids)
        for s in range(64):
            assert len(set(owner[shard == s].tolist())) <= 1  # a shard is never split across ranks


def test_default_num_shards():
    assert default_num_shards(1) == 1
    assert default_num_shards(70_000) == 256  # at least 256 shards: room for 256 ranks
    assert default_num_shards(100) == 64  # fewer only below 256 samples
    assert default_num_shards(20_000) == 256
    assert default_num_shards(10**8) == 2048
    assert default_num_shards(10**12) == 1 << 16
    n = default_num_shards(3 * 10**7)
    assert n & (n - 1) == 0


@pytest.mark.parametrize(("kw", "words"), [(dict(num_shards=3), "power of two, got 3"), (dict(num_shards=0), "num_shards"),
                                            (dict(dataset_size=0), "dataset_size")])
def test_bad_layout(kw, words):
    args = dict(dataset_size=100, num_shards=4) | kw
    with pytest.raises(ValueError, match=words):
        VirtualShards(**args)
    with pytest.raises(ValueError, match=r"rank must lie in \[0, 2\), got 2"):
        VirtualShards(100, 4).shards_of_rank(2, 2)
