"""Benchmark: IRDROSampler step cost (update B losses + draw B indices) against naive O(N) samplers.

One step of every method = apply the B losses of a batch to the weights, then draw the next B
indices. For IRDROSampler that is ``sampler.update(idx, losses, step=b - 1)`` followed by drawing
global batch ``b`` (``sampler._batch``, what ``__iter__`` calls; feedback_delay 32, so each draw
applies the feedback of step b - 32). The naive methods keep a float64 weight vector ``w`` of N
tilted masses, set the B updated entries (``w[idx] = exp((loss - shift) / tau)``) and then draw with

* ``torch.multinomial(w, B, replacement=True)`` (refuses more than 2**24 categories),
* ``numpy.random.Generator.choice(N, B, p=w / w.sum())``,
* ``np.cumsum(w)`` + ``np.searchsorted``,

each of which is O(N) per step. IRDROSampler runs with both draw schemes: ``draws="iid"`` (the sum
tree draw) and ``draws="balanced"`` (the default: stride scheduling over a min-tree of due times), side
by side. Reported per (N, B): median and CPU-time median ms per step,
mean ms per step including the amortised periodic O(N) refresh (every ``refresh_interval`` steps),
build time, bytes per sample of the whole sampler state (loss table + tree arrays, ``nbytes``), and
the ratio naive / ours. Results go to ``benchmarks/RESULTS_sampler.md`` and a log-log plot to
``benchmarks/bench_sampler.png``.

    python benchmarks/bench_sampler.py            # full: N in 1e5..1e8, B in {256, 4096} (~15 min)
    python benchmarks/bench_sampler.py --quick    # N in 1e5, 1e6; a few seconds
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from irdro_sampler import IRDROSampler

HERE = Path(__file__).resolve().parent
TORCH_MAX_CATEGORIES = 2**24
TEMPERATURE = 1.0
NAIVE = ("torch.multinomial", "numpy choice", "cumsum+searchsorted")


# ------------------------------------------------------------------------------------------ helpers
def fill_table(sampler: IRDROSampler, rng: np.random.Generator) -> None:
    """Mark every sample seen once with a loss ~ Gamma(2, 0.5) (a warm table, as after one epoch).

    Written straight into the table arrays, chunk by chunk: feeding 1e8 losses through ``update``
    would only time the benchmark's set-up.
    """
    table = sampler.table
    chunk = 1 << 22
    for start in range(0, table.num_samples, chunk):
        stop = min(start + chunk, table.num_samples)
        table.losses[start:stop] = rng.gamma(2.0, 0.5, stop - start).astype(np.float32)
    table.counts[:] = 1
    table.last_step[:] = 0
    table.num_seen = table.num_samples


def batch_losses(rng: np.random.Generator, size: int) -> np.ndarray:
    """Per-sample losses of a batch: mostly Gamma(2, 0.5), 2% heavy (noisy-label-like) outliers."""
    losses = rng.gamma(2.0, 0.5, size)
    losses[rng.random(size) < 0.02] *= 8.0
    return losses


def state_nbytes(sampler: IRDROSampler) -> int:
    """Bytes of the sampler's O(N) memory: the loss table's arrays, the tree, and for balanced draws
    the credits, draw counts and key tree."""
    total = sum(a.nbytes for a in (sampler.table.losses, sampler.table.counts, sampler.table.last_step))
    stride = sampler._stride
    if stride is not None:
        total += stride.offsets.nbytes + stride.draws.nbytes + stride.keys.nbytes
    # The tree's own count (its levels are 64-byte-aligned views into slightly larger buffers, plus
    # reshaped views of them, so counting arrays that own their memory would miss them).
    return total + sampler._tree.nbytes


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, {mem} RAM, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )


def load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------------- ours
def bench_ours(n: int, b: int, steps: int, seed: int, draws: str = "iid") -> dict:
    rng = np.random.default_rng(seed)
    gc.collect()
    t0 = time.perf_counter()
    sampler = IRDROSampler(n, b, temperature=TEMPERATURE, truncate_quantile=0.99, uniform_mix=0.1,
                           feedback_delay=32, seed=seed, num_samples=b * 10**7, draws=draws)
    t_alloc = time.perf_counter() - t0
    fill_table(sampler, rng)
    t0 = time.perf_counter()
    drawn, _ = sampler._batch(0, b)  # first draw: fit (prior, cut, shift) + O(N) tree build
    t_first = time.perf_counter() - t0
    interval = sampler.refresh_interval
    delay = sampler.feedback_delay
    wall, cpu, refreshed = [], [], []
    for step in range(1, steps + 1):
        losses = batch_losses(rng, b)
        before = sampler._counters["refreshes"]
        w0, c0 = time.perf_counter(), time.process_time()
        sampler.update(drawn, losses, step=step - 1)
        drawn, _ = sampler._batch(step, b)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        refreshed.append(sampler._counters["refreshes"] != before)
    # Steady state: feedback is applied from step `delay` on.
    wall_a, cpu_a, ref_a = np.array(wall[delay:]), np.array(cpu[delay:]), np.array(refreshed[delay:])
    plain = wall_a[~ref_a] if (~ref_a).any() else wall_a
    refresh_cost = float(np.mean(wall_a[ref_a]) - np.mean(plain)) if ref_a.any() and (~ref_a).any() else None
    if refresh_cost is None:  # every step refreshes (small N), or none did in this window
        mean_amortised = float(np.mean(wall_a)) if ref_a.all() else None
    else:
        mean_amortised = float(np.mean(plain)) + refresh_cost / interval
    out = {
        "median_ms": 1e3 * float(np.median(wall_a)),
        "cpu_median_ms": 1e3 * float(np.median(cpu_a)),
        "p90_ms": 1e3 * float(np.percentile(wall_a, 90)),
        "mean_amortised_ms": None if mean_amortised is None else 1e3 * mean_amortised,
        "refresh_interval": interval,
        "refresh_s": refresh_cost,
        "alloc_s": t_alloc,
        "build_s": t_first,
        "bytes_per_sample": state_nbytes(sampler) / n,
        "steps": len(wall_a),
        "rekeys": float(sampler._stride.rekeys if sampler._stride else 0),
    }
    del sampler
    gc.collect()
    return out


# --------------------------------------------------------------------------------------- naive
def bench_naive(method: str, n: int, b: int, reps: int, seed: int) -> float | None:
    """Median ms per step of one naive method (None: the method refuses this N)."""
    if method == "torch.multinomial" and n > TORCH_MAX_CATEGORIES:
        return None
    rng = np.random.default_rng(seed)
    losses = np.empty(n, dtype=np.float64)
    chunk = 1 << 22
    for start in range(0, n, chunk):
        losses[start : start + chunk] = rng.gamma(2.0, 0.5, min(chunk, n - start))
    shift = float(losses.max())
    w = losses  # reuse the buffer: w = exp((l - shift) / tau), in place
    w -= shift
    w /= TEMPERATURE
    np.exp(w, out=w)
    w_torch = torch.from_numpy(w)  # shares memory with w
    times = []
    for _ in range(reps + 1):  # +1: the first repetition warms up and is dropped
        idx = rng.integers(0, n, b)
        new = np.exp((batch_losses(rng, b) - shift) / TEMPERATURE)
        t0 = time.perf_counter()
        w[idx] = new  # the O(B) weight update every method needs
        if method == "torch.multinomial":
            out = torch.multinomial(w_torch, b, replacement=True)
        elif method == "numpy choice":
            out = rng.choice(n, size=b, p=w / w.sum())
        else:
            cdf = np.cumsum(w)
            out = np.searchsorted(cdf, rng.random(b) * cdf[-1], side="right")
        times.append(time.perf_counter() - t0)
        del out
    del w, w_torch, losses
    gc.collect()
    return 1e3 * statistics.median(times[1:])


def naive_reps(method: str, n: int, quick: bool) -> int:
    if method == "numpy choice" and n >= 10**8:
        return 2  # ~2-4 s per draw at 1e8
    base = 3 if n >= 10**8 else 5 if n >= 10**7 else 15 if n >= 10**6 else 40
    return max(2, base // 2) if quick else base


def our_steps(n: int, b: int, quick: bool) -> int:
    interval = max(1, n // (64 * b))
    # Cover one refresh past the 32-step warm-up, within reason (steps cost ~ms).
    steps = min(max(300, interval + 80), 7000)
    return min(steps, 200) if quick else steps


# ----------------------------------------------------------------------------------------- report
def fmt_ms(x: float | None) -> str:
    return "refused" if x is None else f"{x:.3g}" if x < 100 else f"{x:.0f}"


def ratio(naive: float | None, ours: float) -> str:
    return "-" if naive is None else f"{naive / ours:.0f}x" if naive / ours >= 10 else f"{naive / ours:.1f}x"


def table_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["N", "B", "ours median ms", "ours CPU ms", "ours mean ms (amortised refresh)", "refresh every",
            "refresh s", "build s", "bytes/sample", "balanced median ms", "balanced CPU ms",
            "balanced mean ms (amortised refresh)", "balanced / iid", "balanced refresh s", "balanced bytes/sample"]
    for m in NAIVE:
        head += [f"{m} ms", "ratio"]
    rows = []
    for r in results:
        o = r["ours"]
        row = [f"{r['n']:.0e}", str(r["b"]), f"{o['median_ms']:.3f}", f"{o['cpu_median_ms']:.3f}",
               "-" if o["mean_amortised_ms"] is None else f"{o['mean_amortised_ms']:.3f}",
               str(o["refresh_interval"]), "-" if o["refresh_s"] is None else f"{o['refresh_s']:.2f}",
               f"{o['alloc_s'] + o['build_s']:.2f}", f"{o['bytes_per_sample']:.2f}"]
        bal = r.get("balanced")
        if bal is None:
            row += ["not run"] + ["-"] * 5
        else:
            row += [f"{bal['median_ms']:.3f}", f"{bal['cpu_median_ms']:.3f}",
                    "-" if bal["mean_amortised_ms"] is None else f"{bal['mean_amortised_ms']:.3f}",
                    f"{bal['median_ms'] / o['median_ms']:.2f}x",
                    "-" if bal["refresh_s"] is None else f"{bal['refresh_s']:.2f}", f"{bal['bytes_per_sample']:.2f}"]
        for m in NAIVE:
            if m not in r["naive"]:
                row += ["not run", "-"]
            else:
                row += [fmt_ms(r["naive"][m]), ratio(r["naive"][m], o["median_ms"])]
        rows.append(row)
    return head, rows


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def targets(results: list[dict]) -> list[str]:
    hit = [r for r in results if r["n"] == 10**8 and r["b"] == 4096]
    if not hit:
        return ["(targets are defined at N=1e8, B=4096: not part of this run)"]
    o, naive = hit[0]["ours"], hit[0]["naive"]
    cs = naive.get("cumsum+searchsorted")
    lines = [
        f"- median per step {o['median_ms']:.3f} ms (target <= 2.5 ms): "
        f"{'MET' if o['median_ms'] <= 2.5 else 'NOT MET'}",
        f"- bytes per sample {o['bytes_per_sample']:.2f} (target <= 24): "
        f"{'MET' if o['bytes_per_sample'] <= 24 else 'NOT MET'}",
    ]
    if cs is not None:
        lines.insert(1, f"- cumsum+searchsorted / ours = {cs / o['median_ms']:.0f}x (target >= 100x): "
                        f"{'MET' if cs / o['median_ms'] >= 100 else 'NOT MET'}")
    bal = hit[0].get("balanced")
    if bal is not None:
        ratio_ = bal["median_ms"] / o["median_ms"]
        lines.append(f"- balanced / iid median step {ratio_:.2f}x (target <= 1.5x): {'MET' if ratio_ <= 1.5 else 'NOT MET'}")
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    batches = sorted({r["b"] for r in results})
    styles = {256: "--", 4096: "-"}
    colors = {"IRDROSampler": "C0", "IRDROSampler balanced": "C4", "torch.multinomial": "C1", "numpy choice": "C2",
              "cumsum+searchsorted": "C3"}
    for b in batches:
        rs = sorted((r for r in results if r["b"] == b), key=lambda r: r["n"])
        series = {"IRDROSampler": [(r["n"], r["ours"]["median_ms"]) for r in rs],
                  "IRDROSampler balanced": [(r["n"], r["balanced"]["median_ms"]) for r in rs if "balanced" in r]}
        for m in NAIVE:
            series[m] = [(r["n"], r["naive"][m]) for r in rs if r["naive"].get(m) is not None]
        for name, pts in series.items():
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, styles.get(b, ":"), marker="o", color=colors[name], label=f"{name}, B={b}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (data set size)")
    ax.set_ylabel("ms per step (update B losses + draw B indices), median")
    ax.set_title("IRDROSampler vs naive O(N) samplers (torch.multinomial refuses N > 2**24)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run: N in {1e5, 1e6}, fewer steps")
    parser.add_argument("--sizes", type=str, default=None, help="comma-separated N (default 1e5,1e6,1e7,1e8)")
    parser.add_argument("--batches", type=str, default="256,4096", help="comma-separated B")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive methods")
    parser.add_argument("--no-balanced", action="store_true", help="skip the balanced draws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-md", type=Path, default=HERE / "RESULTS_sampler.md")
    parser.add_argument("--out-png", type=Path, default=HERE / "bench_sampler.png")
    args = parser.parse_args(argv)
    default_sizes = "1e5,1e6" if args.quick else "1e5,1e6,1e7,1e8"
    sizes = [int(float(x)) for x in (args.sizes or default_sizes).split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    load_start = load()

    kinds = ("ours", *(() if args.no_balanced else ("balanced",)), *(() if args.no_naive else NAIVE))
    jobs = [(n, b, kind) for n in sizes for b in batches for kind in kinds]
    results: dict[tuple[int, int], dict] = {}
    t_start = time.perf_counter()
    for n, b, kind in tqdm(jobs, desc="bench_sampler", unit="job"):
        entry = results.setdefault((n, b), {"n": n, "b": b, "naive": {}})
        tqdm.write(f"N={n:.0e} B={b}: {kind} ...")
        if kind == "ours":
            entry["ours"] = bench_ours(n, b, our_steps(n, b, args.quick), args.seed)
        elif kind == "balanced":
            entry["balanced"] = bench_ours(n, b, our_steps(n, b, args.quick), args.seed, draws="balanced")
        else:
            entry["naive"][kind] = bench_naive(kind, n, b, naive_reps(kind, n, args.quick), args.seed)
    elapsed = time.perf_counter() - t_start
    ordered = [results[k] for k in sorted(results)]

    head, rows = table_rows(ordered)
    print()
    print(text_table(head, rows))
    print()
    print("\n".join(targets(ordered)))
    plot(ordered, args.out_png)

    md = [
        "## Sampler step cost (`benchmarks/bench_sampler.py`)",
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min)",
        "",
        f"Machine: {machine()}. Load average (1/5/15 min) at start {load_start}, at end {load()}: the 2 cores",
        "were shared with other jobs, so wall-clock times are inflated and noisy; `ours CPU ms` is the",
        "process CPU time of a step (median), less sensitive to time slicing.",
        "",
        "A step = update B losses + draw B indices. Ours (`ours` columns: `draws=\"iid\"`; `balanced` columns:",
        "`draws=\"balanced\"`, the default, same sampler otherwise): `sampler.update(idx, losses, step=b - 1)` then",
        "drawing global batch b (feedback_delay 32, so feedback of step b - 32 is applied), temperature 1,",
        "truncate_quantile 0.99, uniform_mix 0.1, table warm (every sample seen). Naive: set the B entries of a",
        "float64 weight vector, then draw over the full vector (O(N) per step). Ratios = naive median / ours",
        "median. `mean (amortised refresh)` adds the O(N) refresh (new prior, cut, shift, tree rebuild;",
        "`refresh s`) spread over its interval (default `max(4, N // (16 B))` steps). `build s` = allocation +",
        "first fit and tree build. Bytes per sample = loss table (12) + for i.i.d. draws the sum tree (9.1),",
        "for balanced draws the records (float64 mass, float32 credit offset, uint32 draw count: 16) and the",
        "float32 key tree (4.6), from `nbytes`.",
        "",
        markdown_table(head, rows),
        "",
        "Targets (N = 1e8, B = 4096):",
        "",
        *targets(ordered),
        "",
        f"Plot: `{os.path.relpath(args.out_png, HERE.parent)}` (log-log ms per step vs N).",
        "",
    ]
    args.out_md.write_text("\n".join(md))
    print(f"\nwrote {args.out_md} and {args.out_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
