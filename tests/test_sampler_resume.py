"""Exact resumption of IRDROSampler: state_dict at any step, Composer-style replay, set_start_batch."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from _core_helpers import assert_state_equal, iter_batches, loss_of, roundtrip

from irdro_sampler import IRDROSampler

N, BATCH = 500, 16
BPE = 32  # ceil(500 / 16)
TOTAL = 3 * BPE
DELAY, AHEAD = 5, 3  # the loop draws up to AHEAD batches before they are trained (a DataLoader's prefetch)
CHECKPOINTS = (0, 5, 17, 31, 32, 47, 70)


def make(**overrides) -> IRDROSampler:
    kwargs = dict(
        temperature=0.3, truncate_quantile=0.9, uniform_mix=0.1, ema=0.5, feedback_delay=DELAY,
        refresh_interval=3, seed=7,
    )
    kwargs.update(overrides)
    return IRDROSampler(N, BATCH, **kwargs)




def run(sampler, start, end, *, ahead=AHEAD, mode="replay", checkpoint_at=()):
    """Simulated training of global steps [start, end) with prefetch ``ahead``.

    Mid-epoch starts either replay (iterate and discard the batches already trained, while the
    loader keeps prefetching, as Composer does) or call ``set_start_batch``. Returns
    ({step: batch}, {step: state saved after that step's update}).
    """
    out, saved = {}, {}
    step = start
    while step < end:
        epoch, j = divmod(step, BPE)
        sampler.set_epoch(epoch)
        if j and mode == "start_batch":
            sampler.set_start_batch(j)
        it = iter_batches(sampler)
        queue: deque = deque()

        def fill(queue=queue, it=it):
            while len(queue) < ahead + 1:
                b = next(it, None)
                if b is None:
                    return
                queue.append(b)

        if j and mode == "replay":
            for _ in range(j):
                fill()
                queue.popleft()
        while j < BPE and step < end:
            fill()
            b = queue.popleft()
            out[step] = b
            sampler.update(b, loss_of(b, step), step=step)
            if step in checkpoint_at:
                saved[step] = roundtrip(sampler.state_dict())
            step += 1
            j += 1
    return out, saved


def _without(state: dict, *keys: str) -> dict:
    return {k: v for k, v in state.items() if k not in keys}


@pytest.mark.parametrize("draws", ["balanced", "iid"])
@pytest.mark.parametrize("ahead", [0, AHEAD])
@pytest.mark.parametrize("mode", ["replay", "start_batch"])
def test_resume_continues_exactly(mode, ahead, draws):
    ref = make(draws=draws)
    full, saved = run(ref, 0, TOTAL, ahead=ahead, checkpoint_at=CHECKPOINTS)
    assert sorted(full) == list(range(TOTAL))
    final = ref.state_dict()
    for k in CHECKPOINTS:
        state = saved[k]
        if ahead and k % BPE != BPE - 1:
            # The checkpoint holds feedback not yet applied and batches drawn ahead of training.
            assert state["pending"]["keys"].shape[0] > 0
            assert state["schedule"]["last_drawn"] > k
        fresh = make(draws=draws)
        fresh.load_state_dict(state)
        assert_state_equal(fresh.state_dict(), state)  # loading is lossless
        cont, _ = run(fresh, k + 1, TOTAL, ahead=ahead, mode=mode)
        for step in range(k + 1, TOTAL):
            assert cont[step] == full[step], f"checkpoint {k}: step {step} differs"
        # Replays of trained batches are served without touching the state (not even a counter).
        assert_state_equal(fresh.state_dict(), final)


@pytest.mark.parametrize(("draws", "other_draws"), [("balanced", "iid"), ("iid", "balanced"), ("balanced", "balanced")])
def test_restored_state_overrides_constructor_options(draws, other_draws):
    ref = make(draws=draws)
    full, saved = run(ref, 0, TOTAL, checkpoint_at=(40,))
    tree = {"block_size": 4} if other_draws == "iid" else {}  # the sum tree's fanout: i.i.d. draws only
    other = make(seed=99, temperature=3.0, feedback_delay=9, refresh_interval=1, truncate_quantile=None,
                 ema=0.0, uniform_mix=0.3, draws=other_draws, **tree)
    run(other, 0, 10)  # a sampler with its own history
    other.load_state_dict(saved[40])
    cont, _ = run(other, 41, TOTAL)
    assert all(cont[s] == full[s] for s in range(41, TOTAL))
    assert other.draws == draws


def test_resume_from_state_before_any_draw():
    ref = make()
    state = roundtrip(ref.state_dict())
    full, _ = run(ref, 0, 40)
    fresh = make(seed=1)
    fresh.load_state_dict(state)
    cont, _ = run(fresh, 0, 40)
    assert cont == full


def test_state_dict_does_not_alias_live_arrays():
    s = make()
    run(s, 0, 10)
    state = s.state_dict()
    snapshot = roundtrip(state)
    run(s, 10, 20)
    assert_state_equal(state, snapshot)


@pytest.mark.parametrize(("draws", "workers"), [("balanced", 0), ("balanced", 2), ("iid", 0)])
def test_resume_with_real_dataloader_replay(draws, workers):
    """Composer's pattern with a real DataLoader: restore, replay k batches, continue."""
    from torch.utils.data import DataLoader

    from irdro_sampler import IndexedDataset

    ds = IndexedDataset(list(range(N)))

    def train(sampler, first, last, save_at=None):
        loader = DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=workers)
        out, state = {}, None
        step = first
        while step < last:
            epoch, skip = divmod(step, BPE)
            sampler.set_epoch(epoch)
            for j, (_, idx) in enumerate(loader):
                if j < skip:
                    continue  # replayed and discarded
                out[step] = idx.tolist()
                sampler.update(idx, torch.from_numpy(loss_of(idx.numpy(), step)), step=step)
                if step == save_at:
                    state = roundtrip(sampler.state_dict())
                step += 1
                if step >= last:
                    break
        return out, state

    full, state = train(make(draws=draws), 0, 80, save_at=44)
    fresh = make(draws=draws)
    fresh.load_state_dict(state)
    cont, _ = train(fresh, 45, 80)
    assert all(cont[s] == full[s] for s in range(45, 80))


# ------------------------------------------------------------------------------ refused states
@pytest.mark.parametrize(
    ("factory", "key"),
    [
        (lambda: IRDROSampler(N + 1, BATCH), "dataset_size"),
        (lambda: IRDROSampler(N, BATCH * 2), "batch_size"),
        (lambda: IRDROSampler(N, BATCH, num_samples=N // 2), "num_samples"),
        (lambda: IRDROSampler(N, BATCH, num_samples=N, num_replicas=2, rank=1), "num_replicas"),
    ],
)
def test_mismatched_state_raises_and_changes_nothing(factory, key):
    src = make()
    run(src, 0, 12)
    state = roundtrip(src.state_dict())
    target = factory()
    for b in iter_batches(target):
        target.update(b, loss_of(b, 0))
        break
    before = target.state_dict()
    with pytest.raises(ValueError, match=key):
        target.load_state_dict(state)
    assert_state_equal(target.state_dict(), before)


def test_not_a_state_raises():
    s = make()
    with pytest.raises(ValueError, match="state"):
        s.load_state_dict({"foo": 1})
    with pytest.raises(ValueError, match="state"):
        s.load_state_dict(s.table.state_dict())


def test_from_state_dict_rebuilds_an_equal_sampler():
    s = IRDROSampler(100, 10, truncate_quantile=0.9, feedback_delay=2, seed=3)
    for b, idx in enumerate(torch.utils.data.DataLoader(range(100), batch_size=10, sampler=s)):
        s.update(idx, idx.double() / 10, step=b)
    rebuilt = IRDROSampler.from_state_dict(s.state_dict())
    assert_state_equal(rebuilt.state_dict(), s.state_dict())
    s.set_epoch(1)
    rebuilt.set_epoch(1)
    assert list(rebuilt) == list(s)
    with pytest.raises(ValueError, match="not an IRDROSampler state_dict"):
        IRDROSampler.from_state_dict({"table": {}})


def test_state_without_balanced_key_resumes_iid():
    """States written before balanced draws existed (no 'balanced' key) drew i.i.d.: they keep doing so."""
    ref = make(draws="iid")
    full, saved = run(ref, 0, 60, checkpoint_at=(30,))
    old = {k: v for k, v in saved[30].items() if k != "balanced"}
    fresh = make()
    fresh.load_state_dict(old)
    assert fresh.draws == "iid"
    cont, _ = run(fresh, 31, 60)
    assert all(cont[s] == full[s] for s in range(31, 60))


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda b: b.update(offsets=b["offsets"][:-1]), r"offsets.*shape \(500,\)"),
        (lambda b: b.update(offsets=b["offsets"].double()), r"offsets.*torch.float32"),
        (lambda b: b.update(draws=b["draws"].long()), r"draws.*torch.int32"),
        (lambda b: b["offsets"].__setitem__(3, float("nan")), r"offsets.*non-finite"),
        (lambda b: b.update(clock=float("inf")), r"clock.*finite"),
        (lambda b: b.pop("alpha"), r"alpha.*finite"),
        (lambda b: b.update(rekeys="3"), r"rekeys"),
        (lambda b: b.update(mass_total=float("nan")), r"mass_total.*finite number >= 0"),
        (lambda b: b.update(mass_moved=-1.0), r"mass_moved.*finite number >= 0"),
        (lambda b: b.pop("mass_moved"), r"both 'mass_total' and 'mass_moved' or neither"),
    ],
)
def test_malformed_balanced_state_raises_and_changes_nothing(mutate, pattern):
    src = make()
    run(src, 0, 12)
    state = roundtrip(src.state_dict())
    mutate(state["balanced"])
    target = make()
    run(target, 0, 5)
    before = target.state_dict()
    with pytest.raises(ValueError, match=pattern):
        target.load_state_dict(state)
    assert_state_equal(target.state_dict(), before)
    with pytest.raises(ValueError, match="balanced"):
        target.load_state_dict({**roundtrip(src.state_dict()), "balanced": [1, 2]})
    assert_state_equal(target.state_dict(), before)


def test_balanced_state_without_the_running_total_resumes():
    """States saved before the masses' running total was kept: it is recomputed from the leaves (equal to
    the saved run's up to rounding, so the continuation is balanced but not bitwise the same)."""
    ref = make()
    _, saved = run(ref, 0, 60, checkpoint_at=(30,))
    state = saved[30]
    assert state["balanced"]["mass_total"] > 0
    old = {**state, "balanced": {k: v for k, v in state["balanced"].items() if not k.startswith("mass_")}}
    fresh = make()
    fresh.load_state_dict(old)
    assert fresh.draws == "balanced"
    assert fresh.draw_scheme.total == pytest.approx(state["balanced"]["mass_total"], rel=1e-12)
    cont, _ = run(fresh, 31, 60)
    assert sorted(cont) == list(range(31, 60))
