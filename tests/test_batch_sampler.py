"""IRDROBatchSampler: whole batches for DataLoader(batch_sampler=...), the same order as sampler=."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from irdro_sampler import IndexedDataset, IRDROBatchSampler, IRDROSampler

N, BATCH = 203, 16


def _train(loader_of, draws: str, epochs: int = 3, num_workers: int = 0) -> list[list[int]]:
    """A loop feeding back losses every step; returns every batch's indices."""
    data = IndexedDataset(TensorDataset(torch.arange(N, dtype=torch.float32)))
    sampler = IRDROSampler(data, BATCH, draws=draws, feedback_delay=8, seed=3)
    loader = loader_of(data, sampler, num_workers)
    seen, step = [], 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, idx in loader:
            loss = (x % 7) + 0.1 * (idx % 3)  # a tilt that moves the draws away from uniform
            sampler.update(idx, loss, step=step)
            seen.append(idx.tolist())
            step += 1
    return seen


def _per_index(data, sampler, workers):
    return DataLoader(data, sampler=sampler, batch_size=BATCH, num_workers=workers)


def _per_batch(data, sampler, workers):
    return DataLoader(data, batch_sampler=IRDROBatchSampler(sampler), num_workers=workers)


@pytest.mark.parametrize("draws", ["balanced", "iid"])
def test_same_batches_as_the_per_index_sampler(draws):
    by_index = _train(_per_index, draws)
    assert _train(_per_batch, draws) == by_index
    assert len(by_index) == 3 * -(-N // BATCH) and len(by_index[-1]) == N % BATCH


def test_same_batches_with_workers():
    assert _train(_per_batch, "balanced", epochs=2, num_workers=2) == _train(_per_index, "balanced", epochs=2)


def test_len_epochs_and_ranks():
    n = 200  # divisible by the ranks: no padding sample repeats
    parts = [IRDROBatchSampler(IRDROSampler(n, BATCH, num_replicas=2, rank=r, seed=1)) for r in range(2)]
    assert len(parts[0]) == parts[0].sampler.batches_per_epoch == -(-(n // 2) // BATCH)
    assert parts[0].batch_size == BATCH
    for p in parts:
        p.set_epoch(1)
    epoch1 = [sum(iter(p), []) for p in parts]
    assert all(p.sampler.epoch == 1 for p in parts)
    # Flat weights under balanced draws: the ranks' shares are disjoint and cover the data set.
    assert set(epoch1[0]).isdisjoint(epoch1[1])
    assert sorted(epoch1[0] + epoch1[1]) == list(range(n))


def test_set_start_batch_passes_through():
    a, b = IRDROBatchSampler(IRDROSampler(N, BATCH, seed=2)), IRDROBatchSampler(IRDROSampler(N, BATCH, seed=2))
    full = list(a)
    b.set_start_batch(3)
    assert list(b) == full[3:]
    assert all(isinstance(i, int) for i in full[0])


@pytest.mark.parametrize("bad", [None, range(10), np.arange(3)])
def test_needs_an_irdro_sampler(bad):
    with pytest.raises(TypeError, match="sampler must be an IRDROSampler"):
        IRDROBatchSampler(bad)
