"""Benchmark: the sharded table (ShardedIRDROSampler, i.i.d. draws) on 1-4 gloo ranks against one unsharded
IRDROSampler(draws="iid") at the same N, through public calls only.

Per configuration: bytes of the sampler's O(N) structures per rank (the table's and the sum trees'
``nbytes``), peak resident memory per rank (``ru_maxrss``, which includes torch itself), the first step
(the O(N / world) fit and tree build) and the median / p90 of a step (``update`` of the gathered global
batch's losses + ``batch(b)``), with every rank's feedback being the whole global batch, as after a
gather. Global batch fixed (B = 4096 over all ranks), so the global batches are the same on every world
size. Communication per step is the design's (docs/sharding.md): the S shard totals, two B-vectors, two
small flags; it is not measured here.

    python benchmarks/bench_scale.py                 # N in {1e6, 1e7}, 1, 2 and 4 ranks (a few minutes)
    python benchmarks/bench_scale.py --n 1e6 --steps 30
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

from irdro_sampler import IRDROSampler
from irdro_sampler.sharded_sampler import ShardedIRDROSampler

HERE = Path(__file__).resolve().parent
GLOBAL_BATCH = 4096


def _losses(ids: np.ndarray, step: int) -> np.ndarray:
    return (ids * 2654435761 % 1000) / 400.0 + 0.05 * np.sin(0.3 * step + ids) + 0.01


def _time_steps(sampler, steps: int) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    ids, _ = sampler.batch(0) if hasattr(sampler, "shards") else sampler.order.batch(0)
    first = time.perf_counter() - t0
    times = []
    for b in range(1, steps + 1):
        t0 = time.perf_counter()
        sampler.update(ids, _losses(ids, b - 1), step=b - 1)
        ids, _ = sampler.batch(b) if hasattr(sampler, "shards") else sampler.order.batch(b)
        times.append(time.perf_counter() - t0)
    return first, times


def _rank(rank: int, world: int, port: int, n: int, steps: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s = ShardedIRDROSampler(n, GLOBAL_BATCH // world, feedback_delay=4, num_shards=64)
        first, times = _time_steps(s, steps)
        nbytes = s.nbytes
        results[rank] = (nbytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, first, times)
    finally:
        dist.destroy_process_group()


def _unsharded(n: int, steps: int, results) -> None:
    s = IRDROSampler(n, GLOBAL_BATCH, draws="iid", feedback_delay=4)
    first, times = _time_steps(s, steps)
    results[0] = (s.nbytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, first, times)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(n: int, world: int | None, steps: int) -> dict:
    """``world=None``: one unsharded process (its own process, so its peak memory is its own)."""
    results = mp.Manager().dict()
    if world is None:
        proc = mp.get_context("spawn").Process(target=_unsharded, args=(n, steps, results))
        proc.start()
        proc.join()
        per = [results[0]]
    else:
        mp.spawn(_rank, args=(world, _free_port(), n, steps, results), nprocs=world, join=True)
        per = [results[r] for r in range(world)]
    times = np.concatenate([p[3] for p in per]) * 1e3
    return {
        "bytes_per_rank": max(p[0] for p in per),
        "rss_per_rank": max(p[1] for p in per),
        "first_s": max(p[2] for p in per),
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, nargs="*", default=[1e6, 1e7])
    ap.add_argument("--worlds", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=str(HERE / "RESULTS_scale.md"))
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.n):
        for world in [None, *args.worlds]:
            label = "unsharded" if world is None else f"sharded x{world}"
            print(f"N={n:.0e} {label} ...", file=sys.stderr, flush=True)
            rows.append((n, label, run(n, world, args.steps)))
    load = os.getloadavg()
    lines = [
        "## Sharded table scaling (`benchmarks/bench_scale.py`)",
        "",
        f"Command: `python benchmarks/{Path(__file__).name} {shlex.join(sys.argv[1:])}`".rstrip() + "",
        "",
        f"2-core VM shared with a CI run (1-min load at the end {load[0]:.1f}): times are noisy and gloo on one "
        "machine pays process switches that separate machines would not; the bytes are exact. Global batch "
        f"{GLOBAL_BATCH}, {args.steps} steps after the first, i.i.d. draws, 64 virtual shards.",
        "",
        "| N | sampler | O(N) bytes per rank | bytes / (N / world) | peak RSS per rank (MB) | first step s | "
        "step median ms | step p90 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, label, r in rows:
        world = 1 if label == "unsharded" else int(label.split("x")[1])
        lines.append(
            f"| {n:.0e} | {label} | {r['bytes_per_rank']:,} | {r['bytes_per_rank'] / (n / world):.2f} | "
            f"{r['rss_per_rank'] / 2**20:.0f} | {r['first_s']:.2f} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
