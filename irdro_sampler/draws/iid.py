"""I.i.d. draws (``draws="iid"``): every position of a batch drawn independently from ``p(b)``."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .._validation import check_int
from ..sum_tree import FanoutSumTree
from .base import register_draw_scheme


@register_draw_scheme
class IIDDraws:
    """Draws with replacement from ``p_i = (1 - u) m_i / S + u / N``, each position independently.

    A seeded stream decides per position between the uniform floor (probability ``u``: uniform over all
    samples, cut ones included) and the tilted part, found by one search of a :class:`FanoutSumTree`
    over the masses (``block_size`` children per node; O(log N) per draw and per mass update).
    Memory: ``8 * block_size / (block_size - 1)`` bytes per sample (9.1 at the default 8).
    """

    name: ClassVar[str] = "iid"
    depends_on_history: ClassVar[bool] = False
    DEFAULT_BLOCK_SIZE: ClassVar[int] = 8

    def __init__(self, dataset_size: int, *, block_size: int | None = None, **_: Any) -> None:
        self.dataset_size = int(dataset_size)
        self.block_size = self.DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
        self.tree = FanoutSumTree(self.dataset_size, fanout=max(2, self.block_size))

    @classmethod
    def options(cls, block_size: int | None = None) -> dict[str, Any]:
        """The constructor options the sampler passes on, validated: the sum tree's fanout."""
        if block_size is None:
            return {"block_size": cls.DEFAULT_BLOCK_SIZE}
        return {"block_size": check_int(block_size, "block_size", minimum=1)}

    @classmethod
    def owns_state_entry(cls, entry: Any) -> bool:
        return entry is None  # i.i.d. states save no draw state (and states from before balanced draws)

    @classmethod
    def check_state_entry(cls, entry: Any, dataset_size: int) -> None:
        """Nothing to check: an i.i.d. state has no ``state['balanced']``."""

    def config(self) -> dict[str, Any]:
        """The options in force (part of the sampler's fingerprint)."""
        return {"block_size": self.block_size}

    def reusable_for(self, block_size: int) -> bool:
        """Whether this structure can take a restored state of the same size (saves an allocation)."""
        return self.block_size == block_size

    @property
    def total(self) -> float:
        return self.tree.total

    @property
    def rekeys(self) -> int:
        return 0

    @property
    def nbytes(self) -> int:
        return self.tree.nbytes

    def mass_of(self, indices: np.ndarray) -> np.ndarray:
        return self.tree.leaves()[indices]

    def set_masses(self, indices: np.ndarray, mass: np.ndarray) -> None:
        self.tree._set(indices, mass)  # sorted distinct in-range indices, finite masses >= 0: checked

    def begin_rebuild(self, *, rekey: bool) -> None:
        pass

    def leaf_buffer(self) -> np.ndarray:
        return self.tree.leaf_buffer()

    def end_rebuild(self, *, rekey: bool) -> None:
        self.tree.refresh()

    def keep_fresh(self) -> None:
        pass

    def draw(self, rng: np.random.Generator, size: int, uniform_mix: float, *, commit: bool) -> np.ndarray:
        out = np.empty(size, dtype=np.int64)
        total = self.tree.total
        if total <= 0:  # no tilted mass (cannot happen after a refresh, which keeps the median): all floor
            from_floor = np.ones(size, dtype=bool)
        elif 0.0 < uniform_mix < 1.0:
            from_floor = rng.random(size) < uniform_mix
        else:
            from_floor = np.full(size, uniform_mix >= 1.0)
        n_floor = int(np.count_nonzero(from_floor))
        if n_floor == size:
            out[:] = rng.integers(0, self.dataset_size, size=size)
        elif n_floor:
            out[from_floor] = rng.integers(0, self.dataset_size, size=n_floor)
            out[~from_floor] = self._draw_tilted(rng, size - n_floor)
        else:
            out[:] = self._draw_tilted(rng, size)
        return out

    def _draw_tilted(self, rng: np.random.Generator, m: int) -> np.ndarray:
        """``m`` draws proportional to the masses (one tree search; never a sample of mass 0)."""
        return self.tree.find(rng.random(m) * self.tree.total)

    def state_entry(self) -> None:
        return None

    def load_state_entry(self, entry: None) -> None:
        pass
