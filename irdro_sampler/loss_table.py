"""The running loss of every training sample."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from ._validation import check_fraction, check_step, validate_feedback


class LossTable:
    """Running per-sample losses: an exponential moving average, plus when and how often each was seen.

    Memory is 12 bytes per sample: ``losses`` (float32, NaN while unseen), ``counts`` (uint32, saturating)
    and ``last_step`` (int32, -1 while unseen).

    Args:
        num_samples: size of the data set.
        ema: weight of the *old* value in ``running = ema * running + (1 - ema) * new``; ``0`` keeps
            the last value. The first observation of a sample is stored as is.
        prior: running loss assumed for unseen samples: ``"mean"`` (the mean of the seen losses,
            recomputed when the sampler refreshes its weights) or a fixed number.

    Feedback (:meth:`update`) is validated in full before anything changes. Non-finite losses are
    skipped and counted in :attr:`num_skipped`; several losses for the same index in one call are
    averaged (in a fixed order, so the result does not depend on the order of the call's entries
    beyond float rounding of the sum, which is itself deterministic).
    """

    def __init__(self, num_samples: int, *, ema: float = 0.5, prior: float | str = "mean") -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        self.num_samples = int(num_samples)
        self.ema = check_fraction(ema, "ema", low_open=False, high_open=True)
        if isinstance(prior, str):
            if prior != "mean":
                raise ValueError(f"prior must be 'mean' or a finite number, got {prior!r}")
        elif isinstance(prior, bool) or not isinstance(prior, numbers.Real) or not math.isfinite(prior):
            raise ValueError(f"prior must be 'mean' or a finite number, got {prior!r}")
        self.prior = prior if isinstance(prior, str) else float(prior)
        self.losses = np.full(self.num_samples, np.nan, dtype=np.float32)
        # np.full, not np.zeros: touch the pages now rather than page-faulting them in one at a time
        # under random updates (at N = 1e8 that made the first steps ~50x slower).
        self.counts = np.full(self.num_samples, 0, dtype=np.uint32)
        self.last_step = np.full(self.num_samples, -1, dtype=np.int32)
        self.num_seen = 0
        self.num_skipped = 0

    def __len__(self) -> int:
        return self.num_samples

    # -- feedback -------------------------------------------------------------------------------------
    def update(self, indices: Any, losses: Any, step: int = 0) -> np.ndarray:
        """Record per-sample losses observed at ``step``; returns the distinct indices updated."""
        idx, val, skipped = validate_feedback(indices, losses, self.num_samples)
        step = check_step(step)
        self.num_skipped += skipped
        return self.apply_validated(idx, val, step)

    def apply_validated(self, indices: np.ndarray, losses: np.ndarray, step: int) -> np.ndarray:
        """:meth:`update` for input already checked by ``validate_feedback`` (the sampler's path)."""
        return self._apply(indices, losses, step)[0]

    def _apply(self, indices: np.ndarray, losses: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Apply checked feedback; returns (sorted distinct indices, their old and new float32 losses).

        One stable sort serves both the duplicate averaging and the caller (sorted indices make the
        scattered reads and writes of 1e8-entry arrays about twice as cache friendly).
        """
        if indices.size == 0:
            empty = np.zeros(0, dtype=np.float32)
            return indices, empty, empty
        order, srt = _stable_order(indices, self.num_samples)
        first = np.empty(srt.size, dtype=bool)
        first[0] = True
        np.not_equal(srt[1:], srt[:-1], out=first[1:])
        uniq = srt[first]
        if uniq.size == srt.size:
            mean = losses[order]
        else:
            # Sum in input order within each index (stable sort), as np.bincount would.
            group = np.cumsum(first) - 1
            mean = np.bincount(group, weights=losses[order]) / np.bincount(group)
        old = self.losses[uniq]
        old64 = old.astype(np.float64)
        seen = ~np.isnan(old64)
        new = np.where(seen, self.ema * old64 + (1.0 - self.ema) * mean, mean).astype(np.float32)
        self.losses[uniq] = new
        counts = self.counts[uniq]
        counts += counts != np.iinfo(np.uint32).max  # saturating increment
        self.counts[uniq] = counts
        self.last_step[uniq] = step
        self.num_seen += int(uniq.size - np.count_nonzero(seen))
        return uniq, old, new

    # -- views ----------------------------------------------------------------------------------------
    def seen(self) -> np.ndarray:
        return self.counts > 0

    def prior_value(self, sample: np.ndarray | None = None) -> float:
        """The prior loss: the fixed prior, or the mean seen loss (of ``sample`` if given); 0 if none seen."""
        if not isinstance(self.prior, str):
            return self.prior
        if sample is None:
            sample = self.losses[~np.isnan(self.losses)]
        return float(np.mean(sample, dtype=np.float64)) if sample.size else 0.0

    def effective_losses(self, prior: float | None = None) -> np.ndarray:
        """Running losses as float64 with unseen samples filled with ``prior`` (default :meth:`prior_value`)."""
        out = self.losses.astype(np.float64)
        out[np.isnan(out)] = self.prior_value() if prior is None else prior
        return out

    def mean_loss(self) -> float:
        """Mean running loss over seen samples (NaN if none)."""
        return float(np.nanmean(self.losses, dtype=np.float64)) if self.num_seen else math.nan

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The table as tensors and primitives. Unseen samples (``counts == 0``) are saved as loss 0.0,
        not NaN: NaN != NaN would make two identical states compare unequal (``allclose`` at zero
        tolerance, ``torch.equal``); :meth:`load_state_dict` restores NaN from the counts."""
        return {
            "num_samples": self.num_samples,
            "ema": self.ema,
            "prior": self.prior,
            "losses": torch.from_numpy(np.where(self.counts > 0, self.losses, np.float32(0.0))),
            "counts": torch.from_numpy(self.counts.astype(np.int64)),
            "last_step": torch.from_numpy(self.last_step.copy()),
            "num_skipped": self.num_skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a table of the same size; ``ValueError`` (and no change) on a size mismatch."""
        n = int(state["num_samples"])
        if n != self.num_samples:
            raise ValueError(
                f"state_dict['num_samples'] is {n} but this table has num_samples={self.num_samples}: "
                "the state comes from a data set of a different size"
            )
        losses = _array(state["losses"], np.float32, n, "losses")
        counts = _array(state["counts"], np.uint32, n, "counts")
        last_step = _array(state["last_step"], np.int32, n, "last_step")
        losses[counts == 0] = np.nan  # unseen is marked by the count (saved as 0.0; older states hold NaN)
        self.ema = float(state["ema"])
        self.prior = state["prior"]
        self.losses, self.counts, self.last_step = losses, counts, last_step
        self.num_seen = int(np.count_nonzero(counts))
        self.num_skipped = int(state.get("num_skipped", 0))


def _stable_order(indices: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """``order = argsort(indices, kind="stable")`` and ``indices[order]``, for indices in ``[0, bound)``.

    Packs (index, position) into one int64 key and sorts the keys: ~6x faster than a stable argsort
    (numpy sorts plain int64 with SIMD; its stable argsort is a merge sort).
    """
    shift = max(1, (indices.size - 1).bit_length())
    if bound > (1 << (62 - shift)):
        order = np.argsort(indices, kind="stable")
        return order, indices[order]
    key = indices << shift
    key |= np.arange(indices.size, dtype=np.int64)
    key.sort()
    order = key & ((1 << shift) - 1)
    key >>= shift
    return order, key


def _array(value: Any, dtype: Any, n: int, name: str) -> np.ndarray:
    arr = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.shape != (n,):
        raise ValueError(f"state_dict['{name}'] must have shape ({n},), got {tuple(arr.shape)}")
    return arr.astype(dtype, copy=True)
