"""Benchmark: what the gates on the cut cost per step and per refresh (public calls only).

The gates (``DROWeighting(cut_learned_ratio=0.5)``, the default, and ``cut_remeasured_only=True``) read
each updated sample's first loss (``LossTable.first_losses``, 4 bytes per sample) on every step and
every sample's on a refresh. This runs the same steps on samplers that differ only in the gate, in
alternating blocks of ``BLOCK`` steps (so load on the shared machine falls on all of them alike), and
prints the step and refresh time of each with the ratio to the ungated sampler.

One step = ``sampler.update(previous batch, losses, step=b - 1)`` then ``next(sampler.iter_batches())``
(feedback_delay 32), the library's defaults otherwise; every sampler gets the same losses per step. The
table is warm (every sample reported once through ``sampler.table.update``). A refresh is timed by
jumping to the next multiple of ``sampler.refresh_interval`` with ``set_start_batch`` and taking one batch
(minus the median plain step).

    python benchmarks/bench_gate_cost.py             # N in 1e6, 1e7, 1e8; B = 4096; both draw schemes
    python benchmarks/bench_gate_cost.py --quick     # N = 1e5, 1e6; seconds
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
from bench_sampler import batch_losses, fill_table, load, machine
from tqdm import tqdm

from irdro_sampler import IRDROSampler

GATES = {
    "ungated": {"cut_learned_ratio": None},
    "learned (default)": {},
    "learned + remeasured": {"cut_remeasured_only": True},
}
BLOCK = 25
REFRESHES = 3


def bench(n: int, b: int, steps: int, draws: str, seed: int, bar: tqdm) -> dict[str, dict]:
    samplers, drawn, iters = {}, {}, {}
    for name, opts in GATES.items():
        s = IRDROSampler(n, b, feedback_delay=32, seed=seed, num_samples=b * 10**7, draws=draws, **opts)
        fill_table(s, np.random.default_rng(seed))  # the same table for every gate
        samplers[name] = s
        iters[name] = s.iter_batches()
        drawn[name] = np.asarray(next(iters[name]))  # batch 0: fit + O(N) build
    rng = np.random.default_rng(seed + 1)
    wall = {name: [] for name in GATES}
    cpu = {name: [] for name in GATES}
    interval = samplers["ungated"].refresh_interval
    for first in range(1, steps + 1, BLOCK):
        block = range(first, min(first + BLOCK, steps + 1))
        losses = [batch_losses(rng, b) for _ in block]
        for name, s in samplers.items():
            for step, loss in zip(block, losses, strict=True):
                w0, c0 = time.perf_counter(), time.process_time()
                s.update(drawn[name], loss, step=step - 1)
                batch = next(iters[name])
                c1, w1 = time.process_time(), time.perf_counter()
                drawn[name] = batch
                if step >= 32 and step % interval:  # steady state, not a refresh step
                    wall[name].append(w1 - w0)
                    cpu[name].append(c1 - c0)
        bar.update(len(block))
    out = {}
    for name, s in samplers.items():
        plain = float(np.median(wall[name]))
        refresh = []
        for k in range(1, REFRESHES + 1):
            target = (steps // interval + k) * interval
            s.set_start_batch(target)
            t0 = time.perf_counter()
            next(s.iter_batches())
            refresh.append(time.perf_counter() - t0 - plain)
        out[name] = {"step_ms": 1e3 * plain, "cpu_ms": 1e3 * float(np.median(cpu[name])),
                     "refresh_s": float(np.median(refresh)), "bytes": s.nbytes / n, "steps": len(wall[name])}
    del samplers, iters
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out-md", type=Path, default=Path(__file__).with_name("RESULTS_gate_cost.md"))
    args = ap.parse_args(argv)
    sizes = [10**5, 10**6] if args.quick else [10**6, 10**7, 10**8]
    steps = args.steps or (100 if args.quick else 400)
    b = 4096
    command = "python benchmarks/bench_gate_cost.py" + (" --quick" if args.quick else "")
    start_load, t0 = load(), time.time()
    rows = []
    with tqdm(total=len(sizes) * 2 * steps, desc="gate cost") as bar:
        for n in sizes:
            for draws in ("balanced", "iid"):
                res = bench(n, b, steps, draws, seed=0, bar=bar)
                base = res["ungated"]
                for name, r in res.items():
                    rows.append([f"{n:.0e}", str(b), draws, name, f"{r['step_ms']:.3f}", f"{r['cpu_ms']:.3f}",
                                 f"{r['step_ms'] / base['step_ms']:.2f}x", f"{r['refresh_s']:.3f}",
                                 f"{r['refresh_s'] / base['refresh_s']:.2f}x", f"{r['bytes']:.2f}"])
                    print(" | ".join(rows[-1]), flush=True)
    head = ["N", "B", "draws", "gate", "step ms", "step CPU ms", "step / ungated", "refresh s", "refresh / ungated",
            "bytes/sample"]
    lines = [
        "## What the gates on the cut cost (`benchmarks/bench_gate_cost.py`)",
        "",
        f"Command: `{command}` ({(time.time() - t0) / 60:.1f} min)",
        "",
        f"Machine: {machine()}. Load average at start {start_load}, at end {load()}: the 2 cores are shared, so",
        "times are noisy; the samplers run in alternating blocks of "
        f"{BLOCK} steps so that load falls on every gate alike.",
        "",
        f"Step = `update` of the previous batch + one batch from `iter_batches()` (library defaults, feedback_delay"
        f" 32; median of {steps - 32} steady steps, refresh steps excluded). Refresh = one batch at the next multiple of"
        f" `refresh_interval` (median of {REFRESHES}) minus the median step. `ungated` = `cut_learned_ratio=None`"
        " (no first losses kept); `learned (default)` = `cut_learned_ratio=0.5`; `learned + remeasured` adds"
        " `cut_remeasured_only=True` (the same first losses, one more compare).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    args.out_md.write_text("\n".join(lines))
    print(f"wrote {args.out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
