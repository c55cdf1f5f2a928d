"""ShardedIRDROSampler's importance_weights, screen, stats, local_probabilities and set_start_batch on 2 gloo ranks
equal those of an unsharded IRDROSampler(draws="iid") fed the same feedback; a run saved mid-epoch and
resumed with set_start_batch draws the batches of the uninterrupted run."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from _core_helpers import gloo_group, loss_of, spawn_gloo

from irdro_sampler import IRDROSampler
from irdro_sampler.sharded_sampler import ShardedIRDROSampler

N, GLOBAL_BATCH, SHARDS, EPOCHS, WORLD = 4096, 64, 16, 2, 2
OPTS = dict(seed=5, feedback_delay=4, refresh_interval=10, truncate_zscore=2.5)
CHECK_AT = (0, 9, 10, 37, 90)  # steps after which the queries are compared (10 starts a refresh block)
SAVE_AT = 40  # mid epoch 0 (64 batches per epoch): saved after training batch 40, resumed at 41


def _groups(start: int, stop: int) -> np.ndarray:
    return np.arange(start, stop) % 5


def _loss(ids: np.ndarray, step: int) -> np.ndarray:
    """loss_of, with 9% of the ids a block of unlearnable samples (tight, far above the bulk: near 60)."""
    base = loss_of(ids, step)
    return np.where(ids % 11 == 0, 60.0 + 0.01 * base, base)


def _asked(rank: int, part: np.ndarray) -> np.ndarray:
    """Ids each rank asks about: different numbers per rank, owned by either rank, with repeats."""
    return np.concatenate([part, [0, N - 1, 5, 5]]) if rank == 0 else np.array([N - 1, 17, 3000])


def _screen_losses(asked: np.ndarray) -> np.ndarray:
    """Losses to screen ``asked`` with: from well inside the bulk to far above any group's cut and the block."""
    return np.linspace(0.05, 100.0, asked.size)


