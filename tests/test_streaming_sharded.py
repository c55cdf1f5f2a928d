"""ShardedWeightedStreamingDataset on 2 real gloo ranks x 2 DataLoader workers over real MDS shards: each
rank passes only its own samples' weights, the rounds are the ones a single process plans, no shared
block of length N exists, and a mid-round checkpoint (one state per rank) resumes exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from _core_helpers import free_port

pytest.importorskip("streaming")

from _streaming_data import fresh_local, write_mds  # noqa: E402

N, BATCH, ROUND, WORLD, SHARDS, WORKERS = 4000, 10, 400, 2, 16, 2
SAVE_AT = 6  # batches of round 1 trained before the checkpoint


def _weights(round_idx: int) -> np.ndarray:
    """The weights every rank would compute for the next round (each passes its own slice)."""
    w = np.random.default_rng([5, round_idx]).gamma(0.5, 1.0, N)
    w[:: 4 + round_idx] = 0.0
    return w


def _make(root: str, local: str, draws: str):
    from irdro_sampler.integrations.streaming_sharded import ShardedWeightedStreamingDataset

    return ShardedWeightedStreamingDataset(
        round_size=ROUND, remote=os.path.join(root, "remote"), local=local, batch_size=BATCH, shuffle=True,
        shuffle_block_size=200, seed=11, num_shards=SHARDS, draws=draws,
    )


def _ids(batches) -> np.ndarray:
    return np.concatenate([b["sample_idx"].numpy() for b in batches]) if batches else np.zeros(0, np.int64)


def _rank_main(rank: int, root: str, port: int, draws: str, resume: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    shm_before = set(os.listdir("/dev/shm"))
    local = os.path.join(root, f"local-{draws}-{int(resume)}")
    ds = _make(root, local, draws)
    start, stop = ds.owned_ids
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=WORKERS, persistent_workers=True)
    tag = f"{draws}-{'resumed' if resume else 'straight'}-rank{rank}"
    state_file = os.path.join(root, f"state-{draws}-rank{rank}.pt")
    out = {}
    if resume:
        ds.load_state_dict(torch.load(state_file, weights_only=False))
        out["round1"] = _ids(list(dl))  # the rest of round 1
    else:
        out["round0"] = _ids(list(dl))
        out["plan0"] = ds.round_plan(0)[0]
        ds.set_weights(_weights(1)[start:stop])
        it, head = iter(dl), []
        for _ in range(SAVE_AT):
            head.append(next(it))
        torch.save(ds.state_dict(SAVE_AT * BATCH * WORLD, True), state_file)
        out["round1"] = _ids(list(it))
        out["head_p"] = ds.draw_probabilities(_ids(head))
        out["head"] = _ids(head)
    ds.set_weights(_weights(2)[start:stop])
    out["round2"] = _ids(list(dl))
    out["fingerprint"] = ds.fingerprint()
    new = [f for f in set(os.listdir("/dev/shm")) - shm_before if os.path.exists(os.path.join("/dev/shm", f))]
    out["largest_shm"] = max(os.path.getsize(os.path.join("/dev/shm", f)) for f in new)
    np.savez(os.path.join(root, f"{tag}.npz"), **out)
    dist.barrier()
    del dl
    dist.destroy_process_group()


def _single_process_plans(root: str, draws: str) -> list[np.ndarray]:
    """The same rounds planned by one process holding all weights (no process group)."""
    ds = _make(root, fresh_local(root), draws)
    assert ds.owned_ids == (0, N)
    plans = [ds.round_plan(0)[0]]
    for r in (1, 2):
        # Mark round r - 1 as started, as the dataset's iteration does, so that set_weights plans round r.
        list(torch.utils.data.DataLoader(ds, batch_size=BATCH))
        ds.set_weights(_weights(r))
        plans.append(ds.round_plan(r)[0])
    return plans


@pytest.mark.slow
@pytest.mark.parametrize("draws", ["balanced", "iid"])
def test_two_ranks_two_workers_same_rounds_and_exact_resume(tmp_path, draws):
    root = str(tmp_path)
    write_mds(root, N, 200)
    for resume in (False, True):
        mp.start_processes(_rank_main, args=(root, free_port(), draws, resume), nprocs=WORLD, join=True,
                           start_method="fork")
    straight = [np.load(os.path.join(root, f"{draws}-straight-rank{r}.npz")) for r in range(WORLD)]
    resumed = [np.load(os.path.join(root, f"{draws}-resumed-rank{r}.npz")) for r in range(WORLD)]
    plans = _single_process_plans(root, draws)
    # Each round: the ranks' shares are disjoint halves of the plan, and the plan is the one-process plan.
    for r, plan in enumerate(plans):
        key = f"round{r}"
        shares = [np.concatenate([s["head"], s[key]]) if r == 1 else s[key] for s in straight]
        assert all(len(x) == ROUND // WORLD for x in shares), key
        assert np.array_equal(np.sort(np.concatenate(shares)), plan), f"{draws} {key}: not the single-process plan"
        w = _weights(r) if r else np.ones(N)
        assert np.all(w[plan] > 0)
    for s in straight:
        np.testing.assert_allclose(s["head_p"], _weights(1)[s["head"]] / _weights(1).sum(), rtol=1e-12)
    # The checkpoint resumes exactly: the rest of round 1 and all of round 2 on each rank.
    for r in range(WORLD):
        assert np.array_equal(resumed[r]["round1"], straight[r]["round1"]), f"rank {r}: rest of round 1 differs"
        assert np.array_equal(resumed[r]["round2"], straight[r]["round2"]), f"rank {r}: round 2 differs"
        assert int(resumed[r]["fingerprint"]) == int(straight[r]["fingerprint"])
        # No shared block of N float64: the node holds planned rounds of ROUND samples.
        assert int(straight[r]["largest_shm"]) < 8 * N, int(straight[r]["largest_shm"])
    # Elastic: one process loads both ranks' states and continues with the same draws (their union).
    states = [torch.load(os.path.join(root, f"state-{draws}-rank{r}.pt"), weights_only=False, mmap=True) for r in range(WORLD)]
    with pytest.raises(ValueError, match=r"ids \[2000, 4000\) of this rank are in none of the states given"):
        _make(root, fresh_local(root), draws).load_state_dict(states[0])
    one = _make(root, fresh_local(root), draws)
    one.load_state_dict(states[::-1])  # any order
    rest = _ids(list(torch.utils.data.DataLoader(one, batch_size=BATCH)))
    assert np.array_equal(np.sort(rest), np.sort(np.concatenate([s["round1"] for s in straight])))
    one.set_weights(_weights(2))
    assert np.array_equal(one.round_plan(2)[0], np.sort(np.concatenate([s["round2"] for s in straight])))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mds-sharded"))
    write_mds(root, N, 200)
    return root


def test_one_process_plans_replans_and_refuses_bad_states(data_root):
    ds = _make(data_root, fresh_local(data_root), "balanced")
    assert len(ds) == ROUND and ds.owned_ids == (0, N)
    plan0 = ds.round_plan(0)[0]
    ds.set_weights(_weights(1))  # before round 0 started: re-plans round 0
    replanned = ds.round_plan(0)[0]
    assert not np.array_equal(plan0, replanned) and np.all(_weights(1)[replanned] > 0)
    ids = _ids(list(torch.utils.data.DataLoader(ds, batch_size=BATCH)))
    assert np.array_equal(np.sort(ids), replanned)
    ds.set_weights(None)  # during round 0: plans round 1 from the same weights
    assert np.all(_weights(1)[ds.round_plan(1)[0]] > 0)
    with pytest.raises(ValueError, match="were not drawn in round 0"):
        ds.draw_probabilities(np.setdiff1d(np.arange(N), replanned)[:3])
    with pytest.raises(ValueError, match="rank 0 passed wrong length"):
        ds.set_weights(np.ones(N - 1))
    assert np.all(_weights(1)[ds.round_plan(1)[0]] > 0)  # the refused weights changed nothing
    sd = ds.state_dict(0, True)
    restored = _make(data_root, fresh_local(data_root), "balanced")
    restored.load_state_dict(sd)  # into other slots than ds holds them: the fingerprint is by role
    assert restored.fingerprint() == ds.fingerprint()
    assert all(np.array_equal(a, b) for a, b in zip(restored.round_plan(1), ds.round_plan(1), strict=True))
    other = _make(data_root, fresh_local(data_root), "iid")
    before = other.fingerprint()
    with pytest.raises(ValueError, match=r"\['draws'\]: saved 'balanced', this dataset has 'iid'"):
        other.load_state_dict(sd)
    assert other.fingerprint() == before
    sd["irdro_sharded"]["carry_after"] = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\['carry_after'\]: expected 4000 float64, got float64\(5,\)"):
        _make(data_root, fresh_local(data_root), "balanced").load_state_dict(sd)


def test_round_size_warning_points_at_the_callers_line(data_root):
    """The rounding warning names the line that built the dataset, not one inside the package (the sharded
    dataset's constructor adds a frame to the unsharded one's)."""
    from irdro_sampler.integrations.streaming_sharded import ShardedWeightedStreamingDataset

    with pytest.warns(UserWarning, match="rounding up to") as record:
        ShardedWeightedStreamingDataset(
            round_size=ROUND - 1, remote=os.path.join(data_root, "remote"), local=fresh_local(data_root),
            batch_size=BATCH, shuffle=True, shuffle_block_size=200, seed=11, num_shards=SHARDS, draws="iid")
    assert [r.filename for r in record if "rounding up" in str(r.message)] == [__file__]


def test_workers_receive_neither_rows_nor_the_process_group(data_root):
    """Spawned DataLoader workers get the pickled dataset: without the main process's O(N) rows, and
    they still draw the planned round."""
    import pickle

    ds = _make(data_root, fresh_local(data_root), "balanced")
    ds.set_weights(_weights(1))
    assert len(pickle.dumps(ds)) < 8 * N  # the weights and two carries alone are 24 * N bytes
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=2, multiprocessing_context="spawn")
    assert np.array_equal(np.sort(_ids(list(dl))), ds.round_plan(0)[0])
    ds.set_weights(None)  # the main process kept its rows
    assert np.all(_weights(1)[ds.round_plan(1)[0]] > 0)


def test_composer_irdro_refuses_the_sharded_dataset_clearly(data_root):
    from irdro_sampler.integrations.composer.targets import StreamingTarget

    dl = torch.utils.data.DataLoader(_make(data_root, fresh_local(data_root), "iid"), batch_size=BATCH)
    with pytest.raises(ValueError, match="takes each rank's own weights.*sharded_probabilities"):
        StreamingTarget.find(dl)
