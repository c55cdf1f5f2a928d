"""Samples that carry their own index, so a training loop can report per-sample losses.

:class:`IndexedDataset` adds the index to each sample; :class:`IndexListCollate` keeps the indices of a
batch out of the shared-memory tensor transfer that DataLoader workers use.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from torch.utils.data import Dataset, default_collate


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


class IndexListCollate:
    """A collate function for dict samples that keeps the sample indices a plain ``list`` of ints.

    ``IndexListCollate(collate_fn)(samples)`` is ``collate_fn`` applied to the samples without
    ``index_key``, plus ``batch[index_key] = [s[index_key] for s in samples]``.

    Why: with DataLoader workers every tensor of a batch reaches the main process through its own
    shared-memory transfer; under torch's default ``file_descriptor`` sharing strategy that is a file
    descriptor sent over a socket, about 1-2 ms per tensor on a small VM, which the default collate
    would spend once more per batch on a 64-element index tensor. A list of ints is pickled with the
    batch instead (see ``benchmarks/bench_streaming_ipc.py``). ``IRDROSampler.update`` and the Composer
    ``IRDRO`` algorithm accept the list, and Composer splits it into microbatches like a tensor.

    Only for batches of dict samples (what ``WeightedStreamingDataset``, ``as_map_dataset`` and
    ``IndexedDataset`` over dict samples produce); the class is picklable, so it also works with the
    ``spawn`` and ``forkserver`` worker start methods.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] = default_collate, index_key: str = "sample_idx") -> None:
        if not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable, got {collate_fn!r}")
        self.collate_fn = collate_fn
        self.index_key = index_key

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> Any:
        key = self.index_key
        indices, rest = [], []
        for sample in samples:
            if not isinstance(sample, Mapping) or key not in sample:
                raise TypeError(
                    f"IndexListCollate(index_key={key!r}) needs dict samples that hold {key!r}; got "
                    f"{type(sample).__name__}" + (f" with keys {sorted(map(str, sample))}" if isinstance(sample, Mapping) else "")
                )
            try:
                indices.append(operator.index(sample[key]))  # ints, numpy ints and 0-d integer tensors
            except TypeError:
                raise TypeError(f"IndexListCollate: sample {key!r} must be an integer, got {sample[key]!r}") from None
            rest.append({k: v for k, v in sample.items() if k != key})
        batch = self.collate_fn(rest)
        if not isinstance(batch, MutableMapping):
            raise TypeError(
                f"IndexListCollate: collate_fn must return a mutable mapping for dict samples, got {type(batch).__name__}"
            )
        batch[key] = indices
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}(collate_fn={self.collate_fn!r}, index_key={self.index_key!r})"
