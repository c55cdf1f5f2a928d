"""Whole batches for a DataLoader: ``DataLoader(dataset, batch_sampler=IRDROBatchSampler(sampler))``."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler

from .sampler import IRDROSampler


class IRDROBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches of an :class:`IRDROSampler`, one list of indices per batch.

    The same indices in the same order as ``DataLoader(dataset, sampler=sampler,
    batch_size=sampler.batch_size)`` (the same order contract: batch ``j + 1`` is drawn only when the
    DataLoader asks for it), but a batch is handed over as one list instead of one index at a time.
    ``len()`` is the number of batches per epoch; :meth:`set_epoch` and :meth:`set_start_batch` pass
    through to the sampler, which keeps all the state (save ``sampler.state_dict()``).
    """

    def __init__(self, sampler: IRDROSampler) -> None:
        if not isinstance(sampler, IRDROSampler):
            raise TypeError(f"sampler must be an IRDROSampler, got {type(sampler).__name__}")
        self.sampler = sampler

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.sampler.iter_batches():
            yield batch.tolist()

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def set_start_batch(self, batch_in_epoch: int) -> None:
        self.sampler.set_start_batch(batch_in_epoch)
