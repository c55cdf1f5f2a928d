"""IndexedDataset: every sample carries its index, in the documented form, through default collate."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from irdro_sampler import IndexedDataset, IRDROSampler


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
