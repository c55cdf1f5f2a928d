"""The draw schemes of :class:`~irdro_sampler.sharded_sampler.ShardedIRDROSampler`, chosen by name (``draws=``).

The sampler decides *which* masses a rank holds and *when* they change (feedback, refreshes, rebases);
a scheme keeps them and turns them into global batches (:mod:`irdro_sampler.draws` is the unsharded
counterpart). Two schemes:

* ``"iid"`` (:class:`ShardedIIDDraws`): one sum tree per owned shard
  (:class:`~irdro_sampler.sharded_draws.ShardMasses`), batches by
  :func:`~irdro_sampler.sharded_draws.draw_global_batch`. Its state is the masses alone, which the
  sampler rebuilds from the table on load: nothing of its own is saved.
* ``"balanced"`` (:class:`ShardedBalancedScheme`): the stride scheme's credits over the rank's ids
  (:class:`~irdro_sampler.sharded_balanced.ShardedBalancedDraws`). Its per-sample records go into the
  rank's row file, its replicated clocks into ``common.pt``; a load re-cuts them for the new world size.

Either way the draw probabilities of a batch are those of the distribution it was drawn from, as the
unsharded schemes give them: ``u / N + (1 - u) m_i / total`` with ``total`` the scheme's own sum of
the masses (for balanced draws the running per-shard totals, as ``BalancedDraws`` uses its running total).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from .sharded_balanced import ShardedBalancedDraws
from .sharded_balanced_state import (
    CONFIG_FIELDS,
    KEYS_FIELD,
    PER_SAMPLE_FIELDS,
    PER_SHARD_FIELDS,
    SCALAR_FIELDS,
    merge_states,
    slice_state,
)
from .sharded_draws import ShardMasses, draw_global_batch
from .virtual_shards import VirtualShards
from .weights import mixture_probabilities

__all__ = ["SHARDED_DRAW_SCHEMES", "ShardedBalancedScheme", "ShardedDrawScheme", "ShardedIIDDraws",
           "sharded_draw_scheme"]


class ShardedDrawScheme(Protocol):
    """What :class:`ShardedIRDROSampler` needs from a draw scheme (one instance per rank).

    Collective calls (every rank, same order, same arguments): :meth:`fill` and :meth:`draw`.
    """

    name: ClassVar[str]
    #: Batch ``b`` depends on the batches drawn before it (skipped batches are drawn first).
    depends_on_history: ClassVar[bool]
    shards: VirtualShards

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's O(N / world) draw structures."""

    def totals(self) -> np.ndarray:
        """A length-S vector of this rank's shard totals (0 elsewhere), for :func:`reduce_totals`."""

    def set_masses(self, ids: np.ndarray, mass: np.ndarray) -> None:
        """Set the masses of distinct, owned global ``ids`` (finite, >= 0), after feedback. The change
        may wait for :meth:`settle`; :meth:`totals` includes it."""

    def settle(self, *, discard: bool) -> None:
        """After the step's reduction, on every rank alike: make the changes of :meth:`set_masses` final,
        or drop them (``discard``: a rebase follows and :meth:`fill` replaces every mass). So whether a
        rank applied its part never depends on what it owns, only on the reduced flags."""

    def fill(self, masses_of_range: Callable[[int, int], np.ndarray]) -> None:
        """Replace every owned mass (refresh, rebase): ``masses_of_range(a, z)`` gives ids ``[a, z)``."""

    def draw(self, b: int, size: int, totals: np.ndarray | None, *, commit: bool) -> tuple[np.ndarray, np.ndarray]:
        """Global batch ``b`` of ``size`` ids and their draw probabilities, the same on every rank.

        ``totals``: the reduced shard totals if the caller has them. ``commit=False`` (a stale replay)
        leaves the scheme's state as it was."""

    def row_state(self) -> dict[str, Any] | None:
        """This rank's part of its row file (tensors and numbers), or ``None``."""

    def common_state(self) -> dict[str, Any] | None:
        """The replicated part, saved in ``common.pt`` (numbers only), or ``None``."""

    def read_state(self, common: Any, where: str, parts: list[tuple[str, Any]]) -> Any:
        """Check the saved parts (``common`` from the file ``where``, and ``(file, part)`` of every row
        file overlapping this rank's ids, in id order); return what :meth:`load_state` takes.
        ``ValueError`` naming the file and the field; nothing changes."""

    def load_state(self, checked: Any) -> bool:
        """Take :meth:`read_state`'s result; ``True`` if it restored the masses (else the sampler
        rebuilds them from the table)."""


