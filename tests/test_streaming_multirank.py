"""Two real ranks (gloo on 127.0.0.1, one node) iterate one WeightedStreamingDataset round."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from _core_helpers import free_port

pytest.importorskip("streaming")

from _streaming_data import write_mds  # noqa: E402

N, BATCH, ROUND, WORLD = 2000, 10, 1000, 2


def _rank_main(rank: int, root: str, local: str, port: int, num_workers: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from irdro_sampler.integrations.streaming import WeightedStreamingDataset

    ds = WeightedStreamingDataset(
        round_size=ROUND, remote=os.path.join(root, "remote"), local=local, batch_size=BATCH,
        shuffle=True, shuffle_block_size=400, seed=11,
    )
    w = np.random.default_rng(5).random(N)  # every rank computes the same weights
    w[::4] = 0.0
    ds.set_weights(w)
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=num_workers)
    ids = np.concatenate([b["sample_idx"].numpy() for b in dl])
    units, plan = ds.resample_streams(0)
    dist.barrier()  # both ranks finished the round: the state points at the next one
    sd = ds.state_dict(0, True)
    assert (sd["epoch"], sd["sample_in_epoch"]) == (1, 0)
    np.savez(
        os.path.join(root, f"rank{rank}-nw{num_workers}.npz"), ids=ids, plan=plan, units=units,
        weights=ds.round_weights(0), state_w=sd["irdro"]["pending_weights"].numpy(), length=len(ds),
    )
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_same_plan_disjoint_shares(tmp_path, num_workers):
    root = str(tmp_path)
    write_mds(root, N, 100)
    local = os.path.join(root, "local")
    mp.start_processes(_rank_main, args=(root, local, free_port(), num_workers), nprocs=WORLD,
                       join=True, start_method="fork")
    r = [np.load(os.path.join(root, f"rank{k}-nw{num_workers}.npz")) for k in range(WORLD)]
    # Bitwise identical weights and plan on both ranks.
    assert np.array_equal(r[0]["weights"], r[1]["weights"])
    assert np.array_equal(r[0]["state_w"], r[1]["state_w"])
    assert np.array_equal(r[0]["plan"], r[1]["plan"]) and np.array_equal(r[0]["units"], r[1]["units"])
    # Each rank gets half of the round; together they are exactly the planned draws (positions disjoint).
    assert len(r[0]["ids"]) == len(r[1]["ids"]) == ROUND // WORLD == int(r[0]["length"])
    both = np.sort(np.concatenate([r[0]["ids"], r[1]["ids"]]))
    assert np.array_equal(both, np.sort(r[0]["plan"]))
    assert np.all(both % 4 != 0)  # zero weights never drawn
    # Same result as a single process would plan (the plan does not depend on the world).
    from irdro_sampler.integrations.streaming import WeightedStreamingDataset

    single = WeightedStreamingDataset(
        round_size=ROUND, remote=os.path.join(root, "remote"), local=os.path.join(root, "local1"),
        batch_size=BATCH, shuffle=True, shuffle_block_size=400, seed=11,
    )
    assert np.array_equal(single.plan_round(r[0]["weights"], 0)[1], r[0]["plan"])
