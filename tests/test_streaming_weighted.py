"""WeightedStreamingDataset over real MDS shards (streaming.MDSWriter), local folder as remote."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("streaming")
from _streaming_data import fresh_local, write_mds  # noqa: E402
from scipy import stats  # noqa: E402
from streaming import StreamingDataset  # noqa: E402

from irdro_sampler.integrations.streaming import (  # noqa: E402
    CacheLimitError,
    WeightedStreamingDataset,
    as_map_dataset,
)

N = 3000
BATCH = 10
ROUND = 3000
ALPHA = 1e-3  # fixed seeds make the tests deterministic; this is the level each chi-square must pass


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mds"))
    write_mds(root, N, 100)
    return root


def make(root, round_size=ROUND, **kw):
    kw.setdefault("batch_size", BATCH)
    kw.setdefault("shuffle", True)
    kw.setdefault("shuffle_block_size", 500)
    kw.setdefault("seed", 7)
    return WeightedStreamingDataset(
        round_size=round_size, remote=os.path.join(root, "remote"), local=fresh_local(root), **kw
    )


def loader(ds, num_workers=0, persistent=False):
    return torch.utils.data.DataLoader(
        ds, batch_size=BATCH, num_workers=num_workers, persistent_workers=persistent and num_workers > 0
    )


def take(it, num_batches=None):
    """Sample ids of the next ``num_batches`` batches (all, if None), checking sample_idx == payload id."""
    out = []
    for i, b in enumerate(it):
        assert torch.equal(b["sample_idx"], b["x"])
        out.append(b["sample_idx"].numpy())
        if num_batches is not None and i + 1 == num_batches:
            break
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def binned_chi2(ids, p, bins=50):
    """Chi-square p-value of the draws against probabilities p, on equal-index-width bins."""
    edges = np.linspace(0, len(p), bins + 1).astype(int)
    exp_mass = np.add.reduceat(p, edges[:-1])
    obs = np.add.reduceat(np.bincount(ids, minlength=len(p)), edges[:-1])
    keep = exp_mass > 0
    assert obs[~keep].sum() == 0, "samples with probability 0 were drawn"
    expected = exp_mass[keep] / exp_mass[keep].sum() * len(ids)
    assert expected.min() >= 5, "bins too small for a chi-square test"
    return stats.chisquare(obs[keep], expected).pvalue


def skewed_weights(seed, zero_every=7):
    rng = np.random.default_rng(seed)
    w = rng.random(N) ** 3 + 0.05
    w[::zero_every] = 0.0
    w[:300] *= 6.0  # a strongly up-weighted region
    return w


def test_import_irdro_sampler_does_not_import_streaming():
    code = "import sys, irdro_sampler; assert 'streaming' not in sys.modules, 'streaming imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_plan_round_is_exact_multinomial(data_root):
    """The two-stage (shard, then within-shard) draws have the distribution of flat i.i.d. draws."""
    ds = make(data_root, round_size=300_000, draws="iid")
    w = skewed_weights(1)
    p = w / w.sum()
    units, ids = ds.plan_round(p, 0)
    assert units.sum() == len(ids) == 300_000
    assert np.all(units > 0) and np.all(units <= ds.samples_per_shard.max())
    counts = np.bincount(ids, minlength=N)
    assert counts[p == 0].sum() == 0
    exp = p[p > 0] * len(ids)
    assert exp.min() > 5
    assert stats.chisquare(counts[p > 0], exp).pvalue > ALPHA
    # Shard runs: ids are grouped by shard, the units follow the shard order.
    shard = np.searchsorted(ds.sample_offset_per_shard, ids, side="right") - 1
    assert np.all(np.diff(shard) >= 0)
    # Deterministic in (seed, round, p); another round differs.
    assert np.array_equal(ds.plan_round(p, 0)[1], ids)
    assert not np.array_equal(ds.plan_round(p, 1)[1], ids)


@pytest.mark.parametrize("draws", ["balanced", "iid"])
@pytest.mark.parametrize("num_workers,persistent", [(0, False), (2, False), (2, True)])
def test_rounds_follow_weights(data_root, num_workers, persistent, draws):
    ds = make(data_root, draws=draws)
    dl = loader(ds, num_workers, persistent)
    r0 = take(dl)
    assert len(r0) == ROUND
    assert binned_chi2(r0, np.full(N, 1.0 / N)) > ALPHA
    w = skewed_weights(2)
    ds.set_weights(torch.from_numpy(w))  # torch tensors are accepted too
    r1 = take(dl)
    assert len(r1) == ROUND
    assert binned_chi2(r1, w / w.sum()) > ALPHA
    # The draws are those of the plan (shuffled): same multiset as plan_round with the frozen weights.
    assert np.array_equal(np.sort(r1), np.sort(ds.plan_round(w / w.sum(), 1)[1]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_balanced_rounds_are_epochs_and_track_the_weights(data_root, num_workers):
    """Balanced draws (the default): with uniform weights and round_size = N a round is an epoch without
    replacement; then, with changing weights, every sample's cumulative count stays within two draws of
    its expectation (phase + round_size * sum of its probabilities), through real DataLoader rounds."""
    from irdro_sampler import initial_carry

    ds = make(data_root)  # round_size = N, seed 7
    assert ds.draws == "balanced"
    dl = loader(ds, num_workers, persistent=True)
    r0 = take(dl)
    assert np.array_equal(np.sort(r0), np.arange(N))
    drawn = np.bincount(r0, minlength=N).astype(float)
    expected = initial_carry(N, 7) + ROUND / N
    for r in range(1, 4):
        w = skewed_weights(10 + r)
        ds.set_weights(w)
        ids = take(dl)
        assert np.array_equal(np.sort(ids), np.sort(ds.plan_round(w / w.sum(), r)[1]))
        drawn += np.bincount(ids, minlength=N)
        expected += ROUND * w / w.sum()
        assert np.abs(drawn - expected).max() < 2.0
        assert np.bincount(ids, minlength=N)[w == 0].sum() == 0


def test_draws_scheme_must_match_on_resume(data_root):
    ds = make(data_root, draws="iid")
    sd = ds.state_dict(0, True)
    with pytest.raises(ValueError, match="draws='iid'"):
        make(data_root).load_state_dict(sd)
    with pytest.raises(ValueError, match="draws: expected 'balanced' or 'iid'"):
        make(data_root, draws="sobol")


def test_weight_change_mid_round_affects_only_next_round(data_root):
    ref = make(data_root)
    ref_r0 = take(loader(ref, 2, True))
    ds = make(data_root)
    dl = loader(ds, 2, persistent=True)
    it = iter(dl)
    first = take(it, 100)
    w = np.zeros(N)
    w[:200] = 1.0
    ds.set_weights(w)
    rest = take(it)
    assert np.array_equal(np.concatenate([first, rest]), ref_r0)  # round 0 unchanged
    r1 = take(dl)
    assert len(r1) == ROUND and r1.max() < 200  # round 1 uses the new weights


def _roundtrip(sd, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(sd, path)
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("save_workers,load_workers", [(2, 0), (0, 2)])
def test_resume_mid_round_with_other_worker_count(data_root, tmp_path, save_workers, load_workers):
    w0, w1 = skewed_weights(3), skewed_weights(4, zero_every=3)
    # Uninterrupted reference: weights w0 for round 0, w1 set in the middle of round 0 -> round 1.
    ref = make(data_root)
    ref.set_weights(w0)
    it = iter(loader(ref, 1))
    a = take(it, 120)
    ref.set_weights(w1)
    ref_rounds = [np.concatenate([a, take(it)]), take(loader(ref, 1))]

    ds = make(data_root)
    ds.set_weights(w0)
    it = iter(loader(ds, save_workers))
    head = take(it, 120)
    ds.set_weights(w1)
    sd = ds.state_dict(120 * BATCH, True)
    assert sd["epoch"] == 0 and sd["sample_in_epoch"] == 1200
    assert isinstance(sd["irdro"]["frozen_weights"], torch.Tensor)
    assert isinstance(sd["irdro"]["pending_weights"], torch.Tensor)
    del it
    sd = _roundtrip(sd, tmp_path)

    resumed = make(data_root)
    resumed.load_state_dict(sd)
    # The frozen weights were restored bitwise.
    assert np.array_equal(resumed.round_weights(0), sd["irdro"]["frozen_weights"].numpy())
    dl = loader(resumed, load_workers)
    tail = take(dl)
    assert np.array_equal(np.concatenate([head, tail]), ref_rounds[0])
    assert np.array_equal(take(dl), ref_rounds[1])


def test_resume_at_round_boundary_does_not_replay(data_root, tmp_path):
    w1 = skewed_weights(5)
    ref = make(data_root)
    dl = loader(ref, 2)
    take(dl)
    ref.set_weights(w1)
    ref_r1 = take(dl)

    ds = make(data_root)
    dl = loader(ds, 2)
    take(dl)  # round 0 fully consumed
    ds.set_weights(w1)
    # Composer: the epoch ended, so the sample counter is back at 0.
    sd = _roundtrip(ds.state_dict(0, True), tmp_path)
    assert (sd["epoch"], sd["sample_in_epoch"]) == (1, 0)
    # Counted to the end of the round instead: the round is over, nothing is replayed.
    sd_end = _roundtrip(ds.state_dict(ROUND, True), tmp_path)
    assert (sd_end["epoch"], sd_end["sample_in_epoch"]) == (0, ROUND)

    resumed = make(data_root)
    resumed.load_state_dict(sd)
    assert np.array_equal(take(loader(resumed, 0)), ref_r1)

    resumed = make(data_root)
    resumed.load_state_dict(sd_end)
    dl = loader(resumed, 0)
    assert len(take(dl)) == 0  # the rest of round 0: nothing
    assert np.array_equal(take(dl), ref_r1)


def test_state_before_first_batch_is_not_a_boundary(data_root):
    ds = make(data_root)
    sd = ds.state_dict(0, True)
    assert (sd["epoch"], sd["sample_in_epoch"]) == (0, 0)
    assert sd["irdro"]["frozen_weights"] is None and sd["irdro"]["pending_weights"] is not None


@pytest.mark.parametrize(
    "bad,err",
    [
        (np.ones(N - 1), ValueError),
        (np.ones((N, 1)), ValueError),
        (-np.ones(N), ValueError),
        (np.r_[np.nan, np.ones(N - 1)], ValueError),
        (np.r_[np.inf, np.ones(N - 1)], ValueError),
        (np.zeros(N), ValueError),
        (np.array(["a"] * N), TypeError),
    ],
)
def test_set_weights_rejects_bad_input_and_keeps_previous(data_root, bad, err):
    ds = make(data_root)
    good = skewed_weights(6)
    ds.set_weights(good)
    before = ds.pending_weights()
    with pytest.raises(err, match="weights"):
        ds.set_weights(bad)
    assert np.array_equal(ds.pending_weights(), before)


def test_guards(data_root):
    with pytest.raises(ValueError, match="batching_method"):
        make(data_root, batching_method="stratified")
    with pytest.raises(ValueError, match="batch_size"):
        make(data_root, batch_size=None)
    with pytest.raises(ValueError, match="epoch_size"):
        make(data_root, epoch_size=100)
    with pytest.raises(ValueError, match="round_size"):
        make(data_root, round_size=0)
    with pytest.raises(ValueError, match="round_size"):
        make(data_root, round_size=995, strict_round_size=True)
    with pytest.warns(UserWarning, match="rounding up to 1000") as record:
        ds = make(data_root, round_size=995)
    assert ds.round_size == 1000 and len(ds) == 1000
    assert not any("irdro_sampler" in r.filename for r in record)  # it points at the caller's line
    with pytest.warns(UserWarning, match="rounding up to 1280"):  # py1s: 64 canonical nodes per node
        ds = make(data_root, round_size=1000, shuffle_algo="py1s")
    assert len(take(loader(ds))) == 1280
    ds = make(data_root)
    with pytest.raises(ValueError, match="saved for a dataset of 5 samples"):
        ds.load_state_dict({**make(data_root).state_dict(0, True), "irdro": {**ds.state_dict(0, True)["irdro"], "num_samples": 5}})
    with pytest.raises(ValueError, match="irdro"):
        ds.load_state_dict({"epoch": 0, "sample_in_epoch": 0})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_cache_limit_too_small_is_an_error_not_a_hang(data_root, num_workers):
    ds = make(data_root, cache_limit=12_000)  # 4x the largest shard passes streaming's own check
    with pytest.raises(CacheLimitError, match="cache_limit"):
        take(torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=num_workers, timeout=60 if num_workers else 0))
    # A sufficient limit runs (no thrash error), counting every sample.
    ok = make(data_root, cache_limit=40_000)
    assert len(take(loader(ok, num_workers))) == ROUND


class _StopAtWarning(Exception):
    pass


def test_cache_limit_warning_points_outside_the_package(data_root):
    """cache_check='warn' warns instead of raising; the warning names no file of ours. The test stops the
    iteration at the warning: with this cache streaming evicts shards still needed and may wait forever (what
    the warning says; it did, once, on mosaicml-streaming 0.12)."""
    ds = make(data_root, cache_limit=12_000, cache_check="warn")
    seen: list[tuple[str, str]] = []

    def record(message, category, filename, lineno, file=None, line=None):
        seen.append((str(message), filename))
        if "cache_limit=12000" in str(message):
            raise _StopAtWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        with pytest.raises((_StopAtWarning, RuntimeError), match="_StopAtWarning|^$"):  # streaming may wrap it
            next(iter(torch.utils.data.DataLoader(ds, batch_size=BATCH)))
    ours = [filename for message, filename in seen if "cache_limit=12000" in message]
    assert len(ours) == 1 and "irdro_sampler" not in ours[0], seen


def test_batches_touch_few_shards(data_root):
    """Shard runs handed to streaming's shuffle keep batches on few shards (vs i.i.d. order)."""
    ds = make(data_root, round_size=ROUND)
    ids = take(loader(ds))
    shard = np.searchsorted(ds.sample_offset_per_shard, ids, side="right") - 1
    per_batch = np.mean([len(np.unique(b)) for b in shard.reshape(-1, BATCH)])
    iid = np.random.default_rng(0).permutation(shard)
    per_batch_iid = np.mean([len(np.unique(b)) for b in iid.reshape(-1, BATCH)])
    assert per_batch < 0.7 * per_batch_iid, (per_batch, per_batch_iid)


