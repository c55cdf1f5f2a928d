"""IRDROSampler: statistical fidelity, live feedback, epochs, determinism, robustness, bad input."""

from __future__ import annotations

import math
import signal
import warnings

import numpy as np
import pytest
import torch
from _core_helpers import (
    P_THRESHOLD,
    assert_state_equal,
    chisquare_pvalue,
    effective_losses,
    iter_batches,
    loss_of,
)
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from irdro_sampler import IndexedDataset, IRDROSampler, kl_dro_weights, kl_to_uniform


class Endless:
    """Iterate a sampler batch by batch across epoch boundaries (set_epoch at each new epoch)."""

    def __init__(self, sampler: IRDROSampler) -> None:
        self.s = sampler
        self.epoch = sampler.epoch
        self.it = iter_batches(sampler)

    def next(self) -> list[int]:
        for batch in self.it:
            return batch
        self.epoch += 1
        self.s.set_epoch(self.epoch)
        self.it = iter_batches(self.s)
        return self.next()


# ------------------------------------------------------------------------------ statistical fidelity
FIDELITY_CASES = [
    # (temperature, uniform_mix, truncate_quantile, truncate_zscore, ema)
    (1.0, 0.0, None, None, 0.5),
    (1.0, 0.2, None, None, 0.5),
    (0.5, 0.1, 0.8, None, 0.5),
    (1.0, 0.0, 0.6, None, 0.5),
    (0.7, 0.05, None, 1.0, 0.5),
    (1e-3, 0.0, None, None, 0.0),
    (1e-3, 0.1, None, None, 0.0),
    (1e3, 0.0, None, None, 0.5),
    (1e3, 0.3, 0.9, None, 0.5),
]


@pytest.mark.parametrize("draws", ["balanced", "iid"])
@pytest.mark.parametrize(("tau", "mix", "quantile", "zscore", "ema"), FIDELITY_CASES)
def test_draws_match_probabilities_chi_square(tau, mix, quantile, zscore, ema, draws):
    n, batch = 150, 500
    s = IRDROSampler(
        n, batch, temperature=tau, uniform_mix=mix, truncate_quantile=quantile, truncate_zscore=zscore,
        ema=ema, feedback_delay=1, refresh_interval=1, num_samples=batch * 10_000, seed=11, draws=draws,
    )
    loop = Endless(s)
    rng = np.random.default_rng(12)
    base = rng.gamma(2.0, 1.0, size=n) * 2
    # Phase 1: a sequence of updates (random subsets, noisy losses, duplicates).
    for step in range(25):
        drawn = loop.next()
        idx = np.concatenate([drawn[:40], rng.integers(0, n, 40)])
        s.update(idx, base[idx] + rng.normal(0, 0.3, idx.size), step=step)
        if tau == 1e-3 and step == 24:
            # A near tie at the top so that the cold distribution has several atoms: e : e^0.5 : 1
            # (ema = 0: the later call of the same step wins).
            top = float(base.max()) + 5.0
            s.update([3, 4, 5], [top, top - 5e-4, top - 1e-3], step=step)
    # Phase 2: no more feedback; the first draw applies the last feedback, then the distribution is fixed.
    counts = np.bincount(loop.next(), minlength=n)
    p = s.probabilities()
    assert p.dtype == np.float64 and p.shape == (n,)
    assert np.all(np.isfinite(p)) and np.all(p >= 0)
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)
    for _ in range(199):
        counts += np.bincount(loop.next(), minlength=n)
    np.testing.assert_array_equal(s.probabilities(), p)  # unchanged: same table, same refit
    pvalue = chisquare_pvalue(counts, p)
    assert pvalue > P_THRESHOLD, pvalue
    if draws == "balanced":  # far tighter than chance: every count within 2 of its expectation
        assert np.abs(counts - 200 * batch * p).max() < 2.0
    # The distribution is the closed form on the table (tilted part over kept samples + floor).
    if quantile is not None or zscore is not None:
        cut = p == mix / n  # cut samples keep only the floor
        assert cut.sum() > 0 and (mix > 0 or counts[cut].sum() == 0)
        assert math.isclose(s.stats()["truncated_fraction"], float(cut.mean()))
    if quantile is not None and zscore is None:
        losses = effective_losses(s.table)
        expect = kl_dro_weights(losses, tau, truncate_quantile=quantile, uniform_mix=mix)
        np.testing.assert_allclose(p, expect, rtol=1e-9, atol=1e-300)
    if tau == 1e-3:
        assert np.count_nonzero(p > 1e-3) >= 3
        if mix == 0.0:
            np.testing.assert_allclose(p[[3, 4, 5]] / p[5], [math.e, math.exp(0.5), 1.0], rtol=1e-3)


