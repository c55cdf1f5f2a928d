"""IndexedDataset: samples that carry their own index, so a training loop can report per-sample losses."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wrap a map-style data set so each sample carries its index.

    * a mapping sample ``{...}`` becomes ``{..., index_key: i}`` (a new dict; the key must not exist);
    * a tuple or list sample ``(x, y)`` becomes ``(x, y, i)`` (the index is always last);
    * any other sample ``x`` becomes ``(x, i)``.

    With the default collate function the indices arrive in the batch as an int64 tensor
    (``batch["sample_idx"]`` or ``batch[-1]``), ready for ``IRDROSampler.update``.
    """

    def __init__(self, dataset: Any, index_key: str = "sample_idx") -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be map-style (with __getitem__ and __len__), got {type(dataset).__name__}")
        self.dataset = dataset
        self.index_key = index_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        index = operator.index(index)  # an int (numpy and 0-d tensor indices too); TypeError otherwise
        sample = self.dataset[index]
        if isinstance(sample, Mapping):
            if self.index_key in sample:
                raise KeyError(f"sample {index} already has a key {self.index_key!r}; pass another index_key")
            return {**sample, self.index_key: index}
        if isinstance(sample, (tuple, list)):
            return (*sample, index)
        return (sample, index)