def test_map_view_with_irdro_sampler(data_root):
    from irdro_sampler import IRDROSampler

    base = StreamingDataset(remote=os.path.join(data_root, "remote"), local=fresh_local(data_root), batch_size=BATCH)
    view = as_map_dataset(base)
    assert len(view) == N
    s = view[1234]
    assert s["sample_idx"] == 1234 and s["x"] == 1234
    with pytest.raises(IndexError):
        view[N]
    with pytest.raises(TypeError):
        view["a"]
    sampler = IRDROSampler(view, BATCH, seed=0, num_replicas=1, rank=0)
    dl = torch.utils.data.DataLoader(view, batch_size=BATCH, sampler=sampler, num_workers=2)
    seen = 0
    for step, b in enumerate(dl):
        assert torch.equal(b["sample_idx"], b["x"])
        sampler.update(b["sample_idx"], b["x"].double() / N, step=step)
        seen += len(b["x"])
        if step == 20:
            break
    assert seen == 21 * BATCH
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError):
            as_map_dataset([1, 2, 3])


def _stream_view(ds):
    """What a state and the round weights of ``ds`` look like (for bitwise before/after comparisons)."""
    sd = ds.state_dict(0, True)
    return ({k: v for k, v in sd.items() if k != "irdro"}, sd["irdro"], ds.pending_weights().tobytes(),
            ds.round_weights(0).tobytes(), ds.fingerprint())


