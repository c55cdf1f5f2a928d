"""Same behaviour, bit for bit: the sampler's draws, probabilities, stats and states equal the digests
taken before the sampler was split into one concern per file (tests/data/draw_digest.json), and
states saved by that code resume with the same continuation (tests/data/legacy_states/)."""

from __future__ import annotations

import json
from pathlib import Path

import _draw_digest as dd
import pytest
import torch

DATA = Path(__file__).parent / "data"
EXPECTED = json.loads((DATA / "draw_digest.json").read_text())


@pytest.mark.parametrize("name", sorted(dd.SCENARIOS))
def test_scenario_digest_unchanged(name: str) -> None:
    assert dd.run_scenario(**dd.SCENARIOS[name]) == EXPECTED["scenarios"][name]


def test_streaming_plan_digest_unchanged() -> None:
    assert dd.streaming_plan_digest() == EXPECTED["streaming-plan"]


@pytest.mark.parametrize("draws", ["balanced", "iid"])
def test_legacy_state_resumes_unchanged(draws: str) -> None:
    state = torch.load(DATA / "legacy_states" / f"{draws}.pt", weights_only=True)
    assert dd.continuation_digest(state) == EXPECTED["legacy-continuation"][draws]


@pytest.mark.parametrize("draws", ["balanced", "iid"])
def test_legacy_state_equals_a_fresh_run(draws: str) -> None:
    """The committed file is what the current code saves too (the state format did not move)."""
    saved = torch.load(DATA / "legacy_states" / f"{draws}.pt", weights_only=True)
    assert dd.continuation_digest(saved) == dd.continuation_digest(dd.legacy_state(draws))
