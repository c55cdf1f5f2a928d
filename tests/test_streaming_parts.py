"""Contracts of the weighted streaming dataset's parts: planners by scheme name, the round header's
layout, and the round planning as a pure function of (seed, frozen weights, carry)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("streaming")

from irdro_sampler import DRAW_SCHEMES, initial_carry  # noqa: E402
from irdro_sampler.integrations.streaming_rounds import ROUND_PLANNERS, plan_round  # noqa: E402
from irdro_sampler.integrations.streaming_shared import RoundHeader  # noqa: E402

OFFSETS = np.arange(0, 100, 10, dtype=np.int64)
SIZES = np.full(10, 10, dtype=np.int64)


def test_every_draw_scheme_has_a_round_planner():
    assert set(ROUND_PLANNERS) == set(DRAW_SCHEMES)


def test_header_fields_are_distinct_slots_of_the_block():
    fields = [name for name, value in vars(RoundHeader).items() if isinstance(value, property)]
    values = np.arange(RoundHeader.LENGTH, dtype=np.int64)
    header = RoundHeader(values)
    slots = sorted(getattr(header, f) for f in fields)
    assert slots == list(range(RoundHeader.LENGTH))  # every slot named once, nothing unnamed
    header.reset()
    assert (header.frozen_round, header.planned_round, header.carry_round) == (-1, -1, -1)
    snap = header.snapshot()
    header.frozen_round = 5
    assert snap.frozen_round == -1 and values[1] == 5  # a snapshot is detached; the view writes through


@pytest.mark.parametrize("draws", sorted(ROUND_PLANNERS))
def test_a_round_is_a_pure_function_of_its_inputs(draws):
    p = np.random.default_rng(0).random(100) ** 2
    p /= p.sum()
    carry = initial_carry(100, 3)
    kwargs = dict(seed=3, round_idx=2, round_size=40, offsets=OFFSETS, sizes=SIZES, carry=carry.copy())
    units, ids = plan_round(draws, p, **kwargs)
    again_units, again_ids = plan_round(draws, p.copy(), **kwargs)
    assert np.array_equal(units, again_units) and np.array_equal(ids, again_ids)
    assert ids.size == 40 == int(units.sum()) and units.max() <= 10
    assert np.all(np.diff(np.searchsorted(OFFSETS, ids, side="right")) >= 0)  # grouped by shard


def test_carried_rounding_needs_the_carry():
    with pytest.raises(ValueError, match="carry"):
        plan_round("balanced", np.full(100, 0.01), seed=0, round_idx=0, round_size=40, offsets=OFFSETS, sizes=SIZES)
