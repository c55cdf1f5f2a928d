"""Streaming rounds planned from weights sharded over gloo ranks (irdro_sampler.sharded_rounds): the same
rounds on every world size, the unsharded carried rounding for balanced draws, i.i.d. draws that follow p,
bad weights refused on every rank."""

from __future__ import annotations

import numpy as np
import pytest
from _core_helpers import P_THRESHOLD, chisquare_pvalue, gloo_group, spawn_gloo

from irdro_sampler import DROWeighting, LossTable
from irdro_sampler.carried_rounding import balanced_counts, initial_carry
from irdro_sampler.sharded_rounds import (
    initial_carry_of_range,
    plan_sharded_round,
    shard_totals,
    sharded_probabilities,
)
from irdro_sampler.virtual_shards import VirtualShards

N, SHARDS, ROUND, ROUNDS, SEED = 3001, 16, 500, 6, 7


def _weights(r: int) -> np.ndarray:
    rng = np.random.default_rng([3, r])
    w = rng.gamma(0.5, 1.0, N)
    w[rng.random(N) < 0.2] = 0.0
    w[1500:1700] *= 20.0
    return w


def _worker(rank: int, world: int, port: int, results) -> None:
    with gloo_group(rank, world, port):
        shards = VirtualShards(N, SHARDS)
        start, stop = shards.ids_of_rank(rank, world)
        results[rank] = {}
        for draws in ("balanced", "iid"):
            carry, out = None, []
            for r in range(ROUNDS):
                plan = plan_sharded_round(draws, _weights(r)[start:stop], shards, seed=SEED, round_idx=r,
                                          round_size=ROUND, carry=carry)
                carry = plan.carry
                out.append((plan.ids, plan.probabilities))
            results[rank] = {**results[rank], draws: (out, carry)}


_RUNS: dict[int, list] = {}


def _runs() -> dict[int, list]:
    """One spawn per world size, shared by both schemes' checks."""
    for world in (1, 2, 4):
        if world not in _RUNS:
            _RUNS[world] = spawn_gloo(_worker, world)
    return _RUNS


def _expected_balanced():
    """The unsharded carried rounding with the same p (weights over their shard-order total)."""
    shards = VirtualShards(N, SHARDS)
    carry, out = initial_carry(N, SEED), []
    for r in range(ROUNDS):
        w = _weights(r)
        p = w / shard_totals(w, shards, 0, 1).sum()
        counts, carry = balanced_counts(carry, p, ROUND)
        out.append(np.repeat(np.arange(N), counts))
    return out, carry


def test_initial_carry_of_range_is_a_slice_of_the_initial_carry():
    full = initial_carry(N, SEED)
    assert np.array_equal(initial_carry_of_range(SEED, 1000, 2345), full[1000:2345])


@pytest.mark.slow
@pytest.mark.parametrize("draws", ["balanced", "iid"])
def test_the_same_rounds_on_one_two_and_four_ranks(draws):
    runs = {world: [r[draws] for r in per_rank] for world, per_rank in _runs().items()}
    reference = runs[1][0][0]
    for world, per_rank in runs.items():
        for rank, (rounds, _) in enumerate(per_rank):
            for r, ((ids, p), (ref_ids, ref_p)) in enumerate(zip(rounds, reference, strict=True)):
                assert np.array_equal(ids, ref_ids), f"{draws}: world {world} rank {rank} round {r}"
                assert np.array_equal(p, ref_p)
    for r, (ids, p) in enumerate(reference):
        w = _weights(r)
        assert ids.size == ROUND and np.all(np.diff(ids) >= 0) and np.all(w[ids] > 0)
        np.testing.assert_allclose(p, w[ids] / w.sum(), rtol=1e-12)
    if draws == "balanced":
        want, carry = _expected_balanced()
        for r, (ids, _) in enumerate(reference):
            assert np.array_equal(ids, want[r]), f"round {r}: not the unsharded carried rounding"
        per_rank_carry = np.concatenate([c for _, c in runs[4]])
        assert np.array_equal(per_rank_carry, carry)
    else:
        counts = np.bincount(np.concatenate([ids for ids, _ in reference]), minlength=N)
        p = np.mean([_weights(r) / _weights(r).sum() for r in range(ROUNDS)], axis=0)
        assert chisquare_pvalue(counts, p) > P_THRESHOLD


_BAD = {"nan": "NaN or inf", "negative": "negative", "short": "wrong length"}


def _bad_worker(rank: int, world: int, port: int, results) -> None:
    with gloo_group(rank, world, port):
        shards = VirtualShards(N, SHARDS)
        start, stop = shards.ids_of_rank(rank, world)
        out = {}
        for bad in _BAD:
            w = _weights(0)[start:stop].copy()
            if rank == 1:
                w = {"nan": np.where(np.arange(w.size) == 3, np.nan, w), "negative": -w, "short": w[:-1]}[bad]
            try:
                plan_sharded_round("balanced", w, shards, seed=SEED, round_idx=0, round_size=ROUND)
                out[bad] = "planned"
            except ValueError as e:
                out[bad] = str(e)
        # The group still works after the refusals: every rank raised at the same collective.
        out["after"] = plan_sharded_round("iid", _weights(0)[start:stop], shards, seed=SEED, round_idx=0,
                                          round_size=ROUND).ids.size
        table = LossTable(stop - start, groups=_groups()[start:stop])
        ids, losses = _feedback()
        mine = (ids >= start) & (ids < stop)
        table.update(ids[mine] - start, losses[mine])
        out["p"] = sharded_probabilities(DROWeighting(), table, shards)
        results[rank] = out


@pytest.mark.slow
def test_bad_weights_on_one_rank_are_refused_on_every_rank():
    out = spawn_gloo(_bad_worker, 2)
    for bad, what in _BAD.items():
        for rank in (0, 1):
            msg = out[rank][bad]
            assert msg.startswith("weights: rank 1 passed") and what in msg, msg
        assert "this rank holds ids" in out[1][bad]
    assert out[0]["after"] == out[1]["after"] == ROUND
    # The rule over the sharded table: the unsharded probabilities, each rank its own ids.
    table = LossTable(N, groups=_groups())
    table.update(*_feedback())
    want = DROWeighting().probabilities(table)
    np.testing.assert_allclose(np.concatenate([out[0]["p"], out[1]["p"]]), want, rtol=1e-12)


def _groups() -> np.ndarray:
    return (np.arange(N) % 5).astype(np.int64)


def _feedback() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(9)
    ids = rng.integers(0, N, 2000)
    return ids, rng.gamma(2.0, 1.0, ids.size) + 2.0 * (ids % 5 == 0)