def test_probabilities_before_first_draw_and_floor():
    s = IRDROSampler(10, 4, temperature=1.0, uniform_mix=0.5, feedback_delay=1)
    np.testing.assert_allclose(s.probabilities(), np.full(10, 0.1))  # nothing seen: uniform
    s.update(np.arange(10), np.arange(10.0), step=0)
    next(iter(s))  # batch 0: the feedback of step 0 is not due yet
    np.testing.assert_allclose(s.probabilities(), np.full(10, 0.1))
    s.flush()
    expect = kl_dro_weights(np.arange(10.0), 1.0, uniform_mix=0.5)
    np.testing.assert_allclose(s.probabilities(), expect, rtol=1e-6)
    w = s.importance_weights([0, 9])
    np.testing.assert_allclose(w, 1.0 / (10 * expect[[0, 9]]), rtol=1e-6)


def test_importance_weights_of_drawn_batch():
    s = IRDROSampler(50, 8, temperature=0.5, feedback_delay=1, uniform_mix=0.1)
    batches = Endless(s)
    for step in range(3):
        b = batches.next()
        s.update(b, loss_of(b, step), step=step)
    b = batches.next()
    p = s.probabilities()
    np.testing.assert_allclose(s.importance_weights(b, step=3), 1.0 / (50 * p[b]), rtol=1e-12)
    # Unbiasedness of the ERM reweighting: E_p[f(i) / (N p_i)] = mean f, by Monte Carlo.
    f = loss_of(np.arange(50), 0)
    draws = np.random.default_rng(0).choice(50, size=200_000, p=p)
    est = np.mean(f[draws] * s.importance_weights(draws))
    assert math.isclose(est, f.mean(), rel_tol=0.02)


# ------------------------------------------------------------------------------ live feedback, epochs
def test_feedback_changes_distribution_within_epoch():
    n, batch = 100, 10
    s = IRDROSampler(n, batch, temperature=0.5, uniform_mix=0.1, feedback_delay=1, seed=3)
    it = iter_batches(s)
    first = next(it)
    p0 = s.probabilities()
    losses = np.zeros(n)
    losses[7] = 20.0
    s.update(np.arange(n), losses, step=0)
    later = [b for b in it]  # the rest of the SAME epoch
    assert len(later) == s.batches_per_epoch - 1
    p1 = s.probabilities()
    assert p0[7] == pytest.approx(0.01)
    assert p1[7] > 0.85
    hits = sum(b.count(7) for b in later)
    # ~0.9 * 90 = 81 expected; fewer than 60 has probability < 1e-7 under the new distribution.
    assert hits >= 60, hits
    assert first.count(7) <= 3


@pytest.mark.parametrize(
    ("n", "batch", "replicas", "num_samples", "per_rank", "bpe", "last"),
    [
        (103, 10, 1, None, 103, 11, 3),
        (100, 10, 1, None, 100, 10, 10),
        (103, 10, 1, 50, 50, 5, 10),
        (103, 10, 2, None, 52, 6, 2),
        (5, 16, 1, None, 5, 1, 5),
        (10, 3, 1, 100, 100, 34, 1),
    ],
)
def test_epoch_length_and_last_partial_batch(n, batch, replicas, num_samples, per_rank, bpe, last):
    for rank in range(replicas):
        s = IRDROSampler(n, batch, num_samples=num_samples, num_replicas=replicas, rank=rank, feedback_delay=1)
        assert len(s) == per_rank and s.batches_per_epoch == bpe
        for epoch in range(2):
            s.set_epoch(epoch)
            batches = []
            for step_in_epoch, b in enumerate(iter_batches(s)):
                batches.append(b)
                s.update(b, loss_of(b, step_in_epoch), step=epoch * bpe + step_in_epoch)
            assert len(batches) == bpe
            assert [len(b) for b in batches[:-1]] == [batch] * (bpe - 1)
            assert len(batches[-1]) == last
            flat = [i for b in batches for i in b]
            assert len(flat) == per_rank and all(0 <= i < n for i in flat)
            assert all(isinstance(i, int) for i in flat)