def test_rejected_state_changes_nothing_and_fingerprint_follows_weights(data_root):
    import copy

    src = make(data_root)
    p = np.random.default_rng(3).random(N)
    src.set_weights(p)
    good = src.state_dict(0, True)
    target = make(data_root)
    target.set_weights(np.arange(1, N + 1, dtype=np.float64))
    before = _stream_view(target)

    def bad(path, value):
        state = copy.deepcopy(good)
        node = state
        for key in path[:-1]:
            node = node[key]
        if value is None:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return state

    cases = [
        bad(("irdro", "frozen_round"), None),
        bad(("irdro", "frozen_round"), -7),
        bad(("irdro", "seed"), "7"),
        bad(("irdro", "pending_weights"), torch.full((N,), math.nan, dtype=torch.float64)),
        bad(("irdro", "pending_weights"), torch.full((N,), 5.0, dtype=torch.float64)),  # not probabilities
        bad(("irdro", "carry"), torch.zeros(N - 1, dtype=torch.float64)),
        bad(("sample_in_epoch",), 10**9),
        bad(("epoch",), -1),
        bad(("epoch",), None),
    ]
    for state in cases:
        with pytest.raises(ValueError):
            target.load_state_dict(state)
        after = _stream_view(target)
        assert after[0] == before[0] and after[2:] == before[2:]
    # The fingerprint: equal for equal weights, different otherwise.
    twin = make(data_root)
    twin.set_weights(np.arange(1, N + 1, dtype=np.float64))
    assert twin.fingerprint() == target.fingerprint()
    twin.set_weights(np.arange(1, N + 1, dtype=np.float64)[::-1].copy())
    assert twin.fingerprint() != target.fingerprint()
    assert make(data_root, seed=8).fingerprint() != make(data_root).fingerprint()


def test_an_abandoned_iteration_stops_streamings_threads(data_root):
    """A loop that breaks mid-round (a trainer's batch limit) leaves no polling threads holding the
    dataset (streaming's prepare and ready threads would keep it alive), and the dataset iterates again
    from a fresh round as before."""
    import gc
    import weakref

    ds = make(data_root, draws="iid")
    it = iter(loader(ds))
    take(it, 3)
    ref = weakref.ref(ds)
    del it, ds
    gc.collect()
    assert ref() is None, "an abandoned iteration kept the dataset alive"

    ds = make(data_root, draws="iid")
    take(iter(loader(ds)), 3)
    assert len(take(loader(ds))) == ROUND