def _sampler(world: int) -> ShardedIRDROSampler:
    return ShardedIRDROSampler(N, GLOBAL_BATCH // world, num_shards=SHARDS, groups=_groups, **OPTS)


def _worker(rank: int, world: int, port: int, results, folder: str) -> None:
    with gloo_group(rank, world, port):
        s = _sampler(world)
        fresh_asked = _asked(rank, np.arange(3))
        out: dict = {"fresh": (s.stats(), s.importance_weights(fresh_asked),
                               s.screen(fresh_asked, _screen_losses(fresh_asked))), "checks": {}}
        try:
            s.set_start_batch(s.batches_per_epoch + 1)
        except ValueError as e:
            out["bad_start"] = str(e)
        try:  # rank 1 passes an id out of range: every rank raises, none waits in the collective
            s.importance_weights([N] if rank == 1 else [1, 2])
        except ValueError as e:
            out["bad_ids"] = str(e)
        try:  # rank 0 passes one loss too many
            s.screen([1, 2], [1.0, 2.0, 3.0] if rank == 0 else [1.0, 2.0])
        except ValueError as e:
            out["bad_screen"] = str(e)
        batches, parts, step = [], [], 0
        for epoch in range(EPOCHS):
            s.set_epoch(epoch)
            for part in s.iter_batches():
                ids, _ = s.batch(step)
                s.update(ids, _loss(ids, step), step=step)
                batches.append(ids)
                parts.append(part)
                if step in CHECK_AT:
                    asked = _asked(rank, part)
                    out["checks"][step] = (s.stats(), asked, s.importance_weights(asked),
                                           s.importance_weights(part, step=step), s.local_probabilities(),
                                           s.screen(asked, _screen_losses(asked)),
                                           s.screen(asked, _screen_losses(asked), block_only=True))
                if step == SAVE_AT:
                    s.set_start_batch(SAVE_AT + 1)  # saved with the state, so the resumed run starts there
                    s.save(folder)
                    s.set_start_batch(0)
                step += 1
        out["batches"], out["parts"] = np.stack(batches), np.stack(parts)
        out["resumed"] = _resume(world, folder)
        results[rank] = out


def _resume(world: int, folder: str) -> tuple:
    r = _sampler(world)
    r.load(folder)
    start = r.start_batch
    batches, parts, step = [], [], SAVE_AT + 1
    for epoch in range(r.epoch, EPOCHS):
        r.set_epoch(epoch)
        for part in r.iter_batches():
            ids, _ = r.batch(step)
            r.update(ids, _loss(ids, step), step=step)
            batches.append(ids)
            parts.append(part)
            step += 1
    return start, np.stack(batches), np.stack(parts), r.fingerprint()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> list[dict]:
    return spawn_gloo(_worker, WORLD, str(tmp_path_factory.mktemp("sharded-parity")))


def _reference(batches: np.ndarray) -> Iterator[tuple[int, tuple]]:
    """At each of CHECK_AT: the unsharded sampler fed the same feedback, its stats, its distribution, and
    the sampler itself (to ask its importance weights)."""
    ref = IRDROSampler(N, GLOBAL_BATCH, draws="iid", groups=_groups(0, N), **OPTS)
    for b, ids in enumerate(batches[: max(CHECK_AT) + 1]):
        ref.order.advance_to(b)
        ref.update(ids, _loss(ids, b), step=b)
        if b in CHECK_AT:
            yield b, (ref.stats(), ref.probabilities(), ref)


def _assert_stats_equal(got: dict, want: dict, where: str) -> None:
    assert set(got) == set(want), f"{where}: keys {sorted(set(got) ^ set(want))}"
    for key, value in want.items():
        if key == "last_drawn_batch":
            continue  # the reference is advanced, not drawn from
        np.testing.assert_allclose(got[key], value, rtol=1e-9, atol=1e-12, err_msg=f"{where}: {key}")


@pytest.mark.slow
def test_queries_equal_the_unsharded_sampler_fed_the_same_feedback(run):
    batches = run[0]["batches"]
    assert all(np.array_equal(r["batches"], batches) for r in run)
    fresh = IRDROSampler(N, GLOBAL_BATCH, draws="iid", groups=_groups(0, N), **OPTS)
    for rank, r in enumerate(run):
        _assert_stats_equal(r["fresh"][0], fresh.stats(), f"rank {rank} before the first draw")
        np.testing.assert_allclose(r["fresh"][1], fresh.importance_weights(_asked(rank, np.arange(3))), rtol=1e-9)
        assert r["fresh"][2].all()  # nothing is screened before the first refit
    screened = block_screened = 0
    for b, (want, probs, ref) in _reference(batches):
        for rank, r in enumerate(run):
            stats, asked, weights, drawn_weights, local, keep, keep_block = r["checks"][b]
            where = f"rank {rank} after step {b}"
            _assert_stats_equal(stats, want, where)
            assert stats["last_drawn_batch"] == b and stats["pending_feedback"] == min(b + 1, OPTS["feedback_delay"])
            # The current distribution at any ids (asked by both ranks, owned by either)...
            np.testing.assert_allclose(weights, ref.importance_weights(asked), rtol=1e-9, err_msg=where)
            np.testing.assert_allclose(weights, 1.0 / (N * probs[asked]), rtol=1e-9, err_msg=where)
            # ...the probabilities batch b was drawn with (the distribution of its draw)...
            part = r["parts"][b]
            np.testing.assert_allclose(drawn_weights, 1.0 / (N * probs[part]), rtol=1e-9, err_msg=where)
            # ...and this rank's rows of the distribution.
            lo, hi = rank * N // WORLD, (rank + 1) * N // WORLD
            np.testing.assert_allclose(local, probs[lo:hi], rtol=1e-9, err_msg=where)
            # The first-visit screen: the owners' judgement, as the whole table's.
            np.testing.assert_array_equal(keep, ref.screen(asked, _screen_losses(asked)), err_msg=where)
            screened += int(keep.size - keep.sum())
            # The block-only screen: judged by the block's valley of the replicated refit.
            want_block = ref.screen(asked, _screen_losses(asked), block_only=True)
            np.testing.assert_array_equal(keep_block, want_block, err_msg=where)
            block_screened += int(keep_block.size - keep_block.sum())
    assert screened >= 10  # the screen was exercised (first visits above their cut)
    assert 0 < block_screened < screened  # so was the block-only one (the ids at 8x the loss form a block)
    assert want["refreshes"] >= 9 and want["remeasured_cut"] > 0  # the counters were exercised
    assert np.ptp(np.log(probs)) > 1.0  # the cut and the tilt are at work


@pytest.mark.slow
def test_bad_input_is_refused_on_every_rank(run):
    for r in run:
        assert r["bad_start"] == "batch_in_epoch must be <= 64, got 65"
        assert "must lie in [0, 4096), got 4096" in r["bad_ids"] or "rank 1 passed bad indices" in r["bad_ids"]
        assert ("indices and losses must have the same length, got 2 and 3" in r["bad_screen"]
                or "screen: rank 0 passed bad indices or losses" in r["bad_screen"])


@pytest.mark.slow
def test_set_start_batch_resumes_mid_epoch_with_the_uninterrupted_batches(run):
    for rank, r in enumerate(run):
        start, batches, parts, fingerprint = r["resumed"]
        assert start == SAVE_AT + 1  # set_start_batch was saved with the state
        np.testing.assert_array_equal(batches, r["batches"][SAVE_AT + 1 :], err_msg=f"rank {rank}")
        np.testing.assert_array_equal(parts, r["parts"][SAVE_AT + 1 :], err_msg=f"rank {rank}")
    assert len({r["resumed"][3] for r in run}) == 1