def test_is_distributed_sampler_and_dataloader_epoch():
    ds = IndexedDataset([{"x": float(i)} for i in range(37)])
    s = IRDROSampler(ds, 8, feedback_delay=1)
    assert isinstance(s, DistributedSampler)
    loader = DataLoader(ds, batch_size=8, sampler=s)
    assert len(loader) == s.batches_per_epoch == 5
    sizes = []
    for step, batch in enumerate(loader):
        sizes.append(batch["sample_idx"].numel())
        s.update(batch["sample_idx"], batch["x"] * 0.1, step=step)
    assert sizes == [8, 8, 8, 8, 5]


def test_set_start_batch_is_one_shot_and_validated():
    s = IRDROSampler(40, 10, feedback_delay=1)
    full = list(iter_batches(s))
    s2 = IRDROSampler(40, 10, feedback_delay=1)
    s2.set_start_batch(2)
    assert list(iter_batches(s2)) == full[2:]
    assert len(list(iter_batches(s2))) == 4  # the next iter() starts at batch 0 again
    with pytest.raises(ValueError, match="batch_in_epoch"):
        s2.set_start_batch(5)
    with pytest.raises(ValueError, match="batch_in_epoch"):
        s2.set_start_batch(-1)


# ------------------------------------------------------------------------------ determinism
class _Dict(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.tensor([float(i)])}


def _loader_run(num_workers: int, seed: int, feedback: bool = True, epochs: int = 3, draws: str = "balanced") -> list[list[int]]:
    ds = IndexedDataset(_Dict(300))
    s = IRDROSampler(ds, 16, seed=seed, temperature=0.3, truncate_quantile=0.95, draws=draws)  # default feedback_delay
    loader = DataLoader(ds, batch_size=16, sampler=s, num_workers=num_workers)
    out = []
    for epoch in range(epochs):
        s.set_epoch(epoch)
        for batch in loader:
            idx = batch["sample_idx"]
            out.append(idx.tolist())
            if feedback:
                s.update(idx, torch.from_numpy(loss_of(idx.numpy(), len(out) - 1)))  # step=None: auto
    assert s.stats()["late_feedback"] == 0
    return out


@pytest.mark.parametrize("draws", ["balanced", "iid"])
def test_same_seed_same_indices_across_num_workers(draws):
    a = _loader_run(0, seed=5, draws=draws)
    b = _loader_run(2, seed=5, draws=draws)
    assert len(a) == 3 * 19
    assert a == b
    # Plain iteration (no DataLoader) gives the same order too.
    s = IRDROSampler(300, 16, seed=5, temperature=0.3, truncate_quantile=0.95, draws=draws)
    plain = []
    for epoch in range(3):
        s.set_epoch(epoch)
        for batch in iter_batches(s):
            plain.append(batch)
            s.update(batch, loss_of(batch, len(plain) - 1))
    assert plain == a
    # The feedback matters (it reaches batches >= feedback_delay) and so does the seed.
    delay = IRDROSampler(10, 1).feedback_delay
    assert delay >= 2 * 2  # the default covers a DataLoader's default prefetch (num_workers x prefetch_factor)
    no_feedback = _loader_run(0, seed=5, feedback=False, draws=draws)
    assert no_feedback[:delay] == a[:delay] and no_feedback[delay:] != a[delay:]
    assert _loader_run(0, seed=6, feedback=False, draws=draws) != no_feedback


def test_same_seed_same_indices_without_feedback_and_epochs_differ():
    s1, s2 = IRDROSampler(1000, 32, seed=1), IRDROSampler(1000, 32, seed=1)
    e0 = list(iter_batches(s1))
    assert e0 == list(iter_batches(s2))
    s1.set_epoch(1)
    assert list(iter_batches(s1)) != e0


