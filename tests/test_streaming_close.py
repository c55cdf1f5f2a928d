"""``close()`` of the weighted streaming datasets: their shared memory is released when the user is done,
not at process exit. Real MDS shards, real DataLoader workers, real gloo ranks; the blocks are looked up in
/dev/shm, where streaming's SharedMemory puts them on Linux."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from _core_helpers import free_port

pytest.importorskip("streaming")
from _streaming_data import fresh_local, write_mds  # noqa: E402

from irdro_sampler.integrations.streaming import WeightedStreamingDataset  # noqa: E402
from irdro_sampler.integrations.streaming_sharded import ShardedWeightedStreamingDataset  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="shared memory is not under /dev/shm here")

N, BATCH, ROUND = 1200, 10, 600


def _ours() -> set[str]:
    """The shared-memory blocks of our round state now in /dev/shm (streaming's own are named otherwise)."""
    return {f for f in os.listdir("/dev/shm") if "_irdro_" in f}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mds"))
    write_mds(root, N, 100)
    return root


def _make(root: str, cls=WeightedStreamingDataset, local: str | None = None, **kw):
    return cls(round_size=ROUND, remote=os.path.join(root, "remote"), local=local or fresh_local(root),
               batch_size=BATCH, shuffle=True, shuffle_block_size=200, seed=3, **kw)


def _one_round(ds, num_workers: int) -> np.ndarray:
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=num_workers)
    return np.concatenate([b["sample_idx"].numpy() for b in dl])


@pytest.mark.parametrize("cls", [WeightedStreamingDataset, ShardedWeightedStreamingDataset])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_close_unlinks_the_blocks_and_refuses_later_use(data_root, cls, num_workers):
    before = _ours()
    ds = _make(data_root, cls)
    mine = _ours() - before
    assert len(mine) == 5  # header, error message, done flags, and the two blocks of rows
    assert len(_one_round(ds, num_workers)) == ROUND
    ds.set_weights(np.linspace(1.0, 2.0, N))
    assert not ds.closed
    ds.close()
    assert ds.closed and not (mine & _ours())  # unlinked: freed once no process maps them
    ds.close()  # idempotent
    for use in (lambda: next(iter(ds)), lambda: ds.set_weights(np.ones(N)), lambda: ds.state_dict(0, True),
                lambda: _one_round(ds, num_workers)):
        with pytest.raises(ValueError, match="was closed"):
            use()


def test_a_with_block_closes_and_other_datasets_keep_their_blocks(data_root):
    other = _make(data_root)
    others = _ours()
    with _make(data_root) as ds:
        first = _one_round(ds, 0)
        assert len(_ours() - others) == 5
    assert ds.closed and _ours() == others
    # The other dataset's blocks and rounds are untouched.
    assert len(_one_round(other, 0)) == ROUND and len(first) == ROUND
    other.close()


def test_close_before_exit_leaves_no_error_at_exit(data_root, tmp_path):
    """Streaming's exit handler releases the blocks again at exit: after close() that must be silent."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        import torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from _streaming_data import fresh_local
        from irdro_sampler.integrations.streaming import WeightedStreamingDataset
        ds = WeightedStreamingDataset(round_size={ROUND}, remote=os.path.join({data_root!r}, "remote"),
                                      local=fresh_local({data_root!r}), batch_size={BATCH}, seed=3)
        print(len(list(torch.utils.data.DataLoader(ds, batch_size={BATCH}, num_workers=1))))
        ds.close()
        print("closed")
    """))
    before = _ours()
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(ROUND // BATCH), "closed"]
    assert "Traceback" not in out.stderr and "leaked" not in out.stderr, out.stderr[-3000:]
    assert _ours() <= before


WORLD = 2


def _rank_main(rank: int, root: str, port: int, result: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    before = _ours()
    ds = _make(root, local=os.path.join(root, "local-ranks"))
    dist.barrier()
    created = _ours() - before
    n = len(_one_round(ds, 1))
    ds.set_weights(np.linspace(1.0, 2.0, N))
    if rank == 1:
        ds.close()  # the rank that only attached: the blocks stay for the leader
        dist.barrier()
    else:
        dist.barrier()
        still = len(created & _ours())
        ds.close()  # the leader unlinks them
    dist.barrier()
    if rank == 0:
        np.savez(result, created=len(created), still=still, after=len(created & _ours()), n=n)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_close_on_every_rank_frees_the_node_blocks(tmp_path):
    root = str(tmp_path)
    write_mds(root, N, 100)
    result = os.path.join(root, "result.npz")
    mp.start_processes(_rank_main, args=(root, free_port(), result), nprocs=WORLD, join=True, start_method="fork")
    got = np.load(result)
    assert int(got["created"]) == 5 and int(got["n"]) == ROUND // WORLD
    assert int(got["still"]) == 5  # another rank's close() does not pull the blocks from under the leader
    assert int(got["after"]) == 0
