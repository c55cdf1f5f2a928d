"""Sample indices in training batches, and the feedback one batch collects over its microbatches.

Pure functions of batches (dicts, tuples, lists of tensors; no Composer object) plus
:class:`BatchFeedback`, the per-batch record that :class:`~irdro_sampler.integrations.composer.IRDRO`
keeps between ``AFTER_DATALOADER`` and ``BATCH_END``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

__all__ = ["BatchFeedback", "batch_indices", "num_rows", "split_off_indices", "without_key"]


def without_key(batch: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``batch`` without ``key``, of the same mapping type where it can be copied (dict, BatchEncoding)."""
    if isinstance(batch, MutableMapping):
        out = copy.copy(batch)
        del out[key]
        return out
    return {k: v for k, v in batch.items() if k != key}


def num_rows(batch: Any) -> int | None:
    """Leading size of the first tensor in a (micro)batch: its number of samples (None if no tensor)."""
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    return None


def batch_indices(batch: Any, index_key: str | int, *, tuple_index_last: bool, missing_help: str) -> torch.Tensor:
    """The sample indices a batch carries: a 1-D integer tensor (as found, not copied).

    Dict batches hold them under ``index_key`` (a str); tuple/list batches at position ``index_key``
    (an int), or last when ``tuple_index_last`` (what ``IndexedDataset`` appends). A missing index is
    a ``KeyError`` whose message ends with ``missing_help`` (the fed target's advice: what lost it and
    how to put it back); indices that are not 1-D integers are a ``TypeError``.
    """
    key = index_key
    if isinstance(batch, Mapping):
        if not (isinstance(key, str) and key in batch):
            raise KeyError(f"IRDRO: the batch has no index key {key!r} (keys: {sorted(map(str, batch))}){missing_help}")
        idx = batch[key]
    elif isinstance(batch, (tuple, list)):
        if isinstance(key, int):
            idx = batch[key]
        elif tuple_index_last:
            idx = batch[-1]
        else:
            raise KeyError(
                f"IRDRO: tuple batch and index_key={key!r}: wrap the dataset in irdro_sampler.IndexedDataset "
                "(appends the index as the last element) or set IRDRO(index_key=<position>)"
            )
    else:
        raise TypeError(f"IRDRO: cannot find sample indices in a batch of type {type(batch).__name__}")
    if not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(idx)
    if idx.ndim != 1 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError(
            f"IRDRO: the batch's sample indices ({key!r}) must be a 1-D integer tensor, "
            f"got dtype {idx.dtype} and shape {tuple(idx.shape)}"
        )
    return idx


def split_off_indices(
    batch: Any, index_key: str | int, *, tuple_index_last: bool, missing_help: str
) -> tuple[torch.Tensor, Any]:
    """``(indices, batch without them)``: the indices as CPU int64 (see :func:`batch_indices`), and the
    batch of the same kind (dict type kept, tuple stays tuple) with the index entry removed."""
    indices = batch_indices(batch, index_key, tuple_index_last=tuple_index_last, missing_help=missing_help)
    indices = indices.detach().to("cpu", torch.int64)
    if isinstance(batch, Mapping):
        return indices, without_key(batch, str(index_key))
    pos = (index_key if isinstance(index_key, int) else -1) % len(batch)
    rest = [x for i, x in enumerate(batch) if i != pos]
    return indices, tuple(rest) if isinstance(batch, tuple) else rest


class BatchFeedback:
    """One training batch's sample indices and the per-sample losses its microbatches produced.

    Contract: :meth:`start` records the batch's indices (at ``AFTER_DATALOADER``); :meth:`restart`
    forgets collected losses and rewinds the microbatch cursor (every train-batch attempt: an OOM
    retry or an optimizer closure reruns all microbatches, and must not count twice); each
    :meth:`next_indices` hands out the next consecutive slice (microbatches are consecutive slices of
    the batch, in order); :meth:`add` collects a microbatch's ``(indices, losses)``; :meth:`take`
    returns everything collected, concatenated, and empties the record.
    """

    def __init__(self) -> None:
        #: The current batch's sample indices (CPU int64), or None when the batch carried none.
        self.indices: torch.Tensor | None = None
        self._cursor = 0
        self._idx_parts: list[torch.Tensor] = []
        self._loss_parts: list[torch.Tensor] = []

    def start(self, indices: torch.Tensor | None) -> None:
        self.indices = indices

    def restart(self) -> None:
        self._cursor = 0
        self._idx_parts.clear()
        self._loss_parts.clear()

    def next_indices(self, size: int) -> torch.Tensor:
        """The next ``size`` recorded indices; ``ValueError`` when fewer are left."""
        assert self.indices is not None
        start, end = self._cursor, self._cursor + size
        if end > self.indices.numel():
            raise ValueError(
                f"IRDRO: loss_fn returned {size} losses for a microbatch, but only "
                f"{self.indices.numel() - start} of the batch's {self.indices.numel()} sample "
                "indices are left; loss_fn must return one loss per sample of the microbatch"
            )
        self._cursor = end
        return self.indices[start:end]

    def add(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        self._idx_parts.append(indices.detach())
        self._loss_parts.append(losses.detach().float())

    def take(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """All collected ``(indices int64, losses float32)`` on ``device``, in microbatch order; empties."""
        if self._idx_parts:
            idx = torch.cat(self._idx_parts).to(device)
            loss = torch.cat(self._loss_parts).to(device)
        else:
            idx = torch.zeros(0, dtype=torch.int64, device=device)
            loss = torch.zeros(0, dtype=torch.float32, device=device)
        self._idx_parts.clear()
        self._loss_parts.clear()
        return idx, loss
