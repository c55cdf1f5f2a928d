"""Argument checks shared by the core classes.

Every public entry point validates its input completely before it changes any state, so a rejected
call leaves the object exactly as it was. Errors name the argument and show the offending value.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

try:  # torch is a hard dependency, but keep the checks importable without it for tooling
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]

# Group ids are stored as uint16 (2 bytes per sample).
MAX_GROUPS = 1 << 16
# Steps are stored as int32 in the loss table (4 bytes per sample instead of 8).
MAX_STEP = 2**31 - 1
# Running losses are stored as float32: a finite float64 loss above this would become inf in the table.
MAX_LOSS = float(np.finfo(np.float32).max)


def to_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` (array-like, list, or torch tensor on any device) as a 1-D numpy array."""
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.is_floating_point() and x.dtype not in (torch.float16, torch.float32, torch.float64):
            x = x.to(torch.float32)  # bfloat16 / float8 have no numpy dtype; float32 holds them exactly
        x = x.numpy()
    arr = np.asarray(x)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    return arr


def as_indices(indices: Any, num_samples: int, name: str = "indices") -> np.ndarray:
    """Validate sample indices: integers in ``[0, num_samples)``; returns an int64 copy."""
    arr = to_numpy(indices, name)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=True)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= num_samples:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} must lie in [0, {num_samples}), got {bad}")
    return arr


def as_groups(groups: Any, num_samples: int, name: str = "groups") -> np.ndarray:
    """Validate per-sample group ids: ``num_samples`` integers in ``[0, 65536)``; returns uint16."""
    arr = to_numpy(groups, name)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.size != num_samples:
        raise ValueError(f"{name} must have one id per sample ({num_samples}), got {arr.size}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= MAX_GROUPS):
        bad = int(arr.min()) if int(arr.min()) < 0 else int(arr.max())
        raise ValueError(f"{name} must lie in [0, 65536), got {bad}")
    return arr.astype(np.uint16)


def batch_losses(indices: Any, losses: Any, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Check indices and their losses (1-D, equal length, real numbers); returns ``(int64, float64)`` copies."""
    idx = as_indices(indices, num_samples, "indices")
    val = to_numpy(losses, "losses")
    if not (np.issubdtype(val.dtype, np.floating) or np.issubdtype(val.dtype, np.integer)) or val.dtype == np.bool_:
        raise TypeError(f"losses must be real numbers, got dtype {val.dtype}")
    if val.shape != idx.shape:
        raise ValueError(f"indices and losses must have the same length, got {idx.shape[0]} and {val.shape[0]}")
    return idx, val.astype(np.float64, copy=True)


def validate_feedback(indices: Any, losses: Any, num_samples: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Check one feedback call and drop non-finite losses.

    Returns ``(indices int64, losses float64, num_skipped)``. NaN and +-inf losses are not errors
    (a diverging sample should not crash training) but they are never stored: they are removed
    here and counted by the caller. So are finite losses whose magnitude exceeds float32's range
    (:data:`MAX_LOSS`, about 3.4e38): the table stores float32, where they would become inf.
    """
    idx, val = batch_losses(indices, losses, num_samples)
    finite = np.abs(val) <= MAX_LOSS  # False for NaN and +-inf too
    skipped = int(finite.size - finite.sum())
    if skipped:
        idx, val = idx[finite], val[finite]
    return idx, val, skipped


def check_step(step: Any, name: str = "step") -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        if torch is not None and isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
            step = int(step.item())
        else:
            raise TypeError(f"{name} must be an int, got {step!r}")
    step = int(step)
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"{name} must lie in [0, {MAX_STEP}], got {step}")
    return step


def check_positive(value: Any, name: str, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_fraction(value: Any, name: str, *, low_open: bool, high_open: bool, allow_none: bool = False):
    """Check ``value`` lies in the unit interval with the given open/closed ends."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    ok_low = value > 0 if low_open else value >= 0
    ok_high = value < 1 if high_open else value <= 1
    if not (ok_low and ok_high):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return value


def check_int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def as_loss_vector(losses: Any, name: str = "losses") -> np.ndarray:
    """A non-empty finite float64 vector (for the pure weight functions)."""
    arr = to_numpy(losses, name).astype(np.float64)
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(arr)):
        bad = arr[~np.isfinite(arr)][0]
        raise ValueError(f"{name} must be finite, got {bad}")
    return arr


# ------------------------------------------------------------------------------------ saved states
def state_entry(state: Any, key: str, where: str) -> Any:
    """``state[key]``; ``ValueError`` naming ``where`` if ``state`` is no dict or lacks ``key``."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(state).__name__}")
    if key not in state:
        raise ValueError(f"{where} is missing the entry {key!r}")
    return state[key]


def state_int(state: Any, key: str, where: str, *, minimum: int, maximum: int | None = None) -> int:
    """An int entry of a saved state within ``[minimum, maximum]`` (a 0-d integer tensor is accepted)."""
    value = state_entry(state, key, where)
    if torch is not None and isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where}[{key!r}] must be an int, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{where}[{key!r}] must be {allowed}, got {value}")
    return value


def state_array(value: Any, name: str, *, kind: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A saved array (torch tensor or numpy array) as a numpy copy, checked for ``kind`` and ``shape``.

    ``kind`` is ``"int"`` (integer dtypes) or ``"float"`` (floating dtypes; bfloat16 becomes float32).
    Lists and other objects are refused: a state_dict stores tensors.
    """
    if torch is not None and isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dtype not in (torch.float16, torch.float32, torch.float64):
            value = value.to(torch.float32)
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a {kind} tensor, got dtype {value.dtype}")
        arr = value.detach().cpu().numpy().copy()
    elif isinstance(value, np.ndarray):
        arr = value.copy()
    else:
        raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
    ok = np.issubdtype(arr.dtype, np.integer) if kind == "int" else np.issubdtype(arr.dtype, np.floating)
    if not ok:
        raise ValueError(f"{name} must hold {kind}s, got dtype {arr.dtype}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(arr.shape)}")
    return arr


def check_range(arr: np.ndarray, name: str, low: float, high: float) -> None:
    """Every entry of ``arr`` in ``[low, high]`` (NaN fails); the error shows the first offender."""
    with np.errstate(invalid="ignore"):
        bad = ~((arr >= low) & (arr <= high))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must lie in [{low:.8g}, {high:.8g}], got {arr[i].item()!r} at position {i}")
