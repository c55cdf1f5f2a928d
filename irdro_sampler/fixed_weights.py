"""Weights the user sets: the rule behind :meth:`IRDROSampler.from_weights`.

A drop-in for ``WeightedRandomSampler`` where that one stops: several ranks drawing disjoint shares
of one global batch, exact resumption, more than 2**24 samples, and balanced draws (every sample's
count within 2 of what its weight asks for). The masses are the normalised weights themselves, in
float64; no loss ever changes them.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._validation import check_fraction, to_numpy
from .weights import WeightParams, mixture_probabilities

#: The key that marks a saved rule as fixed weights (``state['rule']``).
FIXED_WEIGHTS_KEY = "fixed_weights"


def as_weight_vector(weights: Any, name: str = "weights") -> np.ndarray:
    """``weights`` as float64 scaled to a largest value of 1; ``ValueError`` naming ``name`` unless
    they are a 1-D, non-empty, finite, non-negative vector with a positive sum."""
    arr = to_numpy(weights, name)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be real numbers, got dtype {arr.dtype}")
    w = arr.astype(np.float64)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be finite and >= 0, got {name}[{i}] = {float(w[i])!r}")
    top = float(w.max())
    if top <= 0:
        raise ValueError(f"{name} must have a positive sum, got all zeros (length {w.size})")
    return w / top  # largest mass 1: the masses' total stays within [1, N], far from over/underflow


@dataclass(frozen=True, eq=False)
class FixedWeights:
    """``p_i = (1 - uniform_mix) w_i / sum(w) + uniform_mix / N`` for weights ``w`` set once.

    Stands where :class:`~irdro_sampler.DROWeighting` stands in the sampler (fit, masses,
    probabilities, config), but ignores the loss table: feedback may still be reported (it is kept in
    the table and counted) and changes no probability. ``uniform_mix`` defaults to 0: exactly the given
    weights, samples of weight 0 never drawn.
    """

    weights: np.ndarray = field(repr=False)
    uniform_mix: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", as_weight_vector(self.weights))
        check_fraction(self.uniform_mix, "uniform_mix", low_open=False, high_open=False)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FixedWeights:
        return cls(config[FIXED_WEIGHTS_KEY], uniform_mix=config.get("uniform_mix", 0.0))

    def config(self) -> dict[str, Any]:
        return {FIXED_WEIGHTS_KEY: torch.from_numpy(self.weights.copy()), "uniform_mix": self.uniform_mix}

    def identity(self) -> list[tuple[str, Any]]:
        """What the sampler's fingerprint records: a digest of the weights and the floor."""
        digest = hashlib.blake2b(self.weights.tobytes(), digest_size=16).hexdigest()
        return [(FIXED_WEIGHTS_KEY, digest), ("uniform_mix", self.uniform_mix)]

    def fit(self, table: Any) -> WeightParams:
        """Nothing to fit: temperature 1, no cut, no prior, no shift (reported as such in ``stats()``)."""
        return WeightParams(1.0, math.inf, 0.0, 0.0)

    def masses_at(
        self, table: Any, selection: Any, params: WeightParams, gathered: tuple | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The weights at ``selection``; every sample counts as kept (a weight of 0 is not a cut). The
        samples' ``gathered`` losses are not read."""
        mass = self.weights[selection].copy()
        return mass, np.ones(mass.shape, dtype=bool)

    def rebased(self, table: Any, params: WeightParams) -> WeightParams:
        return params  # the masses' total lies in [1, N]: never out of range

    def probabilities(self, table: Any, params: WeightParams | None = None) -> np.ndarray:
        w = self.weights
        return mixture_probabilities(w, float(w.sum()), w.size, self.uniform_mix)


def rule_from_config(config: dict[str, Any]) -> Any:
    """The rule a saved ``state['rule']`` describes: fixed weights, or :class:`DROWeighting` options."""
    from .weights import DROWeighting

    if FIXED_WEIGHTS_KEY in config:
        return FixedWeights.from_config(dict(config))
    return DROWeighting.from_config(config)


def weighted_sampler(cls: type, weights: Any, batch_size: int, *, uniform_mix: float = 0.0, **options: Any) -> Any:
    """``cls.from_weights``: an ``IRDROSampler`` (or subclass ``cls``) drawing from fixed ``weights``.

    ``p_i = (1 - uniform_mix) w_i / sum(w) + uniform_mix / N`` (``weights``: N finite values >= 0 with a
    positive sum, kept in float64). The sampler otherwise behaves as always: ``draws="balanced"``
    (default) keeps every count within 2 of ``G p_i`` per batch (i.i.d. with ``draws="iid"``, as
    ``WeightedRandomSampler(replacement=True)``), ranks yield disjoint shares of one global batch,
    ``state_dict()`` resumes exactly, any N (no 2**24 limit). ``options`` are the constructor's
    (``num_replicas``, ``rank``, ``seed``, ``draws``, ``num_samples``, ...); rule options are refused
    (the weights are the rule). Feedback given to ``update`` is kept and changes nothing.
    """
    from ._validation import MAX_STEP
    from .weights import RULE_OPTIONS

    rule = FixedWeights(weights, uniform_mix=uniform_mix)
    if options.keys() & set(RULE_OPTIONS):
        raise TypeError(f"from_weights takes no rule options (the weights are the rule), got "
                        f"{sorted(options.keys() & set(RULE_OPTIONS))}")
    options.setdefault("refresh_interval", MAX_STEP + 1)  # fit once, at the first draw: nothing moves
    sampler = cls(rule.weights.size, batch_size, uniform_mix=uniform_mix, **options)
    sampler._assemble(sampler.table, rule, sampler.draw_scheme, sampler.feedback_delay, sampler.refresh_interval)
    return sampler
