"""Issue 12, items 2-4 in the core: all-or-nothing state loading, extreme values, fingerprints."""

from __future__ import annotations

import copy
import io
import math
import time

import numpy as np
import pytest
import torch
from _core_helpers import assert_state_equal, iter_batches, loss_of

from irdro_sampler import (
    IRDROSampler,
    LossTable,
    kl_dro_weights,
    kl_to_uniform,
    temperature_for_ess,
    temperature_for_kl,
)

N, BATCH = 200, 8


def trained(steps: int = 30, **kw) -> IRDROSampler:
    opts = dict(feedback_delay=3, refresh_interval=4, truncate_quantile=0.9, seed=5)
    opts.update(kw)
    s = IRDROSampler(N, BATCH, **opts)
    for step, b in enumerate(iter_batches(s)):
        if step == steps:
            break
        s.update(b, loss_of(b, step), step=step)
    return s


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _set(state: dict, path: str, value) -> dict:
    """A deep copy of ``state`` with ``path`` ("a.b.c") set to ``value`` (or removed if ``value`` is DEL)."""
    out = copy.deepcopy(state)
    *parents, last = path.split(".")
    node = out
    for p in parents:
        node = node[p]
    if value is DEL:
        del node[last]
    else:
        node[last] = value(node[last]) if callable(value) else value
    return out


DEL = object()


def _with(tensor_fn):
    return lambda t: tensor_fn(t.clone())


def _losses_at_seen(value):
    # Every entry: saved tables mark unseen samples by count 0 (their loss is saved as 0.0, not NaN), so
    # the losses alone do not say which samples are seen; the seen ones get the bad value this way.
    def f(t):
        t = t.clone()
        t[:] = value
        return t

    return f


BAD_SAMPLER_STATES = {
    "missing seed": ("seed", DEL),
    "missing schedule": ("schedule", DEL),
    "missing table": ("table", DEL),
    "missing pending": ("pending", DEL),
    "missing schedule.last_drawn": ("schedule.last_drawn", DEL),
    "refresh_interval 0": ("refresh_interval", 0),
    "feedback_delay -1": ("feedback_delay", -1),
    "seed -1": ("seed", -1),
    "seed float": ("seed", 1.5),
    "block_size 0": ("block_size", 0),
    "epoch -2": ("epoch", -2),
    "version 0": ("version", 0),
    "ema nan": ("table.ema", math.nan),
    "ema 1": ("table.ema", 1.0),
    "prior inf": ("table.prior", math.inf),
    "loss inf": ("table.losses", _losses_at_seen(math.inf)),
    "loss nan": ("table.losses", _losses_at_seen(math.nan)),
    "loss 1e39": ("table.losses", lambda t: _losses_at_seen(1e39)(t.double())),
    "counts negative": ("table.counts", _with(lambda t: t.index_fill_(0, torch.tensor([3]), -1))),
    "counts float": ("table.counts", lambda t: t.double()),
    "losses int": ("table.losses", lambda t: torch.zeros(t.shape, dtype=torch.int64)),
    "losses short": ("table.losses", lambda t: t[:-1].clone()),
    "losses list": ("table.losses", lambda t: t.tolist()),
    "last_step -5": ("table.last_step", _with(lambda t: t.index_fill_(0, torch.tensor([0]), -5))),
    "table num_samples": ("table.num_samples", N + 1),
    "rule temperature 0": ("rule.temperature", 0.0),
    "rule unknown key": ("rule.bogus", 1),
    "rule not dict": ("rule", [1, 2]),
    "params temperature 0": ("params", lambda p: [0.0, *p[1:]]),
    "params nan prior": ("params", lambda p: [p[0], p[1], math.nan, p[3]]),
    "params shift far off": ("params", lambda p: [p[0], p[1], p[2], p[3] - 1e6]),
    "params short": ("params", lambda p: p[:2]),
    "start_batch too large": ("schedule.start_batch", 10**6),
    "seq negative": ("schedule.seq", -1),
    "counters negative": ("counters.refreshes", -3),
    "counters float": ("counters.refreshes", 2.5),
    "pending index N": ("pending.indices", _with(lambda t: t.index_fill_(0, torch.tensor([0]), N))),
    "pending index 1e9": ("pending.indices", _with(lambda t: t.index_fill_(0, torch.tensor([0]), 10**9))),
    "pending index negative": ("pending.indices", _with(lambda t: t.index_fill_(0, torch.tensor([0]), -1))),
    "pending loss nan": ("pending.values", _with(lambda t: t.index_fill_(0, torch.tensor([0]), math.nan))),
    "pending offsets": ("pending.offsets", _with(lambda t: t.index_fill_(0, torch.tensor([1]), 10**6))),
    "pending step negative": ("pending.keys", _with(lambda t: t.index_fill_(1, torch.tensor([0]), -4))),
    "drawn prob 2": ("drawn.values", _with(lambda t: t.index_fill_(0, torch.tensor([0]), 2.0))),
    "drawn index 1e9": ("drawn.indices", _with(lambda t: t.index_fill_(0, torch.tensor([0]), 10**9))),
    "digest not hex": ("feedback_digest", "zz" * 16),
    "dataset_size": ("dataset_size", N + 1),
}


