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
from typing import Any

import numpy as np

from ._validation import as_indices, to_numpy

__all__ = ["InitialLosses", "check_initial_losses", "initial_loss_feedback"]

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


def initial_loss_feedback(
    initial_losses: InitialLosses, dataset_size: int, name: str = "initial_losses"
) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, losses)`` for ``prime`` from one of the accepted forms:

    * ``(indices, losses)``: passed on as they are (``prime`` validates them);
    * a vector of ``dataset_size`` losses (numpy, torch or a list), NaN for a sample that was not
      scored (left out; it stays unseen and gets the prior);
    * the path of a ``.npy`` file holding such a vector (what a YAML config can name).

    A vector of another length, or of another shape, is a ``ValueError`` naming ``name`` and the shape.
    """
    check_initial_losses(initial_losses, name)
    if initial_losses is None:
        raise TypeError(f"{name} is None: nothing to prime with")
    if isinstance(initial_losses, tuple):
        indices, losses = initial_losses
        return as_indices(indices, dataset_size, f"{name}[0] (indices)"), to_numpy(losses, f"{name}[1] (losses)")
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
    values = np.asarray(vector, dtype=np.float64)
    scored = np.flatnonzero(~np.isnan(values))
    return scored, values[scored]
