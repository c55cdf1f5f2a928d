"""The weighted streaming dataset's part of a checkpoint: the ``"irdro"`` entry, and weight checks.

``WeightedStreamingDataset.state_dict`` returns streaming's resume state plus an ``"irdro"`` entry
(:func:`irdro_entry`); ``load_state_dict`` splits and checks both (:func:`read_state`) before anything
is restored. The format (version 2; version 1 had no ``draws``/``carry``) is unchanged by this module's
split from ``streaming.py``: states saved before load as they did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from irdro_sampler._validation import state_entry, state_int

__all__ = ["STATE_VERSION", "RoundIdentity", "SavedRound", "as_weight_vector", "irdro_entry", "read_state"]

#: Version written in the ``"irdro"`` entry.
STATE_VERSION = 2


def _saved_float64(value: Any) -> np.ndarray:
    """A vector from a state dict (torch tensor or array-like) as float64, bit for bit."""
    return np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value, np.float64)


def as_weight_vector(weights: Any, num_samples: int) -> np.ndarray:
    """Validate ``weights`` and return them normalized to float64 probabilities (a new array).

    ``TypeError`` for a non-real array, ``ValueError`` (naming the first bad entry) for a wrong shape,
    NaN/inf, negative entries, an all-zero vector or a sum that overflows.
    """
    if isinstance(weights, torch.Tensor):
        arr = weights.detach().cpu().numpy()
    else:
        try:
            arr = np.asarray(weights)
        except Exception as e:  # noqa: BLE001 - re-raised with the argument named
            raise TypeError(f"weights: expected a 1-D array or tensor of floats, got {type(weights)!r}") from e
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"weights: expected a real-valued array, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != num_samples:
        raise ValueError(
            f"weights: expected shape ({num_samples},) (one weight per sample of the dataset), got {arr.shape}"
        )
    arr = arr.astype(np.float64, copy=True)
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"weights: {int(bad.sum())} entries are NaN or inf (first at index {i}: {arr[i]})")
    neg = arr < 0
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        raise ValueError(f"weights: {int(neg.sum())} entries are negative (first at index {i}: {arr[i]})")
    total = float(arr.sum())
    if not total > 0.0:
        raise ValueError("weights: all weights are zero; at least one sample must have positive weight")
    if not math.isfinite(total):
        raise ValueError("weights: the sum of the weights overflows float64; rescale them")
    arr /= total
    return arr


@dataclass(frozen=True)
class SavedRound:
    """A checked ``"irdro"`` entry: what :meth:`SharedRoundState.restore` loads.

    ``frozen`` (for ``frozen_round``) and ``pending`` are float64 probabilities restored bit for bit
    (at least one is set); ``carry`` is the carried-rounding carry at the start of ``carry_round``
    (None: the seeded initial phases).
    """

    frozen: np.ndarray | None
    frozen_round: int
    pending: np.ndarray | None
    carry: np.ndarray | None
    carry_round: int


@dataclass(frozen=True)
class RoundIdentity:
    """What a saved state must match to resume exactly: the dataset's size and round options."""

    num_samples: int
    round_size: int
    seed: int
    draws: str


def irdro_entry(
    identity: RoundIdentity,
    frozen_round: int,
    frozen: torch.Tensor | None,
    pending: torch.Tensor | None,
    carry_round: int,
    carry: torch.Tensor | None,
) -> dict[str, Any]:
    """The ``"irdro"`` entry of a state dict (see ``WeightedStreamingDataset.state_dict``)."""
    return {
        "version": STATE_VERSION,
        "num_samples": int(identity.num_samples),
        "round_size": int(identity.round_size),
        "seed": int(identity.seed),
        "draws": identity.draws,
        "frozen_round": frozen_round if frozen is not None else -1,
        "frozen_weights": frozen,
        "pending_weights": pending,
        "carry_round": carry_round,
        "carry": carry,
    }