class ShardedIIDDraws:
    """I.i.d. draws: a sum tree per owned shard and :func:`draw_global_batch`."""

    name: ClassVar[str] = "iid"
    depends_on_history: ClassVar[bool] = False

    def __init__(self, shards: VirtualShards, rank: int, world_size: int, *, global_batch: int,
                 uniform_mix: float, seed: int, group: Any = None) -> None:
        self.shards, self.uniform_mix, self.seed, self.group = shards, float(uniform_mix), int(seed), group
        self.masses = ShardMasses(shards, rank, world_size)

    @property
    def nbytes(self) -> int:
        return self.masses.nbytes

    def totals(self) -> np.ndarray:
        return self.masses.totals()

    def set_masses(self, ids: np.ndarray, mass: np.ndarray) -> None:
        self.masses.set(ids, mass)

    def settle(self, *, discard: bool) -> None:
        pass  # a discarded change is overwritten by the rebuild that follows

    def fill(self, masses_of_range: Callable[[int, int], np.ndarray]) -> None:
        self.masses.fill(masses_of_range)

    def draw(self, b: int, size: int, totals: np.ndarray | None, *, commit: bool) -> tuple[np.ndarray, np.ndarray]:
        ids, mass, total = draw_global_batch(self.masses, self.seed, b, size, self.uniform_mix, self.group,
                                             totals=totals)
        u, n = self.uniform_mix, self.shards.dataset_size
        return ids, u / n + (1.0 - u) * (mass / total if total > 0 else np.zeros_like(mass))

    def row_state(self) -> None:
        return None

    def common_state(self) -> None:
        return None

    def read_state(self, common: Any, where: str, parts: list[tuple[str, Any]]) -> None:
        return None

    def load_state(self, checked: Any) -> bool:
        return False


