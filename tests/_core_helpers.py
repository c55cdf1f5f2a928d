"""Shared helpers for the core tests (sampler iteration, state comparison, chi-square with bin merging)."""

from __future__ import annotations

import contextlib
import itertools
import math
import socket
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

# A correct sampler fails a chi-square test at this level with probability 1e-3 per test; the seeds
# are fixed, so a passing test keeps passing.
P_THRESHOLD = 1e-3


def iter_batches(sampler: Any) -> Iterator[list[int]]:
    """Iterate one epoch of ``sampler`` lazily, batch by batch (as a DataLoader's BatchSampler does).

    The sampler draws batch ``j + 1`` only when its first index is requested, so feedback reported
    between two ``next()`` calls is in time for the next batch.
    """
    it = iter(sampler)
    while True:
        batch = list(itertools.islice(it, sampler.batch_size))
        if not batch:
            return
        yield batch


def loss_of(indices: Any, step: int, seed: int = 1234) -> np.ndarray:
    """A deterministic per-sample loss (a function of the index and the step), float64, > 0."""
    idx = np.asarray(indices, dtype=np.int64)
    base = (idx * 2654435761 + seed) % 1000 / 250.0  # 0 .. 4
    wobble = np.sin(0.1 * step + idx)  # changes over time
    return np.abs(base + 0.3 * wobble) + 0.01


def run_with_feedback(sampler: Any, epochs: int, *, start_epoch: int = 0, step0: int = 0) -> list[list[int]]:
    """Train-loop simulation: iterate ``epochs`` epochs and report :func:`loss_of` after every batch."""
    out = []
    step = step0
    for ep in range(start_epoch, start_epoch + epochs):
        sampler.set_epoch(ep)
        for batch in iter_batches(sampler):
            out.append(batch)
            sampler.update(batch, loss_of(batch, step), step=step)
            step += 1
    return out


