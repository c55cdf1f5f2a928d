"""ShardedIRDROSampler(draws="balanced") on gloo ranks: the same global batches on 1, 2 and 4 ranks with
feedback, refreshes and rebases; each batch's probabilities those of the unsharded distribution; the
count bound globally; saved on 4 ranks, continued on 2 identically. One spawn per world size (spawning
dominates the time): every scenario runs inside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _core_helpers import gloo_group, loss_of, spawn_gloo

from irdro_sampler import IRDROSampler
from irdro_sampler.sharded_sampler import ShardedIRDROSampler
from irdro_sampler.weights import mixture_probabilities

N, GLOBAL_BATCH, SHARDS, SAVE_AT, END = 4096, 64, 16, 70, 150
OPTS = dict(seed=3, feedback_delay=4, refresh_interval=10, draws="balanced")
# "cut": the default rule with a z-score cut; "rebase": a fixed low temperature and no cut, and losses
# that grow far above the fitted shift, so that masses overflow and the shift is re-chosen (rebases).
SCENARIOS = {"cut": dict(truncate_zscore=2.5), "rebase": dict(temperature=0.05, truncate_zscore=None)}
# The unsharded scheme's documented bound (tests/test_sampler_balanced.py): |count - expectation| < 2.
COUNT_BOUND = 2.0


def _loss(name: str, ids: np.ndarray, step: int) -> np.ndarray:
    loss = loss_of(ids, step) * np.where(ids % 97 == 0, 8.0, 1.0)
    if name == "rebase" and step >= 40:
        loss = loss * np.where(ids % 13 == 0, step / 4.0, 1.0)
    return loss


def _sampler(name: str, world: int) -> ShardedIRDROSampler:
    return ShardedIRDROSampler(N, GLOBAL_BATCH // world, num_shards=SHARDS, **OPTS, **SCENARIOS[name])


def _run(name: str, rank: int, world: int, folder: str) -> dict:
    s = _sampler(name, world)
    n_own = s.stop - s.start
    counts, expected, worst, exact_probs = np.zeros(n_own), np.zeros(n_own), 0.0, True
    batches, probs, mine = [], [], []
    it = iter(s.iter_batches())  # the first epoch through the iterator: this rank's slices
    for b in range(END):
        part = next(it) if b < s.batches_per_epoch else None
        ids, p = s.batch(b)
        # The count bound on this rank's ids: counts against sum_b G_b p_i(b), p from the scheme's masses.
        d = s.scheme.draws
        p_own = mixture_probabilities(d.masses, d.total, N, s.rule.uniform_mix)
        own = (ids >= s.start) & (ids < s.stop)
        exact_probs &= bool(np.array_equal(p[own], p_own[ids[own] - s.start]))
        counts += np.bincount(ids[own] - s.start, minlength=n_own)
        expected += ids.size * p_own
        worst = max(worst, float(np.abs(counts - expected).max()))
        s.update(ids, _loss(name, ids, b), step=b)
        batches.append(ids)
        probs.append(p)
        if part is not None:
            mine.append(part)
        if world == 4 and b == SAVE_AT:
            s.save(Path(folder, name))
    out = {"batches": np.stack(batches), "probs": np.stack(probs), "mine": np.concatenate(mine), "worst": worst,
           "exact_probs": exact_probs, "fingerprint": s.fingerprint(), "rebases": s.rebases}
    if world == 4:  # a stale replay (batch 5 is no longer buffered) must leave the credits alone
        out["replay"] = s.batch(5)[0]
        out["next"] = s.batch(END)[0]
    if world == 2:  # continue the 4-rank run saved after batch SAVE_AT
        r = _sampler(name, world)
        r.load(Path(folder, name))
        after = []
        for b in range(SAVE_AT + 1, END):
            ids, _ = r.batch(b)
            r.update(ids, _loss(name, ids, b), step=b)
            after.append(ids)
        out["resumed"], out["resumed_fingerprint"] = np.stack(after), r.fingerprint()
        out["resumed_next"] = r.batch(END)[0]
        try:  # a balanced state is refused by an i.i.d. sampler, on every rank, naming the file and field
            ShardedIRDROSampler(N, GLOBAL_BATCH // world, num_shards=SHARDS, **{**OPTS, "draws": "iid"},
                                **SCENARIOS[name]).load(Path(folder, name))
            out["iid_load"] = "accepted"
        except ValueError as e:
            out["iid_load"] = str(e)
    return out


def _worker(rank: int, world: int, port: int, results, folder: str) -> None:
    with gloo_group(rank, world, port):
        results[rank] = {name: _run(name, rank, world, folder) for name in SCENARIOS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list]:
    folder = str(tmp_path_factory.mktemp("balanced_state"))
    return {world: spawn_gloo(_worker, world, folder) for world in (4, 2, 1)}  # 4 first: it saves


def _unsharded_probabilities(name: str, batches: np.ndarray) -> list[np.ndarray]:
    """The distribution each batch was drawn from, by an unsharded sampler fed the same feedback."""
    ref = IRDROSampler(N, GLOBAL_BATCH, **{**OPTS, "draws": "iid"}, **SCENARIOS[name])
    out = []
    for b, ids in enumerate(batches):
        ref.order.advance_to(b)
        out.append(ref.probabilities())
        ref.update(ids, _loss(name, ids, b), step=b)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_global_batches_on_any_world_size_within_the_count_bound(runs, name):
    ref = runs[1][0][name]
    for world, per_rank in runs.items():
        for rank, out in enumerate(per_rank):
            out = out[name]
            assert np.array_equal(out["batches"], ref["batches"]), f"world {world} rank {rank}: other global batches"
            assert np.array_equal(out["probs"], ref["probs"])
            assert out["fingerprint"] == ref["fingerprint"]
            per = GLOBAL_BATCH // world
            first_epoch = ref["batches"][: N // GLOBAL_BATCH]
            assert np.array_equal(out["mine"], first_epoch[:, rank * per : (rank + 1) * per].ravel())
            assert out["exact_probs"]  # batch(b)'s probabilities are the scheme's masses over its total
        # The count bound holds globally: every rank checked its own ids.
        worst = max(out[name]["worst"] for out in per_rank)
        assert worst < COUNT_BOUND, f"world {world}: |count - expectation| reached {worst}"
    if name == "rebase":
        assert ref["rebases"] > 0
    # Each batch's probabilities are those of the unsharded distribution fed the same feedback.
    expected = _unsharded_probabilities(name, ref["batches"])
    for b, ids in enumerate(ref["batches"]):
        np.testing.assert_allclose(ref["probs"][b], expected[b][ids], rtol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_saved_on_4_ranks_continues_on_2_identically(runs, name):
    ref = runs[4][0][name]
    for out in runs[2]:
        out = out[name]
        assert np.array_equal(out["resumed"], ref["batches"][SAVE_AT + 1 :])
        assert out["resumed_fingerprint"] == ref["fingerprint"]
        # The 4-rank run replayed batch 5 before drawing END: the replay changed nothing.
        assert np.array_equal(out["resumed_next"], ref["next"])
        assert "common.pt: draws is 'balanced' but this sampler has draws='iid'" in out["iid_load"]
