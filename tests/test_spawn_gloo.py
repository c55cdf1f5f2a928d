"""The multi-rank test helper (_core_helpers.spawn_gloo): results in rank order, a failing rank fails the call, and
a rank stuck after the others exited cleanly (a gloo teardown hang) is killed after the grace period."""

from __future__ import annotations

import time

import _core_helpers
import pytest
from _core_helpers import spawn_gloo


def _store(rank: int, world: int, port: int, results) -> None:
    results[rank] = rank * 10


def _stuck_after_storing(rank: int, world: int, port: int, results) -> None:
    results[rank] = rank
    if rank == 1:  # stands in for a rank that never returns from destroy_process_group
        time.sleep(3600)


def _fails_on_rank_1(rank: int, world: int, port: int, results) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 failed")
    results[rank] = rank


def test_results_come_back_in_rank_order() -> None:
    assert spawn_gloo(_store, 3) == [0, 10, 20]


def test_a_rank_stuck_after_the_others_exited_is_killed(monkeypatch, capfd) -> None:
    monkeypatch.setattr(_core_helpers, "TEARDOWN_GRACE", 2.0)
    t0 = time.monotonic()
    assert spawn_gloo(_stuck_after_storing, 2) == [0, 1]
    assert time.monotonic() - t0 < 60
    assert "stuck in gloo teardown" in capfd.readouterr().err


def test_a_failing_rank_fails_the_call() -> None:
    with pytest.raises(Exception, match="rank 1 failed"):
        spawn_gloo(_fails_on_rank_1, 2)
