"""Benchmark: the cost of one refresh's fit (prior, cut thresholds, temperature, shift) by cut rule, public calls only.

Every ``refresh_interval`` batches the sampler refits its :class:`~irdro_sampler.DROWeighting` on the loss
table (``rule.fit(table)``) and rebuilds its draw structure. This script times the fit alone, for the
default rule (``cut_rule="zscore-mode-split-gated"``: the robust z-score plus one two-component mixture fit of at
most 1024 quantile points, and with groups the split of all samples' log-losses, read from their 1024 quantiles, and
each group's 0.7 quantile) against ``"zscore-mode"`` (the default before; without groups the same
rule), the plain ``"zscore"`` and a fixed ``truncate_quantile=0.99`` (the rule of ``benchmarks/RESULTS_sampler.md``),
without and with 10 groups, on a warm table of N samples whose losses are a
log-normal bulk plus a 15% block of unlearnable samples at a tight high loss (the case the default's mixture
fit exists for). The fit reads at most ``calibration_size`` (2**20) strided samples, so its cost stops growing
with N past 1e6, apart from the O(N) shift.

    python benchmarks/bench_refresh.py           # N in 1e5, 1e6, 1e7; about a minute
    python benchmarks/bench_refresh.py --quick   # N in 1e5, 1e6
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from bench_sampler import machine
from tqdm import tqdm

from irdro_sampler import DROWeighting, LossTable

HERE = Path(__file__).resolve().parent
BATCH = 256
RULES = {
    "default (zscore-mode-split-gated)": {},
    "zscore-mode": {"cut_rule": "zscore-mode"},
    "zscore": {"cut_rule": "zscore"},
    "quantile 0.99": {"truncate_zscore": None, "truncate_quantile": 0.99},
}


def filled_table(n: int, groups: int, seed: int) -> LossTable:
    rng = np.random.default_rng(seed)
    table = LossTable(n, groups=rng.integers(0, groups, n) if groups > 1 else None)
    losses = rng.lognormal(0.0, 0.5, n)
    block = rng.random(n) < 0.15
    losses[block] = 5.5 + 0.02 * rng.standard_normal(int(block.sum()))
    table.update(np.arange(n), losses.astype(np.float32))
    return table


def time_fits(rules: dict[str, DROWeighting], table: LossTable, reps: int) -> dict[str, tuple[float, float]]:
    """Per rule: (median seconds, the cut fraction of the last fit). The rules take turns, one fit each per
    round, so a slow spell of the shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in rules}
    for _ in range(reps):
        for name, rule in rules.items():
            t0 = time.perf_counter()
            rule.fit(table)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, rule in rules.items():
        if table.num_samples > 2 * 10**6:
            out[name] = (statistics.median(times[name]), float("nan"))
        else:
            p = rule.probabilities(table)
            out[name] = (statistics.median(times[name]), float(np.mean(p <= p.min() * (1 + 1e-9))))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N in {1e5, 1e6}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS_refresh.md")
    args = parser.parse_args(argv)
    sizes = [10**5, 10**6] if args.quick else [10**5, 10**6, 10**7]
    rows = []
    jobs = [(n, g) for n in sizes for g in (1, 10)]
    for n, g in tqdm(jobs, desc="tables", file=sys.stderr):
        table = filled_table(n, g, args.seed)
        reps = 7 if n <= 10**6 else 3
        fits = time_fits({name: DROWeighting(**opts) for name, opts in RULES.items()}, table, reps)
        base = fits["zscore"][0]
        for name, (sec, cut) in fits.items():
            # The sampler refits every max(4, N // (16 B)) batches: the extra cost over "zscore" per batch.
            interval = max(4, n // (16 * BATCH))
            rows.append((n, g, name, sec * 1e3, sec / base, (sec - base) * 1e3 / interval, cut))
    head = (f"| N | groups | rule | fit ms (median) | x zscore | extra ms per batch over zscore (B={BATCH}) "
            "| share at the floor |\n|---|---|---|---|---|---|---|")
    lines = [head] + [
        f"| {n:.0e} | {g} | {name} | {ms:.1f} | {ratio:.2f} | {extra:+.2f} | {cut:.3f} |"
        for n, g, name, ms, ratio, extra, cut in rows
    ]
    command = "python benchmarks/bench_refresh.py" + (" --quick" if args.quick else "")
    text = (
        "## Refresh fit cost by cut rule (`benchmarks/bench_refresh.py`)\n\n"
        f"Command: `{command}`\n\nMachine: {machine()}\n\n"
        + (__doc__ or "").split("\n\n")[1].replace("\n", " ") + "\n\n"
        f"`extra ms per batch`: the fit's time over the z-score's, spread over the default refresh interval "
        f"`max(4, N // (16 B))` batches at B = {BATCH}. The machine's 2 cores are shared, so single timings "
        "move by up to 2x between runs; the ratios within one run are the figure.\n\n"
        "`share at the floor`: the share of samples drawn only through `uniform_mix` (cut), from "
        "`rule.probabilities(table)` (not computed at 1e7).\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))
    args.out.write_text(text)
    print(f"wrote {args.out} ({shlex.join(sys.argv)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
