"""Benchmark: what the first-visit screen adds to a training step's sampler work (public API only).

Per step, a rank does its sampler work (draw the batch, report its losses: ``batch`` + ``update``) and, with
the screen on, one ``screen(indices, losses)`` call for its part of the batch. Measured: the median wall time
of each over ``--steps`` steps (after as many warm-up steps), for the unsharded ``IRDROSampler`` (one process)
and the ``ShardedIRDROSampler`` on 1 and 2 gloo ranks (where the screen is a collective: three all-gathers
and one max-reduction); the max over the ranks. The losses put a quarter of the samples far above the rest, so
the cut is in force and the screen judges first visits throughout.

    python benchmarks/bench_screen.py                 # N = 1e6, per-rank batch 32, 200 steps (~1 min)
    python benchmarks/bench_screen.py --quick         # N = 1e5, 50 steps (smoke run)
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import numpy as np
import torch.multiprocessing as mp
from _gloo import free_port, gloo_group
from tqdm import tqdm

from irdro_sampler import IRDROSampler, ShardedIRDROSampler


def _loss(ids: np.ndarray, step: int) -> np.ndarray:
    """Deterministic losses: a quarter of the ids (ids % 4 == 0) far above the rest."""
    base = (ids * 2654435761 % 1000) / 500.0 + 0.5
    return np.where(ids % 4 == 0, 8.0, base) + 0.01 * np.sin(step + ids)


def _time_steps(draw_and_feed, screen, steps: int, progress: bool) -> tuple[float, float]:
    """Median seconds of the step's sampler work and of its screen call, after ``steps`` warm-up steps."""
    work, scr = [], []
    for b in tqdm(range(2 * steps), disable=not progress, desc="steps", leave=False):
        t0 = time.perf_counter()
        part, losses = draw_and_feed(b)
        t1 = time.perf_counter()
        screen(part, losses)
        t2 = time.perf_counter()
        if b >= steps:
            work.append(t1 - t0)
            scr.append(t2 - t1)
    return statistics.median(work), statistics.median(scr)


def unsharded(n: int, batch: int, steps: int) -> tuple[float, float]:
    s = IRDROSampler(n, batch, seed=0)
    batches = s.iter_batches()

    def draw_and_feed(b: int):
        ids = next(batches)
        losses = _loss(ids, b)
        s.update(ids, losses, step=b)
        return ids, losses

    return _time_steps(draw_and_feed, s.screen, steps, progress=True)


def _sharded_worker(rank: int, world: int, port: int, results, n: int, batch: int, steps: int) -> None:
    with gloo_group(rank, world, port):
        s = ShardedIRDROSampler(n, batch, seed=0)
        parts = s.iter_batches()

        def draw_and_feed(b: int):
            part = next(parts)
            ids, _ = s.batch(b)  # the global batch, as every rank reports the gathered feedback
            s.update(ids, _loss(ids, b), step=b)
            return part, _loss(part, b)

        results[rank] = _time_steps(draw_and_feed, s.screen, steps, progress=rank == 0)


def sharded(n: int, batch: int, steps: int, world: int) -> tuple[float, float]:
    results = mp.Manager().dict()
    mp.spawn(_sharded_worker, args=(world, free_port(), results, n, batch, steps), nprocs=world, join=True)
    return max(results[r][0] for r in range(world)), max(results[r][1] for r in range(world))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    args = ap.parse_args(argv)
    n, steps = (100_000, 50) if args.quick else (1_000_000, 200)
    command = shlex.join(["python", "benchmarks/bench_screen.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"Command: `{command}`")
    print(f"\nN = {n:,}, per-rank batch {args.batch}, median over {steps} steps (after {steps} warm-up steps)\n")
    print("| sampler | ranks | step's sampler work (ms) | screen (ms) | screen / work |")
    print("|---|---|---|---|---|")
    rows = [("IRDROSampler", 1, *unsharded(n, args.batch, steps))]
    for world in (1, 2):
        rows.append(("ShardedIRDROSampler", world, *sharded(n, args.batch, steps, world)))
    for name, world, work, scr in rows:
        print(f"| {name} | {world} | {1e3 * work:.3f} | {1e3 * scr:.3f} | {scr / work:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