class ShardedBalancedScheme:
    """Balanced draws (count bound globally): :class:`ShardedBalancedDraws` over the rank's ids."""

    name: ClassVar[str] = "balanced"
    depends_on_history: ClassVar[bool] = True

    def __init__(self, shards: VirtualShards, rank: int, world_size: int, *, global_batch: int,
                 uniform_mix: float, seed: int, group: Any = None) -> None:
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.draws = ShardedBalancedDraws(shards, rank, world_size, global_batch=global_batch,
                                          uniform_mix=uniform_mix, seed=seed, group=group)
        # Mass changes waiting for settle(): a change moves credit offsets (float32), which a rebuild
        # does not undo bit for bit, so a rank must not apply its part when another rank overflowed.
        self._staged: list[tuple[np.ndarray, np.ndarray]] = []
        self._staged_change = np.zeros(len(self.draws.owned_shards))

    @property
    def nbytes(self) -> int:
        d = self.draws
        keys = 0 if d._keys is None else d._keys.nbytes
        return d._records.nbytes + keys + d.shard_totals.nbytes + d.shard_moved.nbytes

    def totals(self) -> np.ndarray:
        out = np.zeros(self.shards.num_shards, dtype=np.float64)
        owned = self.draws.owned_shards
        # Running sums (and the staged changes): clipped at 0, the owners' values win the max-reduction.
        out[owned.start : owned.stop] = np.maximum(self.draws.shard_totals + self._staged_change, 0.0)
        return out

    def set_masses(self, ids: np.ndarray, mass: np.ndarray) -> None:
        d = self.draws
        shard = self.shards.shard_of(ids) - d.owned_shards.start
        self._staged_change += np.bincount(shard, weights=mass - d.mass_of(ids), minlength=self._staged_change.size)
        self._staged.append((ids, mass))

    def settle(self, *, discard: bool) -> None:
        staged, self._staged = self._staged, []
        self._staged_change[:] = 0.0
        if not discard:
            for ids, mass in staged:
                self.draws.set_masses(ids, mass)

    def fill(self, masses_of_range: Callable[[int, int], np.ndarray]) -> None:
        self.settle(discard=True)
        d = self.draws
        mass = np.empty(d.stop - d.start)
        for s in d.owned_shards:
            a, z = self.shards.shard_range(s)
            mass[a - d.start : z - d.start] = masses_of_range(a, z)
        d.rebuild(mass)

    def draw(self, b: int, size: int, totals: np.ndarray | None, *, commit: bool) -> tuple[np.ndarray, np.ndarray]:
        ids, mass = self.draws.draw_with_masses(b, size, commit=commit)
        d = self.draws
        return ids, mixture_probabilities(mass, d.total, d.dataset_size, d.uniform_mix)

    # -- state ------------------------------------------------------------------------------------------
    def row_state(self) -> dict[str, Any]:
        state = self.draws.state_dict(copy=False)  # written at once by the save: no copy of the records
        out: dict[str, Any] = {k: int(state[k]) for k in ("start", "stop", "first_shard", "stop_shard")}
        for key in (*PER_SAMPLE_FIELDS, *PER_SHARD_FIELDS, "held_ids", "held_credits"):
            out[key] = torch.from_numpy(np.ascontiguousarray(state[key]))
        if state.get(KEYS_FIELD) is not None:
            out[KEYS_FIELD] = torch.from_numpy(np.ascontiguousarray(state[KEYS_FIELD]))
        return out

    def common_state(self) -> dict[str, Any]:
        state = self.draws.state_dict(copy=False)  # only its scalars are kept
        return {"scheme": self.name, **{k: state[k] for k in SCALAR_FIELDS}}

    def read_state(self, common: Any, where: str, parts: list[tuple[str, Any]]) -> dict[str, Any]:
        if not isinstance(common, dict) or common.get("scheme") != self.name:
            raise ValueError(f"{where}: draw_state must be a dict with scheme {self.name!r}, got {common!r:.80}")
        for key in SCALAR_FIELDS:
            value = common.get(key)
            if isinstance(value, bool) != (key == "needs_reference") or not isinstance(value, (int, float)) \
                    or not np.isfinite(value):
                raise ValueError(f"{where}: draw_state['{key}'] must be a finite number, got {value!r}")
        d = self.draws
        config = {k: getattr(d, k) for k in CONFIG_FIELDS}
        states = [self._check_part(part, file, config, common) for file, part in parts]
        try:  # parts of other ranges than row_files promised
            return slice_state(merge_states(states), self.shards, self.rank, self.world_size)
        except ValueError as e:
            raise ValueError(f"{where}: the row files' draws do not cover this rank: {e}") from None

    @staticmethod
    def _check_part(part: Any, where: str, config: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
        """One row file's balanced part as a :meth:`ShardedBalancedDraws.state_dict` (numpy, memory-mapped)."""
        if not isinstance(part, dict):
            raise ValueError(f"{where}: ['draws'] must be the balanced draws' rows, got {type(part).__name__}")
        bounds = {}
        for key in ("start", "stop", "first_shard", "stop_shard"):
            if not isinstance(part.get(key), int):
                raise ValueError(f"{where}: ['draws']['{key}'] must be an int, got {part.get(key)!r}")
            bounds[key] = part[key]
        lengths = {**dict.fromkeys((*PER_SAMPLE_FIELDS, KEYS_FIELD), bounds["stop"] - bounds["start"]),
                   **dict.fromkeys(PER_SHARD_FIELDS, bounds["stop_shard"] - bounds["first_shard"])}
        dtypes = {"masses": torch.float64, "offsets": torch.float32, "draws": torch.uint32,
                  "shard_totals": torch.float64, "shard_moved": torch.float64, "held_ids": torch.int64,
                  "held_credits": torch.float64, KEYS_FIELD: torch.float32}
        out = {**config, **bounds, **{k: common[k] for k in SCALAR_FIELDS}}
        for key, dtype in dtypes.items():
            value = part.get(key)
            if key == KEYS_FIELD and value is None:  # saved before deferred keys: rebuilt at the load
                continue
            shape_ok = isinstance(value, torch.Tensor) and value.dim() == 1 and value.dtype == dtype
            if not shape_ok or (key in lengths and value.numel() != lengths[key]):
                got = f"{value.dtype}{tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{where}: ['draws']['{key}'] must be a 1-d {dtype} tensor"
                                 f"{f' of {lengths[key]} entries' if key in lengths else ''}, got {got}")
            out[key] = value.numpy()
        if out["held_ids"].size != out["held_credits"].size:
            raise ValueError(f"{where}: ['draws']['held_ids'] and ['held_credits'] differ in length")
        return out

    def load_state(self, checked: dict[str, Any]) -> bool:
        self.draws.load_state_dict(checked)
        return True


#: The schemes by name, the default first.
SHARDED_DRAW_SCHEMES: dict[str, type] = {cls.name: cls for cls in (ShardedIIDDraws, ShardedBalancedScheme)}


def sharded_draw_scheme(name: Any) -> type:
    """The scheme class called ``name``; ``ValueError`` naming the value otherwise."""
    if not isinstance(name, str) or name not in SHARDED_DRAW_SCHEMES:
        raise ValueError(f"draws must be {' or '.join(map(repr, SHARDED_DRAW_SCHEMES))}, got {name!r}")
    return SHARDED_DRAW_SCHEMES[name]