# ------------------------------------------------------------------------------ late feedback, NaN
def test_late_feedback_is_counted_and_applied():
    s = IRDROSampler(20, 4, feedback_delay=2, temperature=1.0, uniform_mix=0.0)
    loop = Endless(s)
    drawn = [loop.next() for _ in range(5)]  # batches 0..4 drawn: feedback of steps <= 2 is overdue
    s.update([11, 12], [5.0, 6.0], step=0)
    assert s.stats()["late_feedback"] == 1
    s.update([13], [1.0], step=3)  # step 3 is still in time (applied before drawing batch 5)
    assert s.stats()["late_feedback"] == 1
    s.update([14], [1.0])  # automatic step 4
    assert s.stats()["late_feedback"] == 1
    assert s.table.counts[11] == 0
    drawn.append(loop.next())  # batch 5
    assert s.table.counts[11] == 1 and s.table.losses[12] == np.float32(6.0)
    assert s.table.counts[13] == 1 and s.table.counts[14] == 0  # step 4 waits for batch 6
    assert s.stats()["pending_feedback"] == 1


def test_nonfinite_losses_are_counted_and_skipped():
    s = IRDROSampler(10, 5, feedback_delay=1)
    s.update([0, 1, 2, 3], [float("nan"), 1.0, float("inf"), -float("inf")], step=0)
    assert s.stats()["skipped_nonfinite"] == 3
    s.flush()
    assert s.table.counts[1] == 1 and np.all(s.table.counts[[0, 2, 3]] == 0)
    assert np.all(np.isnan(s.table.losses[[0, 2, 3]]))
    assert np.all(np.isfinite(s.probabilities()))
    s.update(torch.tensor([4]), torch.tensor([float("nan")]), step=1)
    assert s.stats()["skipped_nonfinite"] == 4
    assert s.table.num_skipped == 4


# ------------------------------------------------------------------------------ numerical robustness
def _assert_tree_is_rebuild(s: IRDROSampler) -> None:
    """The incrementally updated masses equal a rebuild: the sum tree (i.i.d.) bit for bit; for balanced
    draws the leaves bit for bit and their running total within its rounding (see LeafMasses)."""
    structure = s.draw_scheme.tree if s.draws == "iid" else s.draw_scheme.masses
    nodes = structure.nodes.copy()
    n_kept = s.order.weights.kept_count
    s.order.weights.rebuild(rebase=False)
    if s.draws == "iid":
        np.testing.assert_array_equal(nodes, structure.nodes)
    else:
        np.testing.assert_array_equal(nodes[:-1], structure.nodes[:-1])
        assert math.isclose(nodes[-1], structure.nodes[-1], rel_tol=1e-9)
    assert n_kept == s.order.weights.kept_count
    assert np.all(np.isfinite(nodes)) and np.all(nodes >= 0)
    p = s.probabilities()
    assert np.all(np.isfinite(p)) and np.all(p >= 0)
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-9)


@pytest.mark.parametrize("draws", ["iid", "balanced"])
def test_long_run_tree_never_drifts_from_table(draws):
    """200k random losses into N=1000; the incremental masses stay equal to a rebuild."""
    n, batch = 1000, 200
    s = IRDROSampler(
        n, batch, temperature=0.5, uniform_mix=0.1, truncate_quantile=0.97, feedback_delay=1,
        refresh_interval=10**9, num_samples=batch * 10**6, seed=2, draws=draws,
    )
    loop = Endless(s)
    rng = np.random.default_rng(3)
    for step in range(1000):
        b = np.asarray(loop.next())
        losses = rng.exponential(1.0, b.size) * np.where(rng.random(b.size) < 0.01, 30.0, 1.0)
        losses[rng.random(b.size) < 0.001] = np.nan
        s.update(b, losses, step=step)
        if step % 250 == 249:
            _assert_tree_is_rebuild(s)
    loop.next()
    _assert_tree_is_rebuild(s)
    st = s.stats()
    assert st["refreshes"] == 1  # the tree was only ever updated incrementally (plus rebases)
    assert st["skipped_nonfinite"] > 0