@pytest.mark.parametrize("name", sorted(BAD_SAMPLER_STATES))
def test_rejected_state_leaves_sampler_bitwise_unchanged(name):
    path, value = BAD_SAMPLER_STATES[name]
    good = roundtrip(trained().state_dict())
    assert good["pending"]["indices"].numel() and good["drawn"]["indices"].numel()  # the mutations bite
    bad = _set(good, path, value)
    target = trained(steps=12, seed=9, temperature=0.7)
    twin = trained(steps=12, seed=9, temperature=0.7)
    before, fp = target.state_dict(), target.fingerprint()
    with pytest.raises(ValueError) as err:
        target.load_state_dict(bad)
    assert "\n" not in str(err.value)
    assert_state_equal(target.state_dict(), before)
    assert target.fingerprint() == fp
    assert np.array_equal(target.probabilities(), twin.probabilities())
    # ... and it keeps drawing exactly what an untouched twin draws.
    target.set_epoch(1)
    twin.set_epoch(1)
    assert list(target) == list(twin)
    # The same state is refused by from_state_dict too (before any allocation).
    with pytest.raises(ValueError):
        IRDROSampler.from_state_dict(bad)


def test_good_state_still_loads_and_unseen_placeholders_are_accepted():
    src = trained()
    state = roundtrip(src.state_dict())
    unseen = state["table"]["counts"] == 0
    assert unseen.any()
    # A saved table may store any placeholder for unseen samples (counts == 0): they load as unseen.
    state["table"]["losses"] = torch.where(unseen, torch.zeros_like(state["table"]["losses"]), state["table"]["losses"])
    fresh = IRDROSampler(N, BATCH)
    fresh.load_state_dict(state)
    assert_state_equal(fresh.state_dict(), src.state_dict())
    assert fresh.fingerprint() == src.fingerprint()


def test_huge_claimed_sizes_are_refused_quickly():
    state = roundtrip(trained().state_dict())
    for key in ("dataset_size", "table.num_samples"):
        bad = _set(state, key, 10**12)
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match="num_samples|dataset_size|shape"):
            IRDROSampler.from_state_dict(bad)
        assert time.perf_counter() - t0 < 1.0
    with pytest.raises(ValueError, match="shape"):
        LossTable.from_state_dict(_set(state["table"], "num_samples", 10**12))


def test_loss_table_rejects_and_keeps_state():
    t = LossTable(20, ema=0.3)
    t.update([1, 2, 3], [1.0, 2.0, 3.0], step=4)
    good = roundtrip(t.state_dict())
    before = t.state_dict()
    bads = [
        _set(good, "ema", math.nan),
        _set(good, "losses", _losses_at_seen(math.inf)),
        _set(good, "counts", _with(lambda c: c.index_fill_(0, torch.tensor([0]), -1))),
        _set(good, "num_skipped", -1),
        _set(good, "prior", "median"),
        _set(good, "last_step", lambda s: s.float()),
        _set(good, "counts", DEL),
        {"num_samples": 20},
        "not a dict",
    ]
    for bad in bads:
        with pytest.raises(ValueError):
            t.load_state_dict(bad)
        assert_state_equal(t.state_dict(), before)
    # Old states (NaN for unseen) and placeholder states (0.0 for unseen) both load.
    u = LossTable(20)
    u.load_state_dict(_set(good, "losses", lambda x: torch.nan_to_num(x, nan=0.0)))
    assert_state_equal(u.state_dict(), before)
    assert LossTable.from_state_dict(good).num_seen == 3


