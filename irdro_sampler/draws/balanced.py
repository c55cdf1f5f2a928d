"""Balanced draws (``draws="balanced"``, the default): stride scheduling on per-sample credits.

The algorithm and its bounds are in :mod:`irdro_sampler.stride`; this module wires it to the sampler.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from ..stride import StrideScheduler
from ..sum_tree import LeafMasses
from .base import register_draw_scheme

#: What ``state['block_size']`` holds under balanced draws: they keep no sum tree, so the value only
#: keeps the state format of i.i.d. draws (and of states saved before balanced draws existed).
_NO_TREE_BLOCK_SIZE = 8


@register_draw_scheme
class BalancedDraws:
    """Each batch takes the ``G_b`` most overdue draws (credits ``E_i - D_i + theta_i``), shuffled.

    With flat weights every epoch draws every sample exactly once, in a new seeded order; with
    changing weights every cumulative count stays within 2 of ``E_i = sum_b G_b p_i(b)``. The masses
    sit beside the credits in the scheduler's 16-byte records (:class:`LeafMasses`: leaves and a
    running total, saved in the state since it depends on the updates since the last refresh, not on
    the masses alone). No sum tree: nothing searches the masses.
    """

    name: ClassVar[str] = "balanced"
    depends_on_history: ClassVar[bool] = True

    def __init__(
        self, dataset_size: int, *, global_batch: int, uniform_mix: float, seed: int, initial_phases: bool = True,
        block_size: int | None = None, **_: Any,
    ) -> None:
        self.dataset_size = int(dataset_size)
        # Only carried through a restored state's ``block_size`` entry, so that it saves unchanged.
        self.block_size = _NO_TREE_BLOCK_SIZE if block_size is None else int(block_size)
        self.stride = StrideScheduler(dataset_size, global_batch, uniform_mix, seed, initial_phases=initial_phases)
        self.masses = LeafMasses(dataset_size, leaves=self.stride.masses)

    @classmethod
    def options(cls, block_size: int | None = None) -> dict[str, Any]:
        """The constructor options the sampler passes on, validated: none (``block_size`` is refused)."""
        if block_size is not None:
            raise ValueError(f"block_size is the i.i.d. draws' sum-tree fanout; draws='balanced' keeps no tree, "
                             f"got block_size={block_size!r}")
        return {}

    def config(self) -> dict[str, Any]:
        """The options in force (part of the sampler's fingerprint): none."""
        return {}

    @classmethod
    def owns_state_entry(cls, entry: Any) -> bool:
        # The first scheme with a saved part, so its entry carries no "scheme" name (see base.py).
        return entry is not None and not (isinstance(entry, dict) and "scheme" in entry)

    def reusable_for(self, block_size: int) -> bool:
        return False  # a restored state brings its own credits and phases

    @property
    def total(self) -> float:
        return self.masses.total

    @property
    def rekeys(self) -> int:
        return self.stride.rekeys

    @property
    def nbytes(self) -> int:
        """The per-sample records (mass, credit offset, draw count: 16 bytes) and the key tree."""
        stride = self.stride
        return self.masses.nbytes + stride.offsets.nbytes + stride.draws.nbytes + stride.keys.nbytes

    def mass_of(self, indices: np.ndarray) -> np.ndarray:
        return self.masses.levels[0][indices]

    def set_masses(self, indices: np.ndarray, mass: np.ndarray) -> None:
        stride = self.stride
        old = self.masses.levels[0][indices]
        rekey = not stride.mass_changed(indices, old, mass)
        if rekey:
            stride.rekey()  # fold every credit under the old masses
        self.masses._set(indices, mass, old)
        if rekey:
            stride.set_reference(self.masses.total)
        else:
            stride.keys_changed(indices)

    def begin_rebuild(self, *, rekey: bool) -> None:
        if rekey:
            self.stride.rekey()  # fold the credits under the old masses before they change

    def leaf_buffer(self) -> np.ndarray:
        return self.masses.leaf_buffer()

    def end_rebuild(self, *, rekey: bool) -> None:
        self.masses.refresh()
        if rekey:
            self.stride.set_reference(self.masses.total)

    def keep_fresh(self) -> None:
        # The total drifted from the one the keys assume: re-key so that due times stay accurate.
        if self.stride.needs_rekey(self.masses.total):
            self.stride.rekey()
            self.stride.set_reference(self.masses.total)

    def draw(self, rng: np.random.Generator, size: int, uniform_mix: float, *, commit: bool) -> np.ndarray:
        stride = self.stride
        if commit:
            stride.advance(size, self.masses.total)
        idx, counts = stride.select(size)
        if commit:
            stride.commit()
        out = np.repeat(idx, counts)
        rng.shuffle(out)  # ranks take slices: spread the most overdue (and repeats) over them
        return out

    def state_entry(self) -> dict[str, Any]:
        return {**self.stride.state_dict(), "mass_total": self.masses.total, "mass_moved": self.masses.moved}

    def load_state_entry(self, entry: dict[str, Any]) -> None:
        if "mass_total" in entry:  # the running total the saved run drew with
            self.masses.restore_total(entry["mass_total"], entry["mass_moved"])
        self.stride.load_state_dict(entry)  # after the masses: the keys are built from both

    @classmethod
    def check_state_entry(cls, entry: Any, dataset_size: int) -> None:
        """Refuse a malformed ``state['balanced']`` before anything changes."""
        if not isinstance(entry, dict):
            raise ValueError(f"state_dict['balanced'] must be None or a dict, got {type(entry).__name__}")
        for key, dtype in (("offsets", torch.float32), ("draws", torch.int32)):
            value = entry.get(key)
            if not isinstance(value, torch.Tensor) or value.dtype != dtype or tuple(value.shape) != (dataset_size,):
                got = f"{value.dtype}{tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"state_dict['balanced']['{key}'] must be a {dtype} tensor of shape ({dataset_size},), got {got}"
                )
        if not torch.isfinite(entry["offsets"]).all():
            raise ValueError("state_dict['balanced']['offsets'] holds non-finite credits")
        for key in ("clock", "drift1", "drift2", "ref_total", "alpha", "beta", "rekeys"):
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"state_dict['balanced']['{key}'] must be a finite number, got {value!r}")
        # The key tree's keys (states saved before deferred keys have none: they are rebuilt, no deferral).
        keys = entry.get("keys")
        if keys is not None:
            if not isinstance(keys, torch.Tensor) or keys.dtype != torch.float32 or tuple(keys.shape) != (dataset_size,):
                got = f"{keys.dtype}{tuple(keys.shape)}" if isinstance(keys, torch.Tensor) else type(keys).__name__
                raise ValueError(
                    f"state_dict['balanced']['keys'] must be a torch.float32 tensor of shape ({dataset_size},), got {got}"
                )
            if torch.isnan(keys).any():
                raise ValueError("state_dict['balanced']['keys'] holds NaN keys")
        # The masses' running total (states saved before it was kept have neither: it is recomputed).
        if ("mass_total" in entry) != ("mass_moved" in entry):
            raise ValueError("state_dict['balanced'] must hold both 'mass_total' and 'mass_moved' or neither")
        for key in ("mass_total", "mass_moved"):
            value = entry.get(key, 0.0)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (is_number and math.isfinite(value) and value >= 0):
                raise ValueError(f"state_dict['balanced']['{key}'] must be a finite number >= 0, got {value!r}")