@pytest.mark.parametrize("tau", [1e-3, 1e-1, 1.0, 1e3])
def test_extreme_temperatures_and_loss_scales(tau):
    n, batch = 500, 32
    s = IRDROSampler(n, batch, temperature=tau, uniform_mix=0.05, feedback_delay=1, refresh_interval=10**9,
                     num_samples=batch * 10**6, seed=4)
    loop = Endless(s)
    rng = np.random.default_rng(5)
    for step in range(200):
        b = np.asarray(loop.next())
        # Losses spanning six orders of magnitude, sometimes jumping up (new max) or collapsing.
        losses = rng.exponential(1.0, b.size) * 10.0 ** rng.uniform(-3, 3, b.size)
        s.update(b, losses, step=step)
        if step % 50 == 0:
            _assert_tree_is_rebuild(s)
    loop.next()
    _assert_tree_is_rebuild(s)
    st = s.stats()
    assert all(math.isfinite(v) for k, v in st.items() if k != "threshold")
    if tau <= 1.0:
        assert st["rebases"] > 0  # the shift had to follow the losses
    # The tilted part is the closed form on the table.
    p = s.probabilities()
    expect = kl_dro_weights(effective_losses(s.table, st["prior"]), tau, uniform_mix=0.05)
    np.testing.assert_allclose(p, expect, rtol=1e-6, atol=1e-12)


def test_large_n_tree_consistency():
    n, batch = 10**6, 4096
    s = IRDROSampler(n, batch, temperature=0.2, feedback_delay=1, refresh_interval=10**9, seed=6)
    loop = Endless(s)
    rng = np.random.default_rng(7)
    for step in range(12):
        b = np.asarray(loop.next())
        s.update(b, rng.exponential(1.0, b.size) * 10.0 ** rng.uniform(-2, 1, b.size), step=step)
    loop.next()
    _assert_tree_is_rebuild(s)


def test_kl_radius_sampler_calibrates():
    s = IRDROSampler(2000, 100, kl_radius=0.2, uniform_mix=0.0, truncate_zscore=None, feedback_delay=1, refresh_interval=1)
    rng = np.random.default_rng(8)
    s.update(np.arange(2000), rng.gamma(2.0, 1.0, 2000), step=0)
    loop = Endless(s)
    loop.next()
    loop.next()
    assert math.isclose(kl_to_uniform(s.probabilities()), 0.2, rel_tol=5e-3)
    assert s.stats()["temperature"] > 0


# ------------------------------------------------------------------------------ bad input
def _busy_sampler() -> IRDROSampler:
    s = IRDROSampler(100, 8, feedback_delay=3, temperature=0.5, truncate_quantile=0.9)
    loop = Endless(s)
    for step in range(6):
        b = loop.next()
        s.update(b, loss_of(b, step), step=step)
    loop.next()  # a drawn batch not yet reported, and pending feedback
    return s