def assert_state_equal(a: Any, b: Any, path: str = "state") -> None:
    """Deep equality of two state dicts (tensors compared exactly, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if a.is_floating_point():
            assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{path}: NaN positions differ"
            a, b = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)
        assert torch.equal(a, b), f"{path}: values differ"
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}[{k!r}]")
        return
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_state_equal(x, y, f"{path}[{i}]")
        return
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    assert a == b and type(a) is type(b), f"{path}: {a!r} vs {b!r}"


def assert_plain_state(obj: Any, path: str = "state") -> None:
    """State holds only tensors, numpy-free primitives and containers of them."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str), f"{path}: key {k!r}"
            assert_plain_state(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            assert_plain_state(v, f"{path}[{i}]")
    else:
        assert obj is None or isinstance(obj, (torch.Tensor, bool, int, float, str)), f"{path}: {type(obj)}"
        assert not isinstance(obj, np.generic), f"{path}: numpy scalar {type(obj)}"


def roundtrip(state: dict) -> dict:
    """``state`` through torch.save / torch.load(weights_only=True), as a checkpoint would (plain types checked)."""
    import io

    assert_plain_state(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def chisquare_pvalue(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit of ``counts`` to ``probs``; bins with small expectation are merged.

    Bins are sorted by expected count and the smallest are pooled until every pooled bin expects
    at least ``min_expected`` draws. Returns 1.0 when fewer than two bins remain (nothing to test).
    Bins of probability 0 must be empty (asserted).
    """
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    assert counts.shape == probs.shape
    zero = probs == 0
    assert counts[zero].sum() == 0, f"drew samples of probability 0: {np.nonzero(zero & (counts > 0))[0][:10]}"
    n = counts.sum()
    exp = probs[~zero] * n / probs[~zero].sum()
    obs = counts[~zero]
    order = np.argsort(exp, kind="stable")
    exp, obs = exp[order], obs[order]
    pooled_e, pooled_o = [], []
    acc_e = acc_o = 0.0
    for e, o in zip(exp, obs, strict=True):
        acc_e += e
        acc_o += o
        if acc_e >= min_expected:
            pooled_e.append(acc_e)
            pooled_o.append(acc_o)
            acc_e = acc_o = 0.0
    if acc_e > 0:
        if pooled_e:
            pooled_e[-1] += acc_e
            pooled_o[-1] += acc_o
        else:
            pooled_e.append(acc_e)
            pooled_o.append(acc_o)
    if len(pooled_e) < 2:
        return 1.0
    e = np.array(pooled_e)
    o = np.array(pooled_o)
    e *= o.sum() / e.sum()  # guard against float rounding in the totals
    from scipy import stats as sps  # here: the trainer lanes' venvs import this module without scipy

    return float(sps.chisquare(o, e).pvalue)


def effective_losses(table: Any, prior: float | None = None) -> np.ndarray:
    """A table's running losses as float64 with unseen samples filled with ``prior`` (default: its prior)."""
    out = table.losses.astype(np.float64)
    out[np.isnan(out)] = table.prior_value() if prior is None else prior
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """A gloo process group on 127.0.0.1 for the ``with`` block, destroyed on the way out. On success the
    ranks first meet at a barrier: tearing gloo down while a peer is still inside a collective can hang
    (pytorch#75097). On an error nothing waits for the peers, which would hang on the failed one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


#: Seconds the ranks still running may take to tear gloo down once one rank has exited cleanly.
TEARDOWN_GRACE = 60.0


def spawn_gloo(worker: Any, world: int, *args: Any) -> list[Any]:
    """Run ``worker(rank, world, port, results, *args)`` on ``world`` processes (torch.multiprocessing)
    and return what each rank stored in ``results[rank]``, in rank order.

    A rank that fails fails the call (its traceback raised here). A rank that exits cleanly has passed the
    barrier of :func:`gloo_group`, so every rank has finished its work and stored its results: a rank still
    running :data:`TEARDOWN_GRACE` seconds later is stuck tearing gloo down (seen on this machine, rarely, in
    ``destroy_process_group``: pytorch#75097) and is killed, with a note on stderr, instead of hanging the run."""
    import sys
    import time

    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    ctx = mp.start_processes(worker, args=(world, free_port(), results, *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = None
    while not ctx.join(timeout=1.0):
        if deadline is None and any(p.exitcode == 0 for p in ctx.processes):
            deadline = time.monotonic() + TEARDOWN_GRACE
        if deadline is not None and time.monotonic() > deadline:
            stuck = [rank for rank, p in enumerate(ctx.processes) if p.is_alive()]
            for rank in stuck:
                ctx.processes[rank].kill()
            print(f"spawn_gloo: rank(s) {stuck} of {world} stuck in gloo teardown after the others exited; killed",
                  file=sys.stderr)
            break
    return [results[r] for r in range(world)]


def train_sharded_steps(sampler: Any, first: int, last: int, loss_fn: Any) -> list[np.ndarray]:
    """Global batches ``first .. last - 1`` of a ``ShardedIRDROSampler``, each followed by ``loss_fn(ids, b)``
    as its feedback (what every rank of a sharded training loop does); returns the batches' ids."""
    out = []
    for b in range(first, last):
        ids, _ = sampler.batch(b)
        sampler.update(ids, loss_fn(ids, b), step=b)
        out.append(ids)
    return out


def run_steps(sampler: Any, steps: range, loss_fn: Any, save_after: int | None = None) -> tuple[dict, dict | None]:
    """Global batches ``steps`` of an ``IRDROSampler``, each followed by ``loss_fn(batch, step)`` as its feedback
    (a start mid-epoch uses ``set_start_batch``); returns the batches by step and the state saved (round-tripped)
    after step ``save_after``."""
    batches, saved, it = {}, None, None
    per_epoch = len(sampler) // sampler.batch_size
    for step in steps:
        epoch, j = divmod(step, per_epoch)
        if it is None or j == 0:
            sampler.set_epoch(epoch)
            if j:
                sampler.set_start_batch(j)
            it = iter_batches(sampler)
        b = next(it)
        batches[step] = b
        sampler.update(b, loss_fn(b, step), step=step)
        if step == save_after:
            saved = roundtrip(sampler.state_dict())
    return batches, saved
