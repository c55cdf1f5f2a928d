"""The running loss of every training sample."""

from __future__ import annotations

import hashlib
import math
import numbers
from typing import Any

import numpy as np
import torch

from ._validation import (
    MAX_LOSS,
    MAX_STEP,
    as_groups,
    check_fraction,
    check_range,
    check_step,
    state_array,
    state_entry,
    state_int,
    validate_feedback,
)

#: The running loss keeps this weight on its old value (0 keeps only the last loss).
DEFAULT_EMA = 0.5
#: Unseen samples take the mean seen loss.
DEFAULT_PRIOR = "mean"


def prior_value(prior: float | str, seen_losses: np.ndarray | None) -> float:
    """The loss unseen samples take: a fixed ``prior``, or (``"mean"``) the mean of ``seen_losses`` (0 if none)."""
    if not isinstance(prior, str):
        return prior
    return float(np.mean(seen_losses, dtype=np.float64)) if seen_losses.size else 0.0


class LossTable:
    """Running per-sample losses: an exponential moving average, plus when and how often each was seen.

    Memory is 16 bytes per sample: ``losses`` (float32, NaN while unseen), ``counts`` (uint32, saturating),
    ``last_step`` (int32, -1 while unseen) and ``first_losses`` (float32; 12 bytes without them).

    Args:
        dataset_size: N, the number of samples in the data set.
        ema: weight of the *old* value in ``running = ema * running + (1 - ema) * new``; ``0`` keeps
            the last value. The first observation of a sample is stored as is.
        prior: running loss assumed for unseen samples: ``"mean"`` (the mean of the seen losses,
            recomputed when the sampler refreshes its weights) or a fixed number.
        groups: optional group id of every sample (ints in ``[0, 65536)``, e.g. class labels or data
            sources). The cut then judges each sample against its own group (see
            :class:`~irdro_sampler.DROWeighting`). Stored as uint16: 2 more bytes per sample.
        track_first_losses: keep ``first_losses`` (float32, the loss of each sample's first observation,
            NaN while unseen): the training-dynamics signal of ``DROWeighting(cut_learned_ratio=...)``, on by
            default. Samplers keep them only when their rule gates on them.

    Feedback (:meth:`update`) is validated in full before anything changes. Non-finite losses are
    skipped and counted in :attr:`num_skipped`; several losses for the same index in one call are
    averaged (in a fixed order, so the result does not depend on the order of the call's entries
    beyond float rounding of the sum, which is itself deterministic).
    """

    def __init__(
        self, dataset_size: int, *, ema: float = DEFAULT_EMA, prior: float | str = DEFAULT_PRIOR, groups: Any = None,
        track_first_losses: bool = True,
    ) -> None:
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, numbers.Integral) or dataset_size < 1:
            raise ValueError(f"dataset_size must be an int >= 1, got {dataset_size!r}")
        self.dataset_size = int(dataset_size)
        self.ema = check_fraction(ema, "ema", low_open=False, high_open=True)
        if isinstance(prior, str):
            if prior != "mean":
                raise ValueError(f"prior must be 'mean' or a finite number, got {prior!r}")
        elif isinstance(prior, bool) or not isinstance(prior, numbers.Real) or not math.isfinite(prior):
            raise ValueError(f"prior must be 'mean' or a finite number, got {prior!r}")
        self.prior = prior if isinstance(prior, str) else float(prior)
        self.losses = np.full(self.dataset_size, np.nan, dtype=np.float32)
        self.first_losses: np.ndarray | None = None
        if track_first_losses:
            self.track_first_losses()
        # np.full, not np.zeros: touch the pages now rather than page-faulting them in one at a time
        # under random updates (at N = 1e8 that made the first steps ~50x slower).
        self.counts = np.full(self.dataset_size, 0, dtype=np.uint32)
        self.last_step = np.full(self.dataset_size, -1, dtype=np.int32)
        self.num_seen = 0
        self.num_skipped = 0
        self.groups: np.ndarray | None = None if groups is None else as_groups(groups, self.dataset_size)

    def track_first_losses(self) -> None:
        """Start keeping first losses (no-op if kept). Samples seen before start from their running loss."""
        if self.first_losses is None:
            self.first_losses = self.losses.copy()

    def groups_digest(self) -> str:
        """A digest of the group ids ("" without groups); computed once per assignment of ``groups``."""
        if self.groups is None:
            return ""
        if getattr(self, "_groups_digest", (None, ""))[0] is not self.groups:
            self._groups_digest = (self.groups, hashlib.blake2b(self.groups.tobytes(), digest_size=16).hexdigest())
        return self._groups_digest[1]

    @property
    def num_groups(self) -> int:
        """1 + the largest group id (1 without groups)."""
        return count_groups(self.groups)

    def __len__(self) -> int:
        return self.dataset_size

    @property
    def nbytes(self) -> int:
        """Bytes of the per-sample arrays (16 per sample, 12 without first losses; 2 more with groups)."""
        arrays = (self.losses, self.counts, self.last_step,
                  *(a for a in (self.groups, self.first_losses) if a is not None))
        return sum(a.nbytes for a in arrays)

    @property
    def num_samples(self) -> int:
        """Alias of :attr:`dataset_size` (N; the name streaming and saved states use for it)."""
        return self.dataset_size

    # -- feedback -------------------------------------------------------------------------------------
    def update(self, indices: Any, losses: Any, step: int = 0) -> np.ndarray:
        """Record per-sample losses observed at ``step``; returns the distinct indices updated."""
        idx, val, skipped = validate_feedback(indices, losses, self.dataset_size)
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
        order, srt = _stable_order(indices, self.dataset_size)
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
        if self.first_losses is not None and not seen.all():  # a first observation is the first loss
            fresh = uniq[~seen]
            self.first_losses[fresh] = new[~seen]
        counts = self.counts[uniq]
        counts += counts != np.iinfo(np.uint32).max  # saturating increment
        self.counts[uniq] = counts
        self.last_step[uniq] = step
        self.num_seen += int(uniq.size - np.count_nonzero(seen))
        return uniq, old, new

    # -- views ----------------------------------------------------------------------------------------
    def prior_value(self, sample: np.ndarray | None = None) -> float:
        """The prior loss: the fixed prior, or the mean seen loss (of ``sample`` if given); 0 if none seen."""
        if sample is None and isinstance(self.prior, str):
            sample = self.losses[~np.isnan(self.losses)]
        return prior_value(self.prior, sample)

    def mean_loss(self) -> float:
        """Mean running loss over seen samples (NaN if none)."""
        return float(np.nanmean(self.losses, dtype=np.float64)) if self.num_seen else math.nan

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The table as tensors and primitives. Unseen samples (``counts == 0``) are saved as loss 0.0,
        not NaN: NaN != NaN would make two identical states compare unequal (``allclose`` at zero
        tolerance, ``torch.equal``); :meth:`load_state_dict` restores NaN from the counts."""
        first = {} if self.first_losses is None else {
            "first_losses": torch.from_numpy(np.where(self.counts > 0, self.first_losses, np.float32(0.0)))}
        return {
            "num_samples": self.dataset_size,  # the saved format's name for N
            "ema": self.ema,
            "prior": self.prior,
            "losses": torch.from_numpy(np.where(self.counts > 0, self.losses, np.float32(0.0))),
            **first,
            "counts": torch.from_numpy(self.counts.astype(np.int64)),
            "last_step": torch.from_numpy(self.last_step.copy()),
            "num_skipped": self.num_skipped,
            "groups": None if self.groups is None else torch.from_numpy(self.groups.astype(np.int32)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a table of the same size; ``ValueError`` (and no change) on any malformed entry.

        Everything is checked before anything changes: the size, dtypes and shapes, ``ema`` and
        ``prior``, counts >= 0, and finite losses and steps >= 0 wherever counts > 0. Samples with
        count 0 are unseen whatever loss was saved for them (NaN or a placeholder) and load as NaN.
        """
        self._assign(check_table_state(state, self.dataset_size))

    def _assign(self, checked: dict[str, Any]) -> None:
        """Take the entries of a state already checked by :func:`check_table_state` (cannot fail)."""
        self.ema, self.prior = checked["ema"], checked["prior"]
        self.losses, self.counts, self.last_step = checked["losses"], checked["counts"], checked["last_step"]
        tracked = self.first_losses is not None
        self.first_losses = checked["first_losses"]
        if tracked:  # a table that keeps first losses goes on keeping them (from a state without: from now)
            self.track_first_losses()
        self.groups = checked["groups"]
        self.num_seen = int(np.count_nonzero(self.counts))
        self.num_skipped = checked["num_skipped"]

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LossTable:
        """A table rebuilt from :meth:`state_dict` alone (checked before any N-sized allocation)."""
        checked = check_table_state(state, None)
        table = cls(int(checked["losses"].size), track_first_losses=False)  # as saved: with or without
        table._assign(checked)
        return table


