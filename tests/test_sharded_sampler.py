"""ShardedIRDROSampler: the table spread over gloo ranks draws the same global batches on 1, 2 and 4
ranks, from the unsharded sampler's distribution."""

from __future__ import annotations

import numpy as np
import pytest
from _core_helpers import gloo_group, loss_of, spawn_gloo

from irdro_sampler import IRDROSampler
from irdro_sampler.sharded_sampler import ShardedIRDROSampler

N, GLOBAL_BATCH, SHARDS, EPOCHS = 4096, 64, 16, 2
OPTS = dict(seed=3, feedback_delay=4, refresh_interval=10, truncate_zscore=2.5)


def _groups(start: int, stop: int) -> np.ndarray:
    return np.arange(start, stop) % 5


def _worker(rank: int, world: int, port: int, results) -> None:
    with gloo_group(rank, world, port):
        out = [_run(rank, world, with_groups) for with_groups in (False, True)]
        try:  # checked from the layout alone, before any collective
            ShardedIRDROSampler(N, GLOBAL_BATCH // world, num_shards=2)
            out.append("accepted")
        except ValueError as e:
            out.append(str(e))
        out.append({fault: _faulty_run(rank, world, fault) for fault in ("dropped", "duplicated")})
        results[rank] = out


def _run(rank: int, world: int, with_groups: bool) -> tuple:
    s = ShardedIRDROSampler(N, GLOBAL_BATCH // world, num_shards=SHARDS, groups=_groups if with_groups else None,
                            **OPTS)
    batches, probs, mine, step = [], [], [], 0
    for epoch in range(EPOCHS):
        s.set_epoch(epoch)
        for part in s.iter_batches():
            ids, p = s.batch(step)  # buffered: the batch this part came from
            # Every rank reports the gathered feedback of all ranks (the global batch).
            s.update(ids, loss_of(ids, step) * np.where(ids % 97 == 0, 8.0, 1.0), step=step)
            batches.append(ids)
            probs.append(p)
            mine.append(part)
            step += 1
    table = (s.table.losses.copy(), s.table.counts.copy(), s.table.last_step.copy())
    return (np.stack(batches), np.stack(probs), np.concatenate(mine), s.fingerprint(), s.table.dataset_size,
            s.start, table)


def _faulty_run(rank: int, world: int, fault: str) -> str:
    """The last rank drops (or repeats) its record of step 5: every rank must refuse the next draw."""
    s = ShardedIRDROSampler(N, GLOBAL_BATCH // world, num_shards=SHARDS, **OPTS)
    try:
        for step in range(12):
            ids, _ = s.batch(step)
            faulty = rank == world - 1 and step == 5
            for _ in range(0 if faulty and fault == "dropped" else 2 if faulty else 1):
                s.update(ids, loss_of(ids, step), step=step)
    except RuntimeError as e:
        return f"step {step}: {e}"
    return "accepted"


def _unsharded_probabilities(batches: np.ndarray, with_groups: bool) -> tuple[list[np.ndarray], IRDROSampler]:
    """The distribution each batch was drawn from, by an unsharded sampler fed the same feedback (and it)."""
    ref = IRDROSampler(N, GLOBAL_BATCH, draws="iid", groups=_groups(0, N) if with_groups else None, **OPTS)
    out = []
    for b, ids in enumerate(batches):
        ref.order.advance_to(b)
        out.append(ref.probabilities())
        ref.update(ids, loss_of(ids, b) * np.where(ids % 97 == 0, 8.0, 1.0), step=b)
    return out, ref


@pytest.fixture(scope="module")
def runs() -> dict[int, list]:
    return {world: spawn_gloo(_worker, world) for world in (1, 2, 4)}


@pytest.mark.slow
@pytest.mark.parametrize("with_groups", [False, True])
def test_same_global_batches_on_any_world_size_from_the_unsharded_distribution(runs, with_groups):
    runs = {world: [r[int(with_groups)] for r in per_rank] for world, per_rank in runs.items()}
    batches, probs = runs[1][0][0], runs[1][0][1]
    for world, per_rank in runs.items():
        fps = {r[3] for r in per_rank}
        assert len(fps) == 1 and fps == {runs[1][0][3]}, f"world {world}: fingerprints differ"
        for rank, (b, p, mine, _, rows, start, _) in enumerate(per_rank):
            assert np.array_equal(b, batches), f"world {world} rank {rank}: other global batches"
            assert np.array_equal(p, probs)
            per = GLOBAL_BATCH // world
            assert np.array_equal(mine, b[:, rank * per : (rank + 1) * per].ravel())  # this rank's slice
            assert rows == N // world and start == rank * N // world  # O(N / world) rows per rank
    expected, ref = _unsharded_probabilities(batches, with_groups)
    # Every record reached the owner of each of its samples exactly once: the rows of the 4 ranks put
    # together are the unsharded table, bit for bit (losses, visit counts, last steps).
    for field, whole in enumerate((ref.table.losses, ref.table.counts, ref.table.last_step)):
        np.testing.assert_array_equal(np.concatenate([r[6][field] for r in runs[4]]), whole)
    for b in range(len(batches)):
        np.testing.assert_allclose(probs[b], expected[b][batches[b]], rtol=1e-9)
    # The cut and the tilt are at work: the last batches are not drawn uniformly.
    assert np.ptp(np.log(expected[-1])) > 1.0


@pytest.mark.slow
def test_too_few_shards_for_the_ranks_is_a_clear_error(runs):
    assert all(per[2] == "accepted" for per in runs[1] + runs[2])  # 2 shards cover 1 or 2 ranks
    errors = [per[2] for per in runs[4]]
    # At world 4 ranks 0 and 2 would own nothing: every rank refuses, so none waits in a collective.
    assert all("num_shards=2 leaves rank 0 of 4 no samples of dataset_size=4096" in e for e in errors)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["dropped", "duplicated"])
def test_a_record_dropped_or_duplicated_on_one_rank_is_caught_on_every_rank(runs, fault):
    assert runs[1][0][3][fault] == "accepted"
    for world in (2, 4):
        for outcome in (per[3][fault] for per in runs[world]):
            # Step 5's feedback is applied when batch 5 + feedback_delay is drawn: that draw is refused.
            assert outcome.startswith("step 9: ShardedIRDROSampler: the ranks applied different feedback by batch 9")
