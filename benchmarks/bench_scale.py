"""Benchmark: the sharded table (ShardedIRDROSampler, i.i.d. draws) on 1-8 gloo ranks against one unsharded
IRDROSampler(draws="iid"), through public calls only.

Per configuration and rank: bytes of the sampler's O(N) structures (``nbytes``), peak resident memory
(``ru_maxrss``, which includes torch itself), the first step (the O(N / world) fit and tree build), a
refresh (a step that refits), the median / p90 of a step (``update`` of the gathered global batch's
losses + ``batch(b)``) in wall time and in this process's CPU time, the payload a rank hands to
collectives per step and per refresh (counted by wrapping ``torch.distributed``'s collectives in the
benchmark process: the bytes of every tensor passed), and ``save`` / ``load`` of a checkpoint per rank.
Every rank's feedback is the whole global batch, as after a gather; the global batch is fixed
(B = 4096 over all ranks), so the global batches are the same on every world size.

On one 2-core machine, ranks take turns on the cores: a step's wall time on 8 ranks includes 7 other
ranks' work; its CPU time is what a rank would spend on a machine of its own (plus gloo's threads).

    python benchmarks/bench_scale.py                        # N in {1e7, 2e8}, 1-8 ranks (~15 min)
    python benchmarks/bench_scale.py --n 1e6 --worlds 1 2 --steps 30
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _gloo import free_port, gloo_group
from tqdm import tqdm

from irdro_sampler import IRDROSampler
from irdro_sampler.sharded_sampler import ShardedIRDROSampler

HERE = Path(__file__).resolve().parent
GLOBAL_BATCH = 4096
REFRESH = 20  # refresh_interval: one refit inside the timed steps


def _losses(ids: np.ndarray, step: int) -> np.ndarray:
    return (ids * 2654435761 % 1000) / 400.0 + 0.05 * np.sin(0.3 * step + ids) + 0.01


class _Traffic:
    """Counts the bytes of every tensor this process passes to a collective (the payload it contributes)."""

    def __init__(self) -> None:
        self.bytes = 0
        for name in ("all_reduce", "all_gather", "broadcast", "all_gather_object"):
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(original))

    def _wrap(self, original):
        def counted(*args, **kwargs):
            for a in args:
                if isinstance(a, torch.Tensor):
                    self.bytes += a.numel() * a.element_size()
            return original(*args, **kwargs)

        return counted


def _batches(sampler):
    """Global batches 0, 1, ... each drawn when requested (one rank's batch is the global one unsharded)."""
    if isinstance(sampler, IRDROSampler):
        yield from sampler.iter_batches()
    b = 0
    while True:
        yield sampler.batch(b)[0]
        b += 1


def _measure(sampler, steps: int, traffic: _Traffic | None) -> dict:
    batches = _batches(sampler)
    t0 = time.perf_counter()
    ids = next(batches)
    first = time.perf_counter() - t0
    wall, cpu, thread, sent, refresh = [], [], [], [], []
    for b in range(1, steps + 1):
        before = traffic.bytes if traffic else 0
        t0, c0, h0 = time.perf_counter(), time.process_time(), time.thread_time()
        sampler.update(ids, _losses(ids, b - 1), step=b - 1)
        ids = next(batches)
        dt = time.perf_counter() - t0
        if b % REFRESH == 0:  # a refit step, reported apart
            refresh.append((dt, (traffic.bytes - before) if traffic else 0))
            continue
        wall.append(dt)
        cpu.append(time.process_time() - c0)
        thread.append(time.thread_time() - h0)
        sent.append((traffic.bytes - before) if traffic else 0)
    return {"first": first, "wall": wall, "cpu": cpu, "thread": thread, "sent": sent, "refresh": refresh,
            "rss_steps": _peak_rss()}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rank(rank: int, world: int, port: int, n: int, steps: int, folder: str, draws: str, results) -> None:
    with gloo_group(rank, world, port):
        traffic = _Traffic()
        s = ShardedIRDROSampler(n, GLOBAL_BATCH // world, feedback_delay=4, refresh_interval=REFRESH, draws=draws)
        out = _measure(s, steps, traffic)
        dist.barrier()
        t0 = time.perf_counter()
        s.save(folder)
        out["save"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        s.load(folder)
        out["load"] = time.perf_counter() - t0
        out.update(nbytes=s.nbytes, rss=_peak_rss(), shards=s.shards.num_shards)
        results[rank] = out


def _unsharded(n: int, steps: int, draws: str, results) -> None:
    s = IRDROSampler(n, GLOBAL_BATCH, draws=draws, feedback_delay=4, refresh_interval=REFRESH)
    out = _measure(s, steps, None)
    out.update(nbytes=s.nbytes, rss=_peak_rss(), shards=0,
               save=float("nan"), load=float("nan"))
    results[0] = out


def run(n: int, world: int | None, steps: int, draws: str = "iid") -> dict:
    """``world=None``: one unsharded process (its own process, so its peak memory is its own)."""
    results = mp.Manager().dict()
    if world is None:
        proc = mp.get_context("spawn").Process(target=_unsharded, args=(n, steps, draws, results))
        proc.start()
        proc.join()
        per = [results[0]]
    else:
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_rank, args=(world, free_port(), n, steps, folder, draws, results), nprocs=world, join=True)
            per = [results[r] for r in range(world)]
    wall = np.concatenate([p["wall"] for p in per]) * 1e3
    cpu = np.concatenate([p["cpu"] for p in per]) * 1e3
    thread = np.concatenate([p["thread"] for p in per]) * 1e3
    return {
        "bytes_per_rank": max(p["nbytes"] for p in per),
        "rss_steps": max(p["rss_steps"] for p in per),
        "rss_per_rank": max(p["rss"] for p in per),
        "shards": per[0]["shards"],
        "first_s": max(p["first"] for p in per),
        "refresh_s": float(np.median([r[0] for p in per for r in p["refresh"]])),
        "median_ms": float(np.median(wall)),
        "p90_ms": float(np.percentile(wall, 90)),
        "cpu_ms": float(np.median(cpu)),
        "thread_ms": float(np.median(thread)),
        "sent_per_step": float(np.median([x for p in per for x in p["sent"]])),
        "sent_per_refresh": float(np.median([r[1] for p in per for r in p["refresh"]])),
        "save_s": max(p["save"] for p in per),
        "load_s": max(p["load"] for p in per),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, nargs="*", default=[1e7, 2e8])
    ap.add_argument("--worlds", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--unsharded", type=float, nargs="*", default=[1e7, 2.5e7, 2e8],
                    help="N of the unsharded baselines")
    ap.add_argument("--balanced-n", type=float, nargs="*", default=[1e7],
                    help="N of the balanced-draw rows (unsharded and sharded on --worlds)")
    ap.add_argument("--steps", type=int, default=41)
    ap.add_argument("--out", default=str(HERE / "RESULTS_scale.md"))
    args = ap.parse_args()
    configs = [(int(n), None, "iid") for n in args.unsharded] + [(int(n), w, "iid") for n in args.n for w in args.worlds]
    configs += [(int(n), w, "balanced") for n in args.balanced_n for w in [None, *args.worlds]]
    rows = []
    for n, world, draws in tqdm(configs, desc="configurations"):
        label = ("unsharded" if world is None else f"sharded x{world}") + ("" if draws == "iid" else " balanced")
        tqdm.write(f"N={n:.1e} {label} ...")
        rows.append((n, label, run(n, world, args.steps, draws)))
    load = os.getloadavg()
    lines = [
        "## Sharded table scaling (`benchmarks/bench_scale.py`)",
        "",
        f"Command: `{' '.join(['python', f'benchmarks/{Path(__file__).name}', shlex.join(sys.argv[1:])]).strip()}`",
        "",
        f"One 2-core VM (1-min load at the end {load[0]:.1f}), gloo over 127.0.0.1. Global batch {GLOBAL_BATCH}, "
        f"{args.steps} steps after the first, a refit every {REFRESH} steps (reported apart), i.i.d. draws unless "
        "the row says balanced, "
        "`default_num_shards` virtual shards. Ranks share the 2 cores: wall time on x4 and x8 includes the other "
        "ranks' turns. CPU ms: the rank process's CPU time (gloo's threads and the kernel's loopback work included); "
        "main thread: the sampler's own computation. Peak RSS (includes torch, ~0.45 GB): through the steps, and "
        "after save and load. Sent: the payload a rank hands to collectives.",
        "",
        "| N | sampler | shards | O(N) bytes per rank | bytes / (N / world) | peak RSS steps (MB) | "
        "peak RSS +save/load (MB) | first step s | refresh s | step median ms | step p90 ms | step CPU ms | "
        "main thread ms | sent per step (B) | sent per refresh (B) | save s | load s |",
        "|" + "---|" * 17,
    ]
    for n, label, r in rows:
        world = int(label.split("x")[1].split()[0]) if "x" in label else 1
        lines.append(
            f"| {n:.1e} | {label} | {r['shards']} | {r['bytes_per_rank']:,} | {r['bytes_per_rank'] / (n / world):.2f} | "
            f"{r['rss_steps'] / 2**20:.0f} | {r['rss_per_rank'] / 2**20:.0f} | {r['first_s']:.2f} | "
            f"{r['refresh_s']:.3f} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['cpu_ms']:.2f} | "
            f"{r['thread_ms']:.2f} | {r['sent_per_step']:,.0f} | {r['sent_per_refresh']:,.0f} | "
            f"{r['save_s']:.2f} | {r['load_s']:.2f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