def test_rejected_set_start_batch_changes_nothing():
    s = IRDROSampler(100, 10, seed=1)
    ref = IRDROSampler(100, 10, seed=1)
    s.set_start_batch(3)
    for bad in (11, -1, 2.5, "4"):
        with pytest.raises((ValueError, TypeError)):
            s.set_start_batch(bad)
    ref.set_start_batch(3)
    assert list(s) == list(ref)
    assert len(list(IRDROSampler(100, 10, seed=1))) == 100


# ------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("value", [1e39, -1e39, 1.7e308])
def test_losses_beyond_float32_are_skipped_and_counted(value):
    s = IRDROSampler(10, 2, feedback_delay=1)
    s.update([0, 1], np.array([value, 2.0]), step=0)
    s.flush()
    assert s.stats()["skipped_nonfinite"] == 1
    assert np.isnan(s.table.losses[0]) and s.table.losses[1] == 2.0
    assert np.all(np.isfinite(s.probabilities())) and s.probabilities().sum() == pytest.approx(1.0)
    t = LossTable(3)
    t.update([2], [value])
    assert t.num_skipped == 1 and t.num_seen == 0
    # The largest float32 itself is kept.
    t.update([2], [float(np.finfo(np.float32).max)])
    assert t.losses[2] == np.finfo(np.float32).max


@pytest.mark.parametrize(
    "losses",
    [
        torch.tensor([1.5, 2.25, 0.125], dtype=torch.bfloat16),
        torch.tensor([1.5, 2.25, 0.125], dtype=torch.float16),
        torch.tensor([1.5, 2.25, 0.125], dtype=torch.float64),
        torch.tensor([1, 2, 0], dtype=torch.int8),
        np.array([1.5, 2.25, 0.125], dtype=np.float16),
        np.array([1.5, 2.25, 0.125], dtype=np.longdouble),
    ],
    ids=["bf16", "f16", "f64", "int8", "np-f16", "np-longdouble"],
)
def test_every_real_dtype_is_accepted(losses):
    s = IRDROSampler(5, 3, feedback_delay=1)
    s.update(torch.tensor([0, 1, 2]), losses, step=0)
    s.flush()
    want = np.asarray(torch.as_tensor(np.asarray(losses, dtype=np.float64) if isinstance(losses, np.ndarray) else losses.double()))
    np.testing.assert_array_equal(s.table.losses[:3], want.astype(np.float32))


def test_complex_losses_are_refused():
    with pytest.raises(TypeError, match="losses"):
        LossTable(3).update([0], torch.tensor([1 + 2j]))


EXTREME = [
    [0.0, 1e153],
    [0.0, 1e308],
    [-1.7e308, 1.7e308],
    [1e308, 0.0, 1.0],
    [0.0, 5e-324],
    [1.0, 1.0 + 2.3e-16],
    [1e300, 1.0000000000000011e300],
    [0.0, 1e-300, 3e-300],
    [-5.0, 3.0, 2.0, 1e-3],
]


@pytest.mark.parametrize("losses", EXTREME, ids=range(len(EXTREME)))
@pytest.mark.parametrize("target", [1e-12, 1e-3, 0.1, 0.5, 1.0, 50.0])
def test_temperature_search_is_finite_positive_and_bounded(losses, target):
    for fn, arg in ((temperature_for_kl, target), (temperature_for_ess, min(target, 1.0))):
        t0 = time.perf_counter()
        tau = fn(losses, arg)
        assert math.isfinite(tau) and tau > 0, (fn.__name__, losses, target, tau)
        assert time.perf_counter() - t0 < 0.5
    # Even an absurd tolerance ends (the loop is bounded).
    assert temperature_for_kl(losses, target, rtol=1e-300) > 0


