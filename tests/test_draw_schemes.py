"""The draw-scheme registry: a new scheme is a new class plus register_draw_scheme, not a branch."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest
from _core_helpers import iter_batches, loss_of
from scipy import stats as sps

from irdro_sampler import DRAW_SCHEMES, IRDROSampler, register_draw_scheme
from irdro_sampler.draws import base as draws_base
from irdro_sampler.sum_tree import LeafMasses


class FloorOnlyDraws:
    """A deliberately different scheme: every position uniform over all samples, a seeded counter saved."""

    name: ClassVar[str] = "floor-only-test"
    depends_on_history: ClassVar[bool] = False
    block_size = 8

    def __init__(self, dataset_size: int, **_: Any) -> None:
        self.masses = LeafMasses(dataset_size)
        self.dataset_size = dataset_size
        self.batches = 0

    @classmethod
    def options(cls, block_size: Any = None) -> dict[str, Any]:
        return {}

    def config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def owns_state_entry(cls, entry: Any) -> bool:
        return isinstance(entry, dict) and entry.get("scheme") == cls.name

    @classmethod
    def check_state_entry(cls, entry: Any, dataset_size: int) -> None:
        if not isinstance(entry.get("batches"), int) or entry["batches"] < 0:
            raise ValueError(f"state_dict['balanced']['batches'] must be an int >= 0, got {entry.get('batches')!r}")

    def reusable_for(self, block_size: int) -> bool:
        return False

    total = property(lambda self: self.masses.total)
    rekeys = property(lambda self: 0)

    def mass_of(self, indices):
        return self.masses.levels[0][indices]

    def set_masses(self, indices, mass):
        self.masses._set(indices, mass)

    def begin_rebuild(self, *, rekey):
        pass

    def leaf_buffer(self):
        return self.masses.leaf_buffer()

    def end_rebuild(self, *, rekey):
        self.masses.refresh()

    def keep_fresh(self):
        pass

    def draw(self, rng, size, uniform_mix, *, commit):
        self.batches += commit
        return rng.integers(0, self.dataset_size, size=size)

    def state_entry(self):
        return {"scheme": self.name, "batches": self.batches}

    def load_state_entry(self, entry):
        self.batches = entry["batches"]


@pytest.fixture
def floor_only():
    register_draw_scheme(FloorOnlyDraws)
    try:
        yield FloorOnlyDraws.name
    finally:
        draws_base._REGISTRY.pop(FloorOnlyDraws.name)


def test_builtin_schemes_default_first():
    assert DRAW_SCHEMES == ("balanced", "iid")


def test_a_registered_scheme_draws_saves_and_resumes(floor_only):
    s = IRDROSampler(300, 10, draws=floor_only, feedback_delay=2, seed=4)
    assert s.draws == floor_only
    counts = np.zeros(300)
    run = []
    for epoch in range(20):
        s.set_epoch(epoch)
        for step, b in enumerate(iter_batches(s), start=epoch * s.batches_per_epoch):
            s.update(b, loss_of(b, step), step=step)  # heavily tilted losses: this scheme ignores them
            np.add.at(counts, b, 1)
            run.append(b)
            if step == 40:
                saved = s.state_dict()
    assert sps.chisquare(counts).pvalue > 1e-3  # uniform whatever the weights
    assert saved["balanced"] == {"scheme": floor_only, "batches": 41}
    resumed = IRDROSampler.from_state_dict(saved)
    assert resumed.draws == floor_only
    resumed.set_epoch(41 // s.batches_per_epoch)
    resumed.set_start_batch(41 % s.batches_per_epoch)
    assert next(iter_batches(resumed)) == run[41]
    bad = dict(saved, balanced={"scheme": floor_only, "batches": -1})
    with pytest.raises(ValueError, match="batches"):
        IRDROSampler.from_state_dict(bad)


def test_registering_a_taken_name_is_refused(floor_only):
    class Impostor(FloorOnlyDraws):
        pass

    with pytest.raises(ValueError, match="floor-only-test.*already registered"):
        register_draw_scheme(Impostor)


def test_unknown_scheme_lists_the_registered_ones(floor_only):
    with pytest.raises(ValueError, match=r"draws must be 'balanced' or 'iid' or 'floor-only-test', got 'x'"):
        IRDROSampler(10, 2, draws="x")


@pytest.mark.parametrize(("draws", "low", "high"), [("iid", 25.0, 26.1), ("balanced", 36.4, 36.7)])
def test_nbytes_per_sample(draws, low, high):
    n = 200_000
    s = IRDROSampler(n, 64, draws=draws)
    assert low <= s.nbytes / n <= high
    with_groups = IRDROSampler(n, 64, draws=draws, groups=np.arange(n) % 3)
    assert with_groups.nbytes - s.nbytes == 2 * n
