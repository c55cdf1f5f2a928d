"""Two real processes (gloo on 127.0.0.1): identical states, disjoint shares of the same global batch."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _core_helpers import assert_state_equal, free_port, iter_batches, loss_of

from irdro_sampler import IRDROSampler

N, BATCH, EPOCHS = 203, 8, 2  # per rank: ceil(203 / 2) = 102 samples = 12 batches of 8 + one of 6
OPTIONS = dict(temperature=0.4, truncate_quantile=0.9, uniform_mix=0.1, feedback_delay=3, refresh_interval=2, seed=5)


def _worker(rank: int, world: int, port: int, outdir: str, draws: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        s = IRDROSampler(N, BATCH, draws=draws, **OPTIONS)  # num_replicas and rank from torch.distributed
        assert (s.num_replicas, s.rank) == (world, rank), (s.num_replicas, s.rank)
        shares, step = [], 0
        for epoch in range(EPOCHS):
            s.set_epoch(epoch)
            for share in iter_batches(s):
                shares.append(share)
                idx = torch.tensor(share, dtype=torch.int64)
                loss = torch.from_numpy(loss_of(share, step))
                all_idx = [torch.empty_like(idx) for _ in range(world)]
                all_loss = [torch.empty_like(loss) for _ in range(world)]
                dist.all_gather(all_idx, idx)
                dist.all_gather(all_loss, loss)
                s.update(torch.cat(all_idx), torch.cat(all_loss), step=step)
                step += 1
        torch.save(s.state_dict(), os.path.join(outdir, f"state{rank}.pt"))
        with open(os.path.join(outdir, f"shares{rank}.json"), "w") as f:
            json.dump(shares, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _reference(draws: str, world: int = 2):
    """The same run in one process: one sampler per rank, fed the same gathered feedback."""
    samplers = [IRDROSampler(N, BATCH, num_replicas=world, rank=r, draws=draws, **OPTIONS) for r in range(world)]
    shares = [[] for _ in range(world)]
    step = 0
    for epoch in range(EPOCHS):
        for s in samplers:
            s.set_epoch(epoch)
        for parts in zip(*[iter_batches(s) for s in samplers], strict=True):
            glob = [i for part in parts for i in part]
            for r, part in enumerate(parts):
                shares[r].append(part)
            losses = loss_of(glob, step)
            for s in samplers:
                s.update(glob, losses, step=step)
            step += 1
    return samplers, shares


@pytest.mark.slow
@pytest.mark.parametrize("draws", ["balanced", "iid"])
def test_two_processes_identical_states_and_disjoint_shares(tmp_path, draws):
    # fork: the children inherit the imported modules (spawn would re-import torch in each, ~10 s here).
    ctx = mp.start_processes(
        _worker, args=(2, free_port(), str(tmp_path), draws), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):  # re-raises a child's exception
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish within 120 s")
    states = [torch.load(tmp_path / f"state{r}.pt", weights_only=True) for r in range(2)]
    shares = [json.loads((tmp_path / f"shares{r}.json").read_text()) for r in range(2)]
    assert_state_equal(states[0], states[1])

    ref_samplers, ref_shares = _reference(draws)
    assert shares == ref_shares
    assert_state_equal(states[0], ref_samplers[0].state_dict())

    bpe = ref_samplers[0].batches_per_epoch
    assert bpe == 13 and len(shares[0]) == EPOCHS * bpe
    sizes = [len(b) for b in shares[0][:bpe]]
    assert sizes == [8] * 12 + [6]
    # Each rank's share is its slice of the one global batch that both ranks drew: rank r gets
    # positions [r * n, (r + 1) * n) of the global batch (kept in the state's replay buffer).
    drawn = states[0]["drawn"]
    keys = drawn["keys"][:, 0].tolist()
    off = drawn["offsets"].tolist()
    assert keys, "no buffered batches to compare"
    for i, b in enumerate(keys):
        glob = drawn["indices"][off[i] : off[i + 1]].tolist()
        n = len(glob) // 2
        assert shares[0][b] == glob[:n] and shares[1][b] == glob[n:]
    # The feedback of both ranks reached the table: it holds the losses of rank 1's samples too.
    table = states[0]["table"]
    only_rank1 = {i for b in shares[1][:-3] for i in b} - {i for b in shares[0] for i in b}
    assert only_rank1 and all(int(table["counts"][i]) > 0 for i in only_rank1)
    if draws == "balanced":  # the ranks' shares of the first epoch (before feedback matters) are disjoint
        first = [i for r in range(2) for b in shares[r][:OPTIONS["feedback_delay"]] for i in b]
        assert len(first) == len(set(first))


@pytest.mark.parametrize("draws", ["balanced", "iid"])
def test_rank_shares_are_slices_of_one_global_batch(draws):
    """In-process: each rank yields its own slice of the global batch both ranks draw."""
    samplers = [IRDROSampler(N, BATCH, num_replicas=2, rank=r, draws=draws, **OPTIONS) for r in range(2)]
    for step, parts in enumerate(zip(*[iter_batches(s) for s in samplers], strict=True)):
        glob = [s.drawn_batch(step)[0].tolist() for s in samplers]
        assert glob[0] == glob[1] == list(parts[0]) + list(parts[1])
        for s in samplers:
            s.update(glob[0], loss_of(glob[0], step), step=step)
    assert step == samplers[0].batches_per_epoch - 1


def test_defaults_without_process_group():
    assert not dist.is_initialized()
    s = IRDROSampler(10, 2)
    assert (s.num_replicas, s.rank) == (1, 0)
