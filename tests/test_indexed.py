"""IndexedDataset: every sample carries its index, in the documented form; IndexListCollate keeps ids a list."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from irdro_sampler import IndexedDataset, IndexListCollate, IRDROSampler


class DictDataset(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.full((3,), float(i)), "y": i % 2}


def test_dict_samples_get_sample_idx():
    ds = IndexedDataset(DictDataset())
    assert len(ds) == 10
    item = ds[4]
    assert set(item) == {"x", "y", "sample_idx"} and item["sample_idx"] == 4
    assert "sample_idx" not in DictDataset()[4]  # the wrapped sample is not mutated
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch["sample_idx"].dtype == torch.int64
    assert batch["sample_idx"].tolist() == [0, 1, 2, 3]
    assert torch.equal(batch["x"][:, 0], torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_custom_index_key_and_conflict():
    ds = IndexedDataset(DictDataset(), index_key="uid")
    assert ds[2]["uid"] == 2
    with pytest.raises(KeyError, match="x"):
        IndexedDataset(DictDataset(), index_key="x")[0]


def test_tuple_samples_get_index_last():
    base = TensorDataset(torch.arange(10.0), torch.arange(10) * 10)
    ds = IndexedDataset(base)
    x, y, i = ds[7]
    assert (float(x), int(y), i) == (7.0, 70, 7)
    xb, yb, ib = next(iter(DataLoader(ds, batch_size=5)))
    assert ib.dtype == torch.int64 and ib.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(yb, ib * 10)


def test_list_samples_become_tuples_with_index_last():
    ds = IndexedDataset([[1.0, 2.0], [3.0, 4.0]])
    assert ds[1] == (3.0, 4.0, 1)


def test_other_samples_become_pairs():
    ds = IndexedDataset(["a", "b", "c"])
    assert ds[2] == ("c", 2)
    tensor_ds = IndexedDataset(torch.arange(6.0).reshape(3, 2))  # a tensor is a map-style data set
    x, i = tensor_ds[1]
    assert torch.equal(x, torch.tensor([2.0, 3.0])) and i == 1
    xb, ib = next(iter(DataLoader(tensor_ds, batch_size=3)))
    assert xb.shape == (3, 2) and ib.tolist() == [0, 1, 2]


def test_not_map_style_raises():
    with pytest.raises(TypeError, match="map-style"):
        IndexedDataset(iter(range(3)))
    with pytest.raises(TypeError, match="map-style"):
        IndexedDataset(5)


def test_indices_reach_the_sampler_update():
    ds = IndexedDataset(DictDataset())
    # prior=1.0 equals the constant loss reported below, so seen and unseen samples weigh the same and
    # the distribution stays exactly uniform whatever the feedback (with the default prior, the mean of
    # the seen losses, unseen samples weigh less until the next refresh).
    sampler = IRDROSampler(ds, 4, feedback_delay=1, seed=3, prior=1.0)
    drawn = list(sampler)
    sampler = IRDROSampler(ds, 4, feedback_delay=1, seed=3, prior=1.0)
    seen = []
    for step, batch in enumerate(DataLoader(ds, batch_size=4, sampler=sampler)):
        seen.extend(batch["sample_idx"].tolist())
        assert torch.equal(batch["x"][:, 0].long(), batch["sample_idx"])  # index matches content
        sampler.update(batch["sample_idx"], batch["x"][:, 0] * 0.0 + 1.0, step=step)
    # The distribution stayed uniform, so the draws equal the run without feedback.
    assert seen == drawn
    sampler.flush()  # the last step's feedback is still buffered (feedback_delay=1)
    assert sampler.table.num_seen == len(set(seen))


def test_index_list_collate_keeps_ids_a_list_of_ints():
    ds = IndexedDataset(DictDataset())
    samples = [ds[i] for i in (3, 1, 3)]  # repeated ids are fine: draws are with replacement
    samples[1]["sample_idx"] = np.int64(1)  # numpy and 0-d tensor ids become ints
    samples[2]["sample_idx"] = torch.tensor(3)
    batch = IndexListCollate()(samples)
    assert batch["sample_idx"] == [3, 1, 3] and all(type(i) is int for i in batch["sample_idx"])
    assert torch.equal(batch["x"][:, 0], torch.tensor([3.0, 1.0, 3.0]))
    assert batch["y"].tolist() == [1, 1, 1]
    assert "sample_idx" in samples[0]  # the samples are not mutated


def test_index_list_collate_wraps_another_collate_and_key():
    def first_only(samples):
        return {"x": samples[0]["x"]}

    batch = IndexListCollate(first_only, index_key="uid")([{"x": 1, "uid": 5}, {"x": 2, "uid": 6}])
    assert batch == {"x": 1, "uid": [5, 6]}


def test_index_list_collate_bad_input():
    collate = IndexListCollate()
    with pytest.raises(TypeError, match="'sample_idx'.*tuple"):
        collate([(torch.zeros(2), 0)])
    with pytest.raises(TypeError, match="keys \\['x'\\]"):
        collate([{"x": torch.zeros(2)}])
    with pytest.raises(TypeError, match="1.5"):
        collate([{"x": torch.zeros(2), "sample_idx": 1.5}])
    with pytest.raises(TypeError, match="mutable mapping.*list"):
        IndexListCollate(lambda s: [0])([{"x": 0, "sample_idx": 0}])
    with pytest.raises(TypeError, match="collate_fn must be callable"):
        IndexListCollate(collate_fn=3)


def test_index_list_collate_with_workers_reaches_the_sampler():
    ds = IndexedDataset(DictDataset())
    sampler = IRDROSampler(ds, 4, seed=3)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, collate_fn=IndexListCollate())
    for step, batch in enumerate(loader):
        assert isinstance(batch["sample_idx"], list)
        assert batch["x"][:, 0].long().tolist() == batch["sample_idx"]  # ids match contents
        sampler.update(batch["sample_idx"], batch["x"][:, 0], step=step)
    sampler.flush()
    assert sampler.table.num_seen > 0
