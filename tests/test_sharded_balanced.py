"""Balanced draws with the credits sharded over gloo ranks: the unsharded batches where they are attainable
bit for bit, the same global batches on 1, 2 and 4 ranks, the count bound globally, elastic resumption."""

from __future__ import annotations

import numpy as np
import pytest
from _core_helpers import P_THRESHOLD, chisquare_pvalue, gloo_group, spawn_gloo

from irdro_sampler.draws.balanced import BalancedDraws
from irdro_sampler.sharded_balanced import ShardedBalancedDraws
from irdro_sampler.sharded_balanced_state import merge_states, slice_state
from irdro_sampler.virtual_shards import VirtualShards

# The unsharded scheme's documented bound (tests/test_sampler_balanced.py): |count - expectation| < 2.
COUNT_BOUND = 2.0
SEED = 5
# "dyadic": a one-level key tree (N <= 2**15) and masses in quarters, so every sum is exact: the regime
# where the unsharded batches are attainable bit for bit. "general": a four-level tree, real-valued
# masses, fixed for FIXED batches, then moving every batch, and a jump that overflows offsets at JUMP.
SCENARIOS = {
    "dyadic": {"n": 3000, "shards": 16, "batch": 64, "mix": 0.1, "batches": 300},
    "dyadic_2_shards": {"n": 3000, "shards": 2, "batch": 64, "mix": 0.1, "batches": 120},  # on 4 ranks only
    "general": {"n": 40_000, "shards": 64, "batch": 256, "mix": 0.05, "batches": 300},
}
FIXED, JUMP = 150, 199


def _initial_masses(name: str) -> np.ndarray:
    n = SCENARIOS[name]["n"]
    rng = np.random.default_rng(11)
    if name.startswith("dyadic"):
        return rng.integers(0, 9, n) / 4.0  # 0 to 2 in quarters; a ninth have mass 0
    m = rng.gamma(2.0, 1.0, n)
    m[rng.random(n) < 0.1] = 0.0  # cut samples: the floor only
    m[20_000:21_000] *= 10.0  # a heavy region spanning shards
    return m


def _update(name: str, b: int, drawn: np.ndarray, m0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mass change after batch ``b`` (feedback on the drawn ids): sorted distinct ids and masses."""
    ids = np.unique(drawn)
    if name.startswith("dyadic"):
        scale = 16.0 if b % 50 == 25 else 1.0  # every 50 batches a jump of the total: a re-key
        return ids, ((ids * 7 + b) % 13) / 4.0 * scale
    if b < FIXED:
        return ids[:0], np.empty(0)
    drift = 1.0 + 0.5 * np.sin(b / 20.0)
    mass = np.abs(m0[ids] * drift + np.random.default_rng([7, b]).normal(0.0, 0.3, ids.size))
    if b == JUMP:  # a few masses jump by 1e5: their offsets would overflow float32 (held credits)
        mass[:5] *= 1e5
    return ids, mass


def _job(rank: int, world: int, name: str, first: int, stop: int, state) -> tuple:
    """Batches ``first .. stop - 1`` of scenario ``name`` on this rank: (batches, state after JUMP if
    drawn, final state)."""
    cfg = SCENARIOS[name]
    shards = VirtualShards(cfg["n"], cfg["shards"])
    draws = ShardedBalancedDraws(shards, rank, world, global_batch=cfg["batch"], uniform_mix=cfg["mix"], seed=SEED)
    m0 = _initial_masses(name)
    if state is None:
        draws.rebuild(m0[draws.start : draws.stop])
    else:
        draws.load_state_dict(state)
    out, at_jump = [], None
    for b in range(first, stop):
        out.append(draws.draw(b, cfg["batch"]))
        draws.set_masses(*_update(name, b, out[-1], m0))  # the global update: each rank keeps its own
        if b == JUMP:
            at_jump = draws.state_dict()
    return np.stack(out), at_jump, draws.state_dict()


def _worker(rank: int, world: int, port: int, results, jobs: list) -> None:
    with gloo_group(rank, world, port):  # several jobs per process group: spawning ranks costs far more than drawing
        results[rank] = [_job(rank, world, *job) for job in jobs]


_RUNS: dict[int, dict[str, list]] = {}


def _run(name: str, world: int) -> list:
    """Every rank's (batches, state after JUMP, final state) of a whole run of ``name`` (cached: one
    spawn per world size runs every scenario)."""
    if world not in _RUNS:
        names = [n for n in SCENARIOS if world == 4 or n != "dyadic_2_shards"]
        per_rank = spawn_gloo(_worker, world, [(n, 0, SCENARIOS[n]["batches"], None) for n in names])
        _RUNS[world] = {n: [jobs[i] for jobs in per_rank] for i, n in enumerate(names)}
    return _RUNS[world][name]


def _unsharded(name: str) -> tuple[np.ndarray, BalancedDraws]:
    """The same run through the unsharded scheme, driven as the sampler drives it."""
    cfg = SCENARIOS[name]
    scheme = BalancedDraws(cfg["n"], global_batch=cfg["batch"], uniform_mix=cfg["mix"], seed=SEED)
    m0 = _initial_masses(name)
    scheme.begin_rebuild(rekey=True)
    scheme.leaf_buffer()[:] = m0
    scheme.end_rebuild(rekey=True)
    out = []
    for b in range(cfg["batches"]):
        scheme.keep_fresh()
        out.append(scheme.draw(np.random.default_rng([SEED, b]), cfg["batch"], cfg["mix"], commit=True))
        ids, mass = _update(name, b, out[-1], m0)
        if ids.size:
            scheme.set_masses(ids, mass)
    return np.stack(out), scheme


def _assert_same_on_every_rank(per_rank: list) -> np.ndarray:
    batches = per_rank[0][0]
    for rank, (other, *_) in enumerate(per_rank):
        assert np.array_equal(other, batches), f"rank {rank} drew other global batches"
    return batches


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dyadic", "dyadic_2_shards"])
def test_equal_to_the_unsharded_scheme_where_sums_are_exact(name):
    """One-level key tree, exact sums: every batch (ids, counts and order) and the final credits are the
    unsharded BalancedDraws', on 1, 2 and 4 ranks (over 2 shards on 4 ranks: two own nothing)."""
    expected, scheme = _unsharded(name)
    for world in (1, 2, 4) if name == "dyadic" else (4,):
        per_rank = _run(name, world)
        batches = _assert_same_on_every_rank(per_rank)
        assert np.array_equal(batches, expected), f"world {world}: batches differ from the unsharded ones"
        state = merge_states([final for *_, final in per_rank])
        assert np.array_equal(state["offsets"], scheme.stride.offsets)
        assert np.array_equal(state["draws"], scheme.stride.draws)
        assert state["rekeys"] == scheme.rekeys > 5  # the jumps of the total re-keyed