def count_groups(groups: np.ndarray | None) -> int:
    """1 + the largest group id in ``groups`` (1 without groups): the length of per-group arrays."""
    return 1 if groups is None or groups.size == 0 else int(groups.max()) + 1


def check_table_state(state: Any, dataset_size: int | None, where: str = "state_dict") -> dict[str, Any]:
    """Validate a :meth:`LossTable.state_dict` and return its entries converted for the table.

    ``dataset_size`` is the size it must have (``None``: the size it claims, which its arrays must
    match, so a small file cannot make anyone allocate a huge table).
    """
    n = state_int(state, "num_samples", where, minimum=1)
    if dataset_size is not None and n != dataset_size:
        raise ValueError(
            f"{where}['num_samples'] is {n} but this table has dataset_size={dataset_size}: "
            "the state comes from a data set of a different size"
        )
    ema = check_fraction(state_entry(state, "ema", where), f"{where}['ema']", low_open=False, high_open=True)
    prior = state_entry(state, "prior", where)
    if prior != "mean" and (isinstance(prior, bool) or not isinstance(prior, numbers.Real) or not math.isfinite(prior)):
        raise ValueError(f"{where}['prior'] must be 'mean' or a finite number, got {prior!r}")
    losses = state_array(state_entry(state, "losses", where), f"{where}['losses']", kind="float", shape=(n,))
    counts = state_array(state_entry(state, "counts", where), f"{where}['counts']", kind="int", shape=(n,))
    last_step = state_array(state_entry(state, "last_step", where), f"{where}['last_step']", kind="int", shape=(n,))
    check_range(counts, f"{where}['counts']", 0, np.iinfo(np.uint32).max)
    check_range(last_step, f"{where}['last_step']", -1, MAX_STEP)
    seen = counts > 0
    check_range(losses[seen], f"{where}['losses'] of seen samples (counts > 0)", -MAX_LOSS, MAX_LOSS)
    check_range(last_step[seen], f"{where}['last_step'] of seen samples (counts > 0)", 0, MAX_STEP)
    losses = np.where(seen, losses, np.nan).astype(np.float32)  # unseen: NaN, whatever was saved
    first_losses = check_first_losses(state.get("first_losses"), losses, seen, f"{where}['first_losses']")
    skipped = state_int(state, "num_skipped", where, minimum=0) if "num_skipped" in state else 0
    groups = None if state.get("groups") is None else as_groups(state["groups"], n, f"{where}['groups']")
    return {
        "ema": ema,
        "prior": prior if isinstance(prior, str) else float(prior),
        "losses": losses,
        "first_losses": first_losses,
        "counts": counts.astype(np.uint32),
        "last_step": last_step.astype(np.int32),
        "num_skipped": skipped,
        "groups": groups,
    }


def check_first_losses(saved: Any, losses: np.ndarray, seen: np.ndarray, name: str) -> np.ndarray | None:
    """The first losses of a saved table (float32, NaN where unseen); None if it kept none (a table that
    keeps them then starts from the running losses, so the evidence that a sample is learned starts there)."""
    if saved is None:
        return None
    first = state_array(saved, name, kind="float", shape=losses.shape)
    check_range(first[seen], f"{name} of seen samples (counts > 0)", -MAX_LOSS, MAX_LOSS)
    return np.where(seen, first, np.nan).astype(np.float32)


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