@pytest.mark.parametrize(
    ("indices", "losses", "kwargs", "exc", "pattern"),
    [
        ([1, 100], [1.0, 2.0], {}, ValueError, r"indices.*100"),
        ([-3, 1], [1.0, 2.0], {}, ValueError, r"indices.*-3"),
        ([1.0, 2.0], [1.0, 2.0], {}, TypeError, r"indices.*float"),
        (np.array([1.5]), [1.0], {}, TypeError, r"indices.*float"),
        ([1, 2, 3], [1.0, 2.0], {}, ValueError, r"same length.*3 and 2"),
        ([[1, 2], [3, 4]], [[1.0, 2.0], [3.0, 4.0]], {}, ValueError, r"indices.*1-D.*\(2, 2\)"),
        ([1, 2], [[1.0, 2.0]], {}, ValueError, r"losses.*1-D"),
        ([1, 2], ["a", "b"], {}, TypeError, r"losses"),
        ([1, 2], [1.0, 2.0], {"step": -1}, ValueError, r"step.*-1"),
        ([1, 2], [1.0, 2.0], {"step": 2.0}, TypeError, r"step.*2\.0"),
        (torch.tensor([1, 200]), torch.tensor([1.0, 2.0]), {}, ValueError, r"indices.*200"),
    ],
)
def test_bad_update_raises_and_changes_nothing(indices, losses, kwargs, exc, pattern):
    s = _busy_sampler()
    before = s.state_dict()
    stats_before = s.stats()
    with pytest.raises(exc, match=pattern):
        s.update(indices, losses, **kwargs)
    assert_state_equal(s.state_dict(), before)
    assert s.stats() == stats_before


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"temperature": 1.0, "kl_radius": 0.1}, ValueError, "kl_radius"),
        ({"temperature": 1.0, "ess_fraction": 0.5}, ValueError, "ess_fraction"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -2.0}, ValueError, "temperature"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"truncate_quantile": 0.0}, ValueError, "truncate_quantile"),
        ({"uniform_mix": 1.5}, ValueError, "uniform_mix"),
        ({"ema": 1.0}, ValueError, "ema"),
        ({"feedback_delay": 0}, ValueError, "feedback_delay"),
        ({"refresh_interval": 0}, ValueError, "refresh_interval"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"seed": -1}, ValueError, "seed"),
        ({"num_replicas": 2, "rank": 2}, ValueError, "rank"),
        ({"num_replicas": 0, "rank": 0}, ValueError, "num_replicas"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_bad_constructor_options(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        IRDROSampler(100, 8, **kwargs)


def test_bad_sizes():
    with pytest.raises(ValueError, match="batch_size"):
        IRDROSampler(100, 0)
    with pytest.raises(ValueError, match="data_source_or_size"):
        IRDROSampler(0, 8)
    with pytest.raises(ValueError, match="data_source_or_size"):
        IRDROSampler([], 8)
    with pytest.raises(TypeError, match="data_source_or_size"):
        IRDROSampler(True, 8)
    with pytest.raises(ValueError, match="epoch"):
        IRDROSampler(10, 2).set_epoch(-1)


def test_stats_keys():
    s = _busy_sampler()
    st = s.stats()
    for key in ("ess_fraction", "kl_to_uniform", "entropy", "max_prob", "seen_fraction", "truncated_fraction",
                "temperature", "threshold", "late_feedback", "skipped_nonfinite"):
        assert key in st and isinstance(st[key], float), key
    assert 0 < st["ess_fraction"] <= 1 and st["kl_to_uniform"] >= 0
    assert 0 < st["seen_fraction"] <= 1 and 0 <= st["truncated_fraction"] < 1
    assert st["temperature"] == 0.5


# ------------------------------------------------------------------------------ bug: all samples cut
class _Timeout(Exception):
    pass


def test_draw_terminates_when_every_sample_is_cut_between_refreshes():
    """All samples seen, then all rise above the cut threshold fixed at the last refresh.

    The tree total and the kept count become 0; the draw must still terminate (e.g. by refreshing
    the threshold) and never return a sample of probability 0.
    """
    s = IRDROSampler(10, 5, feedback_delay=1, refresh_interval=2, truncate_quantile=0.5, uniform_mix=0.1,
                     ema=0.0, num_samples=50)
    loop = Endless(s)
    loop.next()  # batch 0
    s.update(np.arange(10), np.arange(10.0), step=0)
    loop.next()  # batch 1 (feedback of step 0 applied)
    s.update([0], [0.0], step=1)
    loop.next()  # batch 2: refresh, threshold = median of 0..9 = 4.5
    assert s.stats()["threshold"] == pytest.approx(4.5)
    s.update(np.arange(10), np.full(10, 100.0), step=2)  # every sample now above the threshold

    def on_alarm(signum, frame):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(4)
    try:
        batch = loop.next()  # batch 3: no refresh due (3 // 2 == 2 // 2)
    except _Timeout:
        pytest.fail("IRDROSampler hangs drawing a batch when every sample is cut (tree total 0)")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    p = s.probabilities()
    assert math.isclose(p.sum(), 1.0) and np.all(p[batch] > 0)


def test_forgetting_set_epoch_warns():
    """Re-iterating an epoch whose batches were all trained means set_epoch() was forgotten."""
    s = IRDROSampler(40, 10, feedback_delay=1, seed=0)
    for step, idx in enumerate(torch.utils.data.DataLoader(range(40), batch_size=10, sampler=s)):
        s.update(idx, torch.ones(len(idx)), step=step)
    with warnings.catch_warnings():  # reading a few batches of a trained epoch (Composer's spin) is fine
        warnings.simplefilter("error")
        next(iter(s))
    with pytest.warns(UserWarning, match="set_epoch"):
        list(s)
    s.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(s)
