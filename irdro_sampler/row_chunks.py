"""Chunked access to the memory-mapped rows of a saved loss table (for :mod:`irdro_sampler.sharded_state`).

A row file loaded with ``torch.load(..., mmap=True)`` costs no memory until its rows are read; then
each page read stays resident (and counts in the process's RSS) until the mapping goes away. Reading
it chunk by chunk and releasing the pages behind each chunk (:func:`release_pages`) keeps a load's
footprint at the table it fills plus one chunk, whatever N.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from typing import Any

import numpy as np
import torch

_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim the pages now; never loses data (file pages are read again)
_PAGE = mmap.PAGESIZE
_libc: Any = None


def row_chunk(tensor: torch.Tensor, a: int, z: int) -> np.ndarray:
    """Rows ``[a, z)`` of a 1-d tensor as numpy, without a copy where numpy has the dtype (bfloat16: float32)."""
    part = tensor[a:z]
    return (part.to(torch.float32) if part.dtype == torch.bfloat16 else part).numpy()


def release_pages(*tensors: torch.Tensor) -> None:
    """Ask the kernel to reclaim the whole pages under ``tensors`` (``madvise(MADV_PAGEOUT)``): meant for
    memory-mapped file rows already read. Safe on any memory (the advice never discards data: file pages
    are read again from the file, anonymous ones stay or are swapped); a no-op where unsupported."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return
    for t in tensors:
        addr = t.data_ptr()
        first = -(-addr // _PAGE) * _PAGE  # whole pages inside the tensor only
        last = (addr + t.numel() * t.element_size()) // _PAGE * _PAGE
        if last > first:
            _libc.madvise(first, last - first, _MADV_PAGEOUT)  # failure (old kernel): pages just stay


def copy_rows(table: Any, pieces: list[tuple[int, int, int, dict[str, torch.Tensor]]], start: int, chunk: int) -> int:
    """Copy checked saved rows into ``table`` (a :class:`~irdro_sampler.loss_table.LossTable` over ids from
    ``start``), ``chunk`` rows at a time; unseen rows (count 0) get NaN losses. ``pieces``: ``(lo, hi,
    first, arrays)``, ids ``[lo, hi)`` of the saved arrays of ids from ``first``; arrays without
    ``first_losses`` (files before them) give first losses equal to the running losses. Returns the seen rows."""
    seen_rows = 0
    for lo, hi, first, arrays in pieces:
        for a in range(lo - first, hi - first, chunk):
            z = min(a + chunk, hi - first)
            dst = slice(first + a - start, first + z - start)
            losses, counts, last_step = (row_chunk(arrays[k], a, z) for k in ("losses", "counts", "last_step"))
            np.copyto(table.counts[dst], counts, casting="unsafe")  # checked in [0, 2**32)
            np.copyto(table.last_step[dst], last_step, casting="unsafe")  # checked in [-1, 2**31)
            np.copyto(table.losses[dst], losses, casting="unsafe")
            unseen = table.counts[dst] == 0
            table.losses[dst][unseen] = np.nan
            if table.first_losses is not None:
                first_losses = row_chunk(arrays["first_losses"], a, z) if "first_losses" in arrays else losses
                np.copyto(table.first_losses[dst], first_losses, casting="unsafe")
                table.first_losses[dst][unseen] = np.nan
            seen_rows += int(unseen.size - np.count_nonzero(unseen))
            release_pages(*(arrays[k][a:z] for k in arrays))
    return seen_rows
