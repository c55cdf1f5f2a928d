"""Losses measured before training (a scoring pass), in the forms the integrations accept.

A scoring pass of the starting model over the training set gives every sample a loss before the first
draw; ``prime(indices, losses)`` of :class:`~irdro_sampler.IRDROSampler` and
:class:`~irdro_sampler.ShardedIRDROSampler` takes them, and so does the streaming path's table. Trainer
integrations take them as one ``initial_losses`` option (Composer ``IRDRO(initial_losses=...)``, the
Hugging Face ``IRDROTrainer(irdro=dict(initial_losses=...))``); :func:`initial_loss_feedback` turns the
three accepted forms into the ``(indices, losses)`` pair ``prime`` takes, so they mean the same everywhere.

Importing this module imports numpy and torch only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ._validation import as_indices, to_numpy

__all__ = ["PRIME_CHUNK", "InitialLosses", "check_initial_losses", "initial_loss_chunks", "initial_loss_feedback",
           "prime_from"]

#: What ``initial_losses`` may be: ``(indices, losses)``, one loss per sample (NaN: not scored), or the
#: path of a ``.npy`` file holding such a vector (for YAML configs).
InitialLosses = Any


def check_initial_losses(initial_losses: InitialLosses, name: str = "initial_losses") -> None:
    """What can be checked before the data set's size is known: the form, and that a path is a file.
    ``TypeError`` / ``FileNotFoundError`` naming ``name`` and the value."""
    if initial_losses is None or isinstance(initial_losses, tuple):
        if isinstance(initial_losses, tuple) and len(initial_losses) != 2:
            raise TypeError(f"{name}: a tuple must be (indices, losses), got {len(initial_losses)} entries")
        return
    if isinstance(initial_losses, (str, os.PathLike)):
        if not os.path.isfile(initial_losses):
            raise FileNotFoundError(f"{name}: no such file {os.fspath(initial_losses)!r} (a .npy vector of "
                                    "one loss per sample, NaN for samples not scored)")
        return
    if isinstance(initial_losses, (dict, set, bool, int, float)):
        raise TypeError(f"{name} must be (indices, losses), one loss per sample, or a .npy path; got "
                        f"{type(initial_losses).__name__} {initial_losses!r}")


#: Losses per ``prime`` call when priming from a vector or a ``.npy`` file (:func:`initial_loss_chunks`): the
#: float64 copy, the scored ids and their losses in transit stay at 24 bytes x this many samples (100 MB), not
#: 24 bytes per sample of the data set (24 GB at 1e9), and a ``.npy`` file is read a chunk at a time.
PRIME_CHUNK = 1 << 22


def initial_loss_chunks(
    initial_losses: InitialLosses, dataset_size: int, name: str = "initial_losses", chunk_size: int = PRIME_CHUNK
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(indices, losses)`` pairs for successive ``prime`` calls, from one of the accepted forms:

    * ``(indices, losses)``: one pair, passed on as they are (``prime`` validates them);
    * a vector of ``dataset_size`` losses (numpy, torch or a list), NaN for a sample that was not
      scored (left out; it stays unseen and gets the prior): one pair per ``chunk_size`` samples, in order;
    * the path of a ``.npy`` file holding such a vector (what a YAML config can name), memory-mapped and read
      a chunk at a time.

    The form, shape and dtype are checked before the first pair is yielded (a vector of another length or
    shape is a ``ValueError``, another dtype a ``TypeError``, naming ``name``), so a well-formed vector
    cannot fail half-way through priming. The pairs depend only on the losses and ``chunk_size``, so every
    rank that primes from the same losses makes the same calls.
    """
    check_initial_losses(initial_losses, name)
    if initial_losses is None:
        raise TypeError(f"{name} is None: nothing to prime with")
    if isinstance(initial_losses, tuple):
        indices, losses = initial_losses
        pair = as_indices(indices, dataset_size, f"{name}[0] (indices)"), to_numpy(losses, f"{name}[1] (losses)")
        return iter((pair,))
    if isinstance(initial_losses, (str, os.PathLike)):
        try:
            vector = np.load(initial_losses, mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{name}: {os.fspath(initial_losses)!r} is not a .npy array ({err})") from None
    else:
        vector = to_numpy(initial_losses, name)
    if vector.ndim != 1 or vector.shape[0] != dataset_size:
        raise ValueError(f"{name} must hold one loss per sample ({dataset_size}), got shape {tuple(vector.shape)}")
    if vector.dtype == np.bool_ or not (np.issubdtype(vector.dtype, np.floating) or np.issubdtype(vector.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {vector.dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return _vector_chunks(vector, chunk_size)


def _vector_chunks(vector: np.ndarray, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, vector.shape[0], chunk_size):
        values = np.asarray(vector[start : start + chunk_size], dtype=np.float64)
        scored = np.flatnonzero(~np.isnan(values))
        pair = scored + start, values[scored]
        del values, scored  # not held while the caller primes with the pair,
        yield pair
        del pair  # nor the pair while the next one is read


def initial_loss_feedback(
    initial_losses: InitialLosses, dataset_size: int, name: str = "initial_losses"
) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, losses)`` for one ``prime`` call: :func:`initial_loss_chunks` in one piece (the forms, checks
    and errors are the same). The integrations prime chunk by chunk instead, which bounds the memory in transit
    on a large data set; for up to :data:`PRIME_CHUNK` samples the two are the same call."""
    pairs = list(initial_loss_chunks(initial_losses, dataset_size, name, chunk_size=max(1, int(dataset_size))))
    if len(pairs) == 1:
        return pairs[0]
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)  # dataset_size 0: nothing scored


def prime_from(
    prime: Callable[[np.ndarray, np.ndarray], Any], initial_losses: InitialLosses, dataset_size: int,
    name: str = "initial_losses",
) -> None:
    """Call ``prime(indices, losses)`` once per pair of :func:`initial_loss_chunks` (what the integrations do
    with ``initial_losses``)."""
    for indices, losses in initial_loss_chunks(initial_losses, dataset_size, name):
        prime(indices, losses)