def _check_identity(ir: dict[str, Any], identity: RoundIdentity) -> None:
    n = identity.num_samples
    if int(ir["num_samples"]) != n:
        raise ValueError(f"obj: saved for a dataset of {ir['num_samples']} samples, this one has {n}")
    if int(ir["round_size"]) != identity.round_size or int(ir["seed"]) != identity.seed:
        raise ValueError(
            f"obj: saved with round_size={ir['round_size']}, seed={ir['seed']}; this dataset has "
            f"round_size={identity.round_size}, seed={identity.seed}; exact resumption needs the same"
        )
    saved_draws = ir.get("draws", "iid")  # version 1 knew only i.i.d. draws
    if saved_draws != identity.draws:
        raise ValueError(
            f"obj: saved with draws={saved_draws!r}, this dataset has draws={identity.draws!r}; exact "
            f"resumption needs the same (construct it with draws={saved_draws!r})"
        )


def _saved_weights(ir: dict[str, Any], n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    frozen = ir.get("frozen_weights")
    pending = ir.get("pending_weights")
    frozen_np = None if frozen is None else as_weight_vector(frozen, n)
    pending_np = None if pending is None else as_weight_vector(pending, n)
    if frozen_np is None and pending_np is None:
        raise ValueError("obj: the 'irdro' entry holds no weights")
    # Bitwise restore: the vectors were normalized when set; re-normalizing could change the last bit.
    if frozen is not None:
        frozen_np = _saved_float64(frozen)
    if pending is not None:
        pending_np = _saved_float64(pending)
    for name, vec in (("frozen_weights", frozen_np), ("pending_weights", pending_np)):
        if vec is not None and abs(float(vec.sum()) - 1.0) > 1e-9:
            raise ValueError(f"obj: '{name}' must be probabilities summing to 1, got sum {float(vec.sum())!r}")
    return frozen_np, pending_np


def read_state(obj: Any, identity: RoundIdentity) -> tuple[dict[str, Any], SavedRound]:
    """Split a saved state into streaming's part and the checked ``"irdro"`` entry.

    Raises ``TypeError`` if ``obj`` is no dict and ``ValueError`` naming the entry for anything else
    (missing, mistyped, saved for another dataset size, round size, seed or draw scheme); ``obj`` is
    not modified.
    """
    if not isinstance(obj, dict):
        raise TypeError(f"obj: expected the dict returned by state_dict, got {type(obj)!r}")
    obj = dict(obj)
    ir = obj.pop("irdro", None)
    if ir is None:
        raise ValueError(
            "obj: no 'irdro' entry; this state was not saved by WeightedStreamingDataset, so the round "
            "weights cannot be restored"
        )
    n = identity.num_samples
    state_int(obj, "epoch", "obj", minimum=0)
    state_int(obj, "sample_in_epoch", "obj", minimum=0, maximum=identity.round_size)
    for key in ("num_samples", "round_size", "seed"):
        state_int(ir, key, "obj['irdro']", minimum=0)
    frozen_round = state_int(ir, "frozen_round", "obj['irdro']", minimum=-1)
    carry_round = state_int(ir, "carry_round", "obj['irdro']", minimum=-1) if "carry_round" in ir else -1
    state_entry(ir, "frozen_weights", "obj['irdro']")
    state_entry(ir, "pending_weights", "obj['irdro']")
    _check_identity(ir, identity)
    carry = ir.get("carry")
    carry_np = None
    if carry is not None:
        if not isinstance(carry, torch.Tensor | np.ndarray):
            raise ValueError(f"obj: 'carry' must be a tensor, got {type(carry).__name__}")
        carry_np = _saved_float64(carry)
        if carry_np.shape != (n,) or not np.isfinite(carry_np).all() or carry_round < 0:
            raise ValueError(f"obj: 'carry' must hold {n} finite values, got shape {carry_np.shape}")
    frozen_np, pending_np = _saved_weights(ir, n)
    return obj, SavedRound(frozen_np, frozen_round, pending_np, carry_np, carry_round)