@pytest.mark.parametrize("scale", [1e-300, 1e-150, 1.0, 1e150, 1e300])
def test_temperature_search_is_scale_free(scale):
    """KL depends on l / tau only: scaled losses give the scaled temperature, and it meets the radius."""
    base = np.array([0.0, 0.2, 0.5, 1.0, 0.7, 0.3])
    ref = temperature_for_kl(base, 0.1)
    tau = temperature_for_kl(base * scale, 0.1)
    assert tau == pytest.approx(ref * scale, rel=1e-9)
    p = kl_dro_weights(base * scale, tau)
    assert kl_to_uniform(p) == pytest.approx(0.1, rel=1e-3)
    assert temperature_for_ess(base * scale, 0.5) == pytest.approx(temperature_for_ess(base, 0.5) * scale, rel=1e-9)


def test_kl_dro_weights_extreme_losses_are_finite():
    np.testing.assert_array_equal(kl_dro_weights([1e308, 0, 1], 1e-3), [1.0, 0.0, 0.0])
    p = kl_dro_weights([-1.7e308, 1.7e308, 0.0], 1e-3, truncate_quantile=0.5)
    np.testing.assert_array_equal(p, [0.0, 0.0, 1.0])
    p = kl_dro_weights([1e308, -1e308, 5.0], 1e300, uniform_mix=0.5)
    assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ fingerprint
def test_fingerprint_equal_when_everything_agrees_and_not_the_rank():
    a = IRDROSampler(N, BATCH, num_replicas=2, rank=0, feedback_delay=2)
    b = IRDROSampler(N, BATCH, num_replicas=2, rank=1, feedback_delay=2)
    for step, (x, y) in enumerate(zip(iter_batches(a), iter_batches(b), strict=False)):
        if step == 10:
            break
        for s in (a, b):  # every rank applies the gathered feedback of all ranks
            s.update(x + y, loss_of(x + y, step), step=step)
    assert a.fingerprint() == b.fingerprint()
    assert a.stats()["refreshes"] > 0 and a.table.num_seen > 0
    assert isinstance(a.fingerprint(), int) and -(2**63) <= a.fingerprint() < 2**63


@pytest.mark.parametrize(
    "change",
    [dict(seed=6), dict(temperature=0.5), dict(truncate_quantile=0.8), dict(uniform_mix=0.2), dict(ema=0.4),
     dict(feedback_delay=4), dict(refresh_interval=5), dict(draws="iid")],
    ids=lambda d: next(iter(d)),
)  # fmt: skip
def test_fingerprint_differs_when_an_option_differs(change):
    assert trained(steps=0).fingerprint() != trained(steps=0, **change).fingerprint()


def test_fingerprint_covers_the_tree_fanout_of_iid_draws():
    assert trained(steps=0, draws="iid").fingerprint() != trained(steps=0, draws="iid", block_size=4).fingerprint()


def test_block_size_needs_a_tree():
    with pytest.raises(ValueError, match="block_size.*draws='balanced' keeps no tree"):
        IRDROSampler(N, BATCH, block_size=4)


def test_fingerprint_follows_applied_feedback():
    a, b = IRDROSampler(N, BATCH, feedback_delay=1), IRDROSampler(N, BATCH, feedback_delay=1)
    assert a.fingerprint() == b.fingerprint()
    a.update([1, 2], [0.5, 0.25], step=0)
    b.update([1, 2], [0.5, 0.26], step=0)
    a.flush()
    b.flush()
    assert a.fingerprint() != b.fingerprint()
    c = IRDROSampler(N, BATCH, feedback_delay=1)
    c.update([1, 2], [0.5, 0.25], step=0)
    c.flush()
    assert c.fingerprint() == a.fingerprint()


def test_fingerprint_survives_resume_and_old_states():
    ref = trained(steps=40)
    half = trained(steps=20)
    resumed = IRDROSampler.from_state_dict(roundtrip(half.state_dict()))
    assert resumed.fingerprint() == half.fingerprint()
    for step, b in enumerate(iter_batches(resumed)):
        if step < 20:
            continue
        if step == 40:
            break
        resumed.update(b, loss_of(b, step), step=step)
    # Same feedback as the uninterrupted run: same fingerprint (and same state).
    assert resumed.fingerprint() == ref.fingerprint()
    # A state saved before fingerprints existed: derived from its table, equal wherever it is loaded.
    old = _set(roundtrip(half.state_dict()), "feedback_digest", DEL)
    x, y = IRDROSampler.from_state_dict(old), IRDROSampler.from_state_dict(old)
    assert x.fingerprint() == y.fingerprint()
