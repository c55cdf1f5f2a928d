"""``ShardedIRDROSampler.prime`` on 2 gloo ranks: every rank passes the same scored losses (in chunks), keeps its
own rows, and the first batch is drawn from the rule fitted on all of them, as :meth:`IRDROSampler.prime` does
unsharded; the primed run draws what the same run on one rank draws, resumes exactly from a save made right after
priming, refuses priming after a draw or on bad input (changing nothing), and ranks that primed different losses
fail together at the first draw."""

from __future__ import annotations

import numpy as np
import pytest
from _core_helpers import gloo_group, loss_of, spawn_gloo, train_sharded_steps

from irdro_sampler import IRDROSampler
from irdro_sampler.sharded_sampler import ShardedIRDROSampler

N, GLOBAL_BATCH, SHARDS, STEPS = 2048, 64, 8, 12
OPTS = dict(seed=7, feedback_delay=3, refresh_interval=4)


def _scored() -> np.ndarray:
    """A starting model's losses: a tight far block of unlearnable samples (every 5th id) above a spread bulk."""
    rng = np.random.default_rng(1)
    loss = rng.uniform(1.0, 3.0, N)
    loss[::5] = 5.5 + rng.normal(0.0, 0.05, loss[::5].size)
    return loss


def _prime_in_chunks(s, scored: np.ndarray) -> None:
    for chunk in np.array_split(np.arange(N), 3):  # a data set too large for one call: chunks, same order on all ranks
        s.prime(chunk, scored[chunk])


def _sampler(world: int) -> ShardedIRDROSampler:
    return ShardedIRDROSampler(N, GLOBAL_BATCH // world, num_shards=SHARDS, **OPTS)


def _train(s: ShardedIRDROSampler, first: int, last: int) -> np.ndarray:
    return np.stack(train_sharded_steps(s, first, last, loss_of))


def _worker(rank: int, world: int, port: int, results, folder: str) -> None:
    with gloo_group(rank, world, port):
        out: dict = {}
        s = _sampler(world)
        fresh_fp = s.fingerprint()
        errors = []
        for indices, losses in (([1, 2], [1.0]), ([1, N], [1.0, 2.0])):
            try:
                s.prime(indices, losses)
            except ValueError as e:
                errors.append(str(e))
        out["bad_input"] = errors, s.fingerprint() == fresh_fp
        _prime_in_chunks(s, _scored())
        out["local"] = s.local_probabilities()
        out["stats"] = s.stats()
        s.save(folder)  # right after priming: nothing drawn yet
        out["batches"] = _train(s, 0, STEPS)
        try:
            s.prime([0], [1.0])
        except ValueError as e:
            out["after_draw"] = str(e)
        resumed = _sampler(world)
        resumed.load(folder)
        out["resumed"] = _train(resumed, 0, STEPS)
        apart = _sampler(world)  # rank 1 primes other losses: both ranks raise at the first draw
        apart.prime(np.arange(N), _scored() + (0.5 if rank == 1 else 0.0))
        try:
            apart.batch(0)
        except RuntimeError as e:
            out["disagree"] = str(e)
        results[rank] = out


def _one_rank_worker(rank: int, world: int, port: int, results) -> None:
    with gloo_group(rank, world, port):
        s = _sampler(world)
        _prime_in_chunks(s, _scored())
        results[rank] = _train(s, 0, STEPS)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> list[dict]:
    return spawn_gloo(_worker, 2, str(tmp_path_factory.mktemp("sharded-prime")))


@pytest.mark.slow
def test_the_first_fit_is_the_unsharded_samplers_on_the_primed_losses(run):
    ref = IRDROSampler(N, GLOBAL_BATCH, draws="iid", **OPTS)
    ref.prime(np.arange(N), _scored())
    want = ref.probabilities()
    np.testing.assert_allclose(np.concatenate([r["local"] for r in run]), want, rtol=1e-9)
    share = np.arange(0, N, 5).size / N
    assert want[::5].sum() == pytest.approx(0.1 * share, rel=1e-9)  # the block keeps only the floor's share
    for r in run:
        assert r["stats"]["truncated_fraction"] == pytest.approx(share)
        assert r["stats"]["seen_fraction"] == 1.0


@pytest.mark.slow
def test_the_primed_run_draws_the_same_on_one_rank_and_resumes_exactly(run):
    assert np.array_equal(run[0]["batches"], run[1]["batches"])
    one_rank = spawn_gloo(_one_rank_worker, 1)[0]
    assert np.array_equal(one_rank, run[0]["batches"])
    block = np.isin(run[0]["batches"][:4], np.arange(0, N, 5))
    assert block.mean() < 0.06  # the first batches already avoid the block (its share of the data is 0.2)
    for r in run:
        assert np.array_equal(r["resumed"], r["batches"])


@pytest.mark.slow
def test_bad_priming_is_refused_on_every_rank(run):
    for r in run:
        errors, unchanged = r["bad_input"]
        assert "same length" in errors[0] and "indices" in errors[1] and unchanged
        assert "already drawn" in r["after_draw"]
        assert "applied different feedback" in r["disagree"]
