"""ShardedIRDROSampler.save and .load make no temporary as long as the table: every array they allocate
(numpy reports its buffers to tracemalloc) stays below a fraction of one byte per owned row. The rebuild
of the masses that ends a load (what every refresh does, in blocks of 256 shards) is measured apart."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from _core_helpers import gloo_group, loss_of, spawn_gloo

from irdro_sampler import sharded_state
from irdro_sampler.sharded_sampler import ShardedIRDROSampler

N, SHARDS, CHUNK = 1 << 21, 512, 1 << 14  # 4,096 rows per shard: the rebuild after load works per shard


def _worker(rank: int, world: int, port: int, results, folder: str) -> None:
    with gloo_group(rank, world, port):
        sharded_state.CHUNK = CHUNK
        s = ShardedIRDROSampler(N, 256, num_shards=SHARDS, feedback_delay=2, refresh_interval=50)
        for b in range(6):
            ids = s.batch(b)[0]
            s.update(ids, loss_of(ids, b), step=b)
        before = (s.table.losses.copy(), s.table.counts.copy(), s.table.last_step.copy(), s.fingerprint())
        tracemalloc.start()
        s.save(folder)
        saved = tracemalloc.get_traced_memory()[1]
        s.table.losses[:] = 7.0  # overwritten by the load
        tracemalloc.reset_peak()
        rebuild, s._rebuild = s._rebuild, lambda: None  # the refresh's own rebuild: run below
        s.load(folder)
        loaded = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rebuild()
        restored = all(np.array_equal(a, b, equal_nan=True) for a, b in
                       zip(before[:3], (s.table.losses, s.table.counts, s.table.last_step), strict=True))
        results[rank] = (saved, loaded, restored and s.fingerprint() == before[3], s.table.num_seen)


@pytest.mark.slow
def test_save_and_load_allocate_no_table_sized_temporary(tmp_path):
    saved, loaded, restored, seen = spawn_gloo(_worker, 1, str(tmp_path))[0]
    assert restored and seen > 0
    # The smallest full-table temporary (a bool mask) is N bytes; a chunk's are ~30 bytes x CHUNK.
    assert saved < N // 4, f"save allocated {saved:,} bytes at its peak (N = {N:,} rows)"
    assert loaded < N // 4, f"load allocated {loaded:,} bytes at its peak (N = {N:,} rows)"