def _tracking(name: str, batches: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(max over batches and samples of |count - expectation|, counts and p over the FIXED batches)."""
    cfg = SCENARIOS[name]
    n, mix = cfg["n"], cfg["mix"]
    mass = _initial_masses(name)
    m0 = mass.copy()
    counts, expected, worst = np.zeros(n), np.zeros(n), 0.0
    fixed_counts = fixed_p = None
    for b, batch in enumerate(batches):
        p = mix / n + (1 - mix) * mass / mass.sum()
        counts += np.bincount(batch, minlength=n)
        expected += batch.size * p
        worst = max(worst, float(np.abs(counts - expected).max()))
        if b == FIXED - 1:
            fixed_counts, fixed_p = counts.copy(), p
        ids, new = _update(name, b, batch, m0)
        mass[ids] = new
    return worst, fixed_counts, fixed_p


@pytest.mark.slow
def test_same_batches_on_any_world_size_with_the_count_bound_globally():
    """Four-level key tree, real masses moving every batch, an overflowing jump: the same global batches
    on 1, 2 and 4 ranks; counts within the bound of their expectations; fixed masses fit (chi-square)."""
    runs = {world: _assert_same_on_every_rank(_run("general", world)) for world in (1, 2, 4)}
    batches = runs[1]
    for world, other in runs.items():
        assert np.array_equal(other, batches), f"world {world}: other global batches than on 1 rank"
    worst, counts, p = _tracking("general", batches)
    assert worst < COUNT_BOUND, worst
    assert chisquare_pvalue(counts, p) > P_THRESHOLD
    assert counts[p == p.min()].sum() > 0  # the floor reaches the cut samples
    state = merge_states([final for *_, final in _run("general", 4)])
    assert state["rekeys"] > 1 and state["held_ids"].size == 0  # the jump's held credits were folded in


@pytest.mark.slow
def test_saved_on_4_ranks_continues_on_2_with_the_same_batches():
    """The state after batch JUMP (held credits pending) re-cut for 2 ranks continues the 4-rank run."""
    whole = _assert_same_on_every_rank(_run("general", 4))
    saved = merge_states([at_jump for _, at_jump, _ in _run("general", 4)])
    assert saved["held_ids"].size > 0  # the re-key is still due: it travels in the state
    job = ("general", JUMP + 1, SCENARIOS["general"]["batches"], saved)
    resumed = _assert_same_on_every_rank([jobs[0] for jobs in spawn_gloo(_worker, 2, [job])])
    assert np.array_equal(resumed, whole[JUMP + 1 :])


def _config_state(**change) -> tuple[VirtualShards, dict]:
    shards = VirtualShards(100, 4)
    parts = [ShardedBalancedDraws(shards, r, 2, global_batch=8, uniform_mix=0.1, seed=1).state_dict()
             for r in range(2)]
    for part in parts:
        part.update(change)
    return shards, parts


def test_states_merge_and_slice_by_global_id():
    shards, parts = _config_state()
    whole = merge_states(parts[::-1])
    assert (whole["start"], whole["stop"], whole["offsets"].size, whole["shard_totals"].size) == (0, 100, 100, 4)
    quarter = slice_state(whole, shards, 1, 4)
    assert (quarter["start"], quarter["stop"]) == (25, 50)
    np.testing.assert_array_equal(quarter["offsets"], whole["offsets"][25:50])
    with pytest.raises(ValueError, match=r"rank 0 of 4 needs ids \[0, 25\)"):
        slice_state(parts[1], shards, 0, 4)
    with pytest.raises(ValueError, match="not contiguous"):
        merge_states([parts[0], parts[0]])


def test_a_state_of_another_seed_or_size_is_refused_before_any_change():
    shards, parts = _config_state(seed=2)
    target = ShardedBalancedDraws(shards, 0, 1, global_batch=8, uniform_mix=0.1, seed=1)
    before = target.state_dict()
    with pytest.raises(ValueError, match=r"state\['seed'\] is 2"):
        target.load_state_dict(merge_states(parts))
    _, parts = _config_state(dataset_size=101)
    with pytest.raises(ValueError, match=r"state\['dataset_size'\] is 101"):
        target.load_state_dict(merge_states(parts))
    assert np.array_equal(target.offsets, before["offsets"])
