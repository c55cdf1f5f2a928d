"""Benchmark: IRDROSampler step cost (update B losses + draw B indices), public calls only, against naive O(N) samplers.

One step = ``sampler.update(idx, losses, step=b - 1)`` (the B indices of the previous batch, as an
int64 array, as a collated ``sample_idx`` gives them back) followed by taking global batch ``b`` from
the sampler (feedback_delay 32, so each draw applies the feedback of step b - 32). Batch ``b`` is
taken three ways, side by side on the same sampler (blocks of steps, rotating):

* ``per index``: ``torch.utils.data.BatchSampler(sampler, B)`` over ``iter(sampler)``, which yields B
  ints one at a time: what ``DataLoader(dataset, sampler=sampler, batch_size=B)`` does;
* ``per batch``: ``IRDROBatchSampler(sampler)``, one list per batch: what
  ``DataLoader(dataset, batch_sampler=IRDROBatchSampler(sampler))`` does;
* ``arrays``: ``sampler.iter_batches()``, one int64 array per batch with no conversion: the draw
  itself, the number comparable to the private ``sampler._batch`` cost earlier versions of this
  script reported.

Each way starts its block with ``sampler.set_start_batch(b)``, so the three share one feedback stream
and one refresh schedule. Nothing private is touched: the table is filled through
``sampler.table.update`` (every sample seen once, before the first draw), memory is ``sampler.nbytes``,
refresh batches follow from ``sampler.refresh_interval`` (batch ``b`` refreshes when
``b % refresh_interval == 0``; checked once at the end against ``sampler.stats()["refreshes"]``, which
is O(N)).

The naive methods keep a float64 weight vector ``w`` of N tilted masses, set the B updated entries
(``w[idx] = exp((loss - shift) / tau)``) and then draw with

* ``torch.multinomial(w, B, replacement=True)`` (refuses more than 2**24 categories),
* ``numpy.random.Generator.choice(N, B, p=w / w.sum())``,
* ``np.cumsum(w)`` + ``np.searchsorted``,

each of which is O(N) per step. Both draw schemes run: ``draws="balanced"`` (the default) and
``draws="iid"``. Results go to ``benchmarks/RESULTS_sampler.md`` and a log-log plot to
``benchmarks/bench_sampler.png``.

    python benchmarks/bench_sampler.py            # full: N in 1e5..1e8, B in {256, 4096}; minutes, ~4 GB at 1e8
    python benchmarks/bench_sampler.py --quick    # N in 1e5, 1e6, fewer steps; seconds
    python benchmarks/bench_sampler.py --trace 1e7,4096,760   # step cost over time -> RESULTS_sampler_trace.md
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
from torch.utils.data import BatchSampler
from tqdm import tqdm

from irdro_sampler import IRDROBatchSampler, IRDROSampler

HERE = Path(__file__).resolve().parent
TORCH_MAX_CATEGORIES = 2**24
TEMPERATURE = 1.0
NAIVE = ("torch.multinomial", "numpy choice", "cumsum+searchsorted")
SCHEMES = ("balanced", "iid")
WAYS = ("per index", "per batch", "arrays")
BLOCK = 50  # steps per way before rotating to the next


# ------------------------------------------------------------------------------------------ helpers
def fill_table(sampler: IRDROSampler, rng: np.random.Generator) -> None:
    """Report a loss ~ Gamma(2, 0.5) for every sample once, through ``sampler.table.update`` (a warm
    table, as after one epoch), chunk by chunk before the first draw (which fits the rule to it)."""
    n = sampler.dataset_size
    chunk = 1 << 22
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        sampler.table.update(np.arange(start, stop), rng.gamma(2.0, 0.5, stop - start).astype(np.float32), step=0)


def batch_losses(rng: np.random.Generator, size: int) -> np.ndarray:
    """Per-sample losses of a batch: mostly Gamma(2, 0.5), 2% heavy (noisy-label-like) outliers."""
    losses = rng.gamma(2.0, 0.5, size)
    losses[rng.random(size) < 0.02] *= 8.0
    return losses


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
def batch_sources(sampler: IRDROSampler, b: int) -> dict:
    """The three public ways of taking batches, each a callable giving a fresh iterator of batches."""
    per_index = BatchSampler(sampler, b, drop_last=False)  # iter(sampler): one int at a time
    per_batch = IRDROBatchSampler(sampler)
    return {"per index": lambda: iter(per_index), "per batch": lambda: iter(per_batch),
            "arrays": sampler.iter_batches}


def bench_ours(n: int, b: int, steps: int, seed: int, draws: str) -> dict:
    rng = np.random.default_rng(seed)
    gc.collect()
    t0 = time.perf_counter()
    sampler = IRDROSampler(n, b, temperature=TEMPERATURE, truncate_quantile=0.99, uniform_mix=0.1,
                           feedback_delay=32, seed=seed, num_samples=b * 10**7, draws=draws)
    t_alloc = time.perf_counter() - t0
    t0 = time.perf_counter()
    fill_table(sampler, rng)
    t_fill = time.perf_counter() - t0
    t0 = time.perf_counter()
    drawn = np.asarray(next(sampler.iter_batches()))  # batch 0: fit (prior, cut, shift) + O(N) build
    t_first = time.perf_counter() - t0
    interval = sampler.refresh_interval
    delay = sampler.feedback_delay
    sources = batch_sources(sampler, b)
    wall = {w: [] for w in WAYS}
    cpu = {w: [] for w in WAYS}
    refreshed = {w: [] for w in WAYS}
    first = 1
    for block in range(-(-steps // BLOCK)):
        way = WAYS[block % len(WAYS)]
        sampler.set_start_batch(first)  # epoch 0 holds 1e7 batches: batch_in_epoch == global batch
        it = sources[way]()
        for step in range(first, min(first + BLOCK, steps + 1)):
            losses = batch_losses(rng, b)
            w0, c0 = time.perf_counter(), time.process_time()
            sampler.update(drawn, losses, step=step - 1)
            batch = next(it)
            c1, w1 = time.process_time(), time.perf_counter()
            drawn = np.asarray(batch, dtype=np.int64)  # what a collated sample_idx gives back (not timed)
            if step >= delay:  # steady state: feedback is applied from batch `delay` on
                wall[way].append(w1 - w0)
                cpu[way].append(c1 - c0)
                refreshed[way].append(step % interval == 0)
        first += BLOCK
        del it
    stats = sampler.stats()  # O(N): once, at the end
    expected_refreshes = steps // interval + 1  # batch 0 and every multiple of the interval
    per_way = {}
    extras = []
    for way in WAYS:
        w_a, ref = np.array(wall[way]), np.array(refreshed[way], dtype=bool)
        plain = w_a[~ref]
        if ref.any():
            extras += list(w_a[ref] - np.median(plain))
        per_way[way] = {"median_ms": 1e3 * float(np.median(plain)),
                        "cpu_median_ms": 1e3 * float(np.median(np.array(cpu[way])[~ref])),
                        "p90_ms": 1e3 * float(np.percentile(plain, 90)),
                        "mean_plain_s": float(np.mean(plain)), "steps": len(w_a)}
    refresh_s = float(np.mean(extras)) if extras else None
    for o in per_way.values():
        plain_mean = o.pop("mean_plain_s")
        o["mean_amortised_ms"] = None if refresh_s is None else 1e3 * (plain_mean + refresh_s / interval)
    out = {
        "ways": per_way,
        "refresh_interval": interval,
        "refresh_s": refresh_s,
        "refreshes": int(stats["refreshes"]),
        "expected_refreshes": expected_refreshes,
        "rekeys": int(stats["rekeys"]),
        "alloc_s": t_alloc,
        "fill_s": t_fill,
        "build_s": t_first,
        "bytes_per_sample": sampler.nbytes / n,
        "steps": steps,
        "load": load(),
    }
    del sampler, sources
    gc.collect()
    return out


def trace_ours(n: int, b: int, steps: int, seed: int, draws: str, window: int) -> dict:
    """Median ms per step in consecutive windows of ``window`` steps, per batch (``IRDROBatchSampler``), same
    workload as :func:`bench_ours`: how the step cost moves across refreshes."""
    rng = np.random.default_rng(seed)
    gc.collect()
    sampler = IRDROSampler(n, b, temperature=TEMPERATURE, truncate_quantile=0.99, uniform_mix=0.1,
                           feedback_delay=32, seed=seed, num_samples=b * 10**7, draws=draws)
    fill_table(sampler, rng)
    it = iter(IRDROBatchSampler(sampler))
    drawn = np.asarray(next(it), dtype=np.int64)
    wall = []
    for step in range(1, steps + 1):
        losses = batch_losses(rng, b)
        t0 = time.perf_counter()
        sampler.update(drawn, losses, step=step - 1)
        batch = next(it)
        wall.append(time.perf_counter() - t0)
        drawn = np.asarray(batch, dtype=np.int64)
    interval = sampler.refresh_interval
    windows = [(start, 1e3 * float(np.median(wall[start - 1 : start - 1 + window])))
               for start in range(1, steps + 1, window)]
    out = {"n": n, "b": b, "draws": draws, "interval": interval, "windows": windows,
           "rekeys": int(sampler.stats()["rekeys"]), "load": load()}
    del sampler, it
    gc.collect()
    return out


def write_trace(spec: str, seed: int, path: Path, command: str) -> None:
    n_s, b_s, steps_s = spec.split(",")
    n, b, steps = int(float(n_s)), int(b_s), int(steps_s)
    window = max(10, steps // 40)
    load_start = load()
    traces = [trace_ours(n, b, steps, seed, d, window) for d in tqdm(SCHEMES, desc="trace", unit="scheme")]
    head = ["steps from", *(f"{t['draws']} ms" for t in traces)]
    rows = [[str(start), *(f"{t['windows'][i][1]:.2f}" for t in traces)] for i, (start, _) in enumerate(traces[0]["windows"])]
    md = [
        "## Sampler step cost over time (`benchmarks/bench_sampler.py --trace`)",
        "",
        f"Command: `{command}`. Machine: {machine()}. Load average at start {load_start}, at end {load()}.",
        "",
        f"N = {n:.0e}, B = {b}, the workload of `RESULTS_sampler.md` (warm table, 2% heavy losses per batch), "
        f"per batch (`IRDROBatchSampler`); median ms per step over windows of {window} steps. Refreshes (O(N) "
        f"refit) at batches 0, {traces[0]['interval']}, {2 * traces[0]['interval']}, ... (their own cost is "
        f"inside their window's median only if it dominates the window). Re-keys at the end: "
        + ", ".join(f"{t['draws']} {t['rekeys']}" for t in traces) + ".",
        "",
        markdown_table(head, rows),
        "",
    ]
    path.write_text("\n".join(md))
    print(text_table(head, rows))
    print(f"wrote {path}")


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
    """Enough steps to cover one refresh (batch ``refresh_interval``) past the 32-step warm-up."""
    interval = max(4, n // (16 * b))  # the sampler's default refresh_interval
    steps = min(max(600, interval + 150), 30_000)
    return 200 if quick else steps


# ----------------------------------------------------------------------------------------- report
def ms(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(num: float | None, den: float | None) -> str:
    if num is None or den is None:
        return "-"
    r = num / den
    return f"{r:,.0f}x" if r >= 10 else f"{r:.1f}x"


def ours_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["N", "B", "draws", "per index ms", "per batch ms", "arrays ms", "arrays CPU ms",
            "per index / arrays", "per batch / arrays", "per batch mean ms (amortised refresh)",
            "refresh every", "refresh s", "fill s", "build s", "bytes/sample"]
    rows = []
    for r in results:
        for scheme in SCHEMES:
            o = r.get(scheme)
            if o is None:
                continue
            w = o["ways"]
            rows.append([
                f"{r['n']:.0e}", str(r["b"]), scheme,
                ms(w["per index"]["median_ms"]), ms(w["per batch"]["median_ms"]), ms(w["arrays"]["median_ms"]),
                ms(w["arrays"]["cpu_median_ms"]),
                f"{w['per index']['median_ms'] / w['arrays']['median_ms']:.2f}x",
                f"{w['per batch']['median_ms'] / w['arrays']['median_ms']:.2f}x",
                ms(w["per batch"]["mean_amortised_ms"]), str(o["refresh_interval"]),
                ms(o["refresh_s"], 2), f"{o['fill_s']:.2f}", f"{o['alloc_s'] + o['build_s']:.2f}",
                f"{o['bytes_per_sample']:.2f}",
            ])  # fmt: skip
    return head, rows


def naive_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = ["N", "B", *(f"{m} ms" for m in NAIVE), "cumsum / i.i.d. per batch", "cumsum / balanced per batch",
            "cumsum / balanced per index"]
    rows = []
    for r in results:
        if not r["naive"]:
            continue
        cs = r["naive"].get("cumsum+searchsorted")

        def way(scheme: str, name: str, r: dict = r) -> float | None:
            return r[scheme]["ways"][name]["median_ms"] if scheme in r else None

        rows.append([f"{r['n']:.0e}", str(r["b"]),
                     *("not run" if m not in r["naive"] else fmt_ms(r["naive"][m]) for m in NAIVE),
                     ratio(cs, way("iid", "per batch")), ratio(cs, way("balanced", "per batch")),
                     ratio(cs, way("balanced", "per index"))])
    return head, rows


def fmt_ms(x: float | None) -> str:
    return "refused" if x is None else f"{x:.3g}" if x < 100 else f"{x:.0f}"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(head: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return ""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def summary(results: list[dict]) -> list[str]:
    hit = [r for r in results if r["n"] == 10**8 and r["b"] == 4096]
    if not hit:
        return ["(the summary is at N = 1e8, B = 4096: not part of this run)"]
    r = hit[0]
    lines = []
    for scheme in SCHEMES:
        if scheme not in r:
            continue
        w = r[scheme]["ways"]
        lines.append(f"- `draws=\"{scheme}\"`: per index {w['per index']['median_ms']:.2f} ms, per batch "
                     f"{w['per batch']['median_ms']:.2f} ms, arrays {w['arrays']['median_ms']:.2f} ms per step "
                     f"(median); {r[scheme]['bytes_per_sample']:.2f} bytes per sample")
    if "iid" in r and "balanced" in r:
        for way in WAYS:
            q = r["balanced"]["ways"][way]["median_ms"] / r["iid"]["ways"][way]["median_ms"]
            lines.append(f"- balanced / i.i.d., {way}: {q:.2f}x")
    cs = r["naive"].get("cumsum+searchsorted")
    if cs is not None and "balanced" in r:
        lines.append(f"- cumsum+searchsorted ({cs:.0f} ms) / balanced per index: "
                     f"{ratio(cs, r['balanced']['ways']['per index']['median_ms'])}")
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["b"] for r in results})
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 5), squeeze=False)
    styles = {"per index": ("-", "o"), "per batch": ("--", "s"), "arrays": (":", "^")}
    colors = {"balanced": "C0", "iid": "C4", "torch.multinomial": "C1", "numpy choice": "C2",
              "cumsum+searchsorted": "C3"}
    for ax, b in zip(axes[0], batches, strict=True):
        rs = sorted((r for r in results if r["b"] == b), key=lambda r: r["n"])
        for scheme in SCHEMES:
            for way in WAYS:
                pts = [(r["n"], r[scheme]["ways"][way]["median_ms"]) for r in rs if scheme in r]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    line, marker = styles[way]
                    ax.plot(xs, ys, line, marker=marker, color=colors[scheme], label=f"{scheme}, {way}")
        for m in NAIVE:
            pts = [(r["n"], r["naive"][m]) for r in rs if r["naive"].get(m) is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, "-", marker="x", color=colors[m], label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (data set size)")
        ax.set_ylabel("ms per step (update B losses + draw B indices), median")
        ax.set_title(f"B = {b}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("IRDROSampler through public calls vs naive O(N) samplers (torch.multinomial refuses N > 2**24)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small run: N in {1e5, 1e6}, fewer steps")
    parser.add_argument("--sizes", type=str, default=None, help="comma-separated N (default 1e5,1e6,1e7,1e8)")
    parser.add_argument("--batches", type=str, default="256,4096", help="comma-separated B")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive methods")
    parser.add_argument("--draws", type=str, default=",".join(SCHEMES), help="comma-separated draw schemes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", type=str, default=None, metavar="N,B,STEPS",
                        help="instead: the step cost over STEPS steps in windows, both schemes, per batch")
    parser.add_argument("--out-trace", type=Path, default=HERE / "RESULTS_sampler_trace.md")
    parser.add_argument("--out-md", type=Path, default=HERE / "RESULTS_sampler.md")
    parser.add_argument("--out-png", type=Path, default=HERE / "bench_sampler.png")
    args = parser.parse_args(argv)
    default_sizes = "1e5,1e6" if args.quick else "1e5,1e6,1e7,1e8"
    sizes = [int(float(x)) for x in (args.sizes or default_sizes).split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    schemes = [s for s in args.draws.split(",") if s]
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    if args.trace:
        write_trace(args.trace, args.seed, args.out_trace, command)
        return 0
    load_start = load()

    kinds = (*schemes, *(() if args.no_naive else NAIVE))
    jobs = [(n, b, kind) for n in sizes for b in batches for kind in kinds]
    results: dict[tuple[int, int], dict] = {}
    loads = []
    t_start = time.perf_counter()
    for n, b, kind in tqdm(jobs, desc="bench_sampler", unit="job"):
        entry = results.setdefault((n, b), {"n": n, "b": b, "naive": {}})
        loads.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
        tqdm.write(f"N={n:.0e} B={b}: {kind} ... (load {load()})")
        if kind in SCHEMES:
            entry[kind] = bench_ours(n, b, our_steps(n, b, args.quick), args.seed, kind)
            if entry[kind]["refreshes"] != entry[kind]["expected_refreshes"]:
                tqdm.write(f"  note: {entry[kind]['refreshes']} refreshes, expected "
                           f"{entry[kind]['expected_refreshes']} from refresh_interval")
        else:
            entry["naive"][kind] = bench_naive(kind, n, b, naive_reps(kind, n, args.quick), args.seed)
    elapsed = time.perf_counter() - t_start
    ordered = [results[k] for k in sorted(results)]

    head, rows = ours_rows(ordered)
    nhead, nrows = naive_rows(ordered)
    print()
    print(text_table(head, rows))
    print()
    print(text_table(nhead, nrows))
    print()
    print("\n".join(summary(ordered)))
    plot(ordered, args.out_png)

    refresh_notes = [f"{r['n']:.0e}/{r['b']}/{s}: {r[s]['refreshes']} vs {r[s]['expected_refreshes']}"
                     for r in ordered for s in SCHEMES if s in r and r[s]["refreshes"] != r[s]["expected_refreshes"]]
    md = [
        "## Sampler step cost through public calls (`benchmarks/bench_sampler.py`)",
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min)",
        "",
        f"Machine: {machine()}. Load average (1/5/15 min) at start {load_start}, at end {load()}; 1-min load",
        f"at the start of each job {min(loads):.1f}-{max(loads):.1f}. The 2 cores are shared with other jobs, so",
        "wall-clock times are inflated and noisy; `CPU ms` is the process CPU time of a step (median), less",
        "sensitive to time slicing.",
        "",
        "A step = `sampler.update(idx, losses, step=b - 1)` with the B indices of the previous batch (an int64",
        "array, as a collated `sample_idx`), then taking global batch b from the sampler (feedback_delay 32, so",
        "the feedback of step b - 32 is applied before the draw), temperature 1, truncate_quantile 0.99,",
        "uniform_mix 0.1, table warm (every sample reported once through `sampler.table.update` before the first",
        "draw: `fill s`). Public calls only. The batch is taken three ways on the same sampler, in rotating",
        f"blocks of {BLOCK} steps (each block starts with `set_start_batch(b)`):",
        "",
        "* **per index**: `torch.utils.data.BatchSampler(sampler, B)` over `iter(sampler)`, B ints one at a time:",
        "  what `DataLoader(dataset, sampler=sampler, batch_size=B)` does;",
        "* **per batch**: `IRDROBatchSampler(sampler)`, one list per batch: what",
        "  `DataLoader(dataset, batch_sampler=IRDROBatchSampler(sampler))` does;",
        "* **arrays**: `sampler.iter_batches()`, one int64 array per batch, no conversion: the draw itself,",
        "  comparable to the private `sampler._batch` cost earlier versions of this file reported.",
        "",
        "Medians over the steady-state steps that do not refresh. `per batch mean (amortised refresh)` adds",
        "the O(N) refresh (new prior, cut, shift; masses and the draw scheme's structure rebuilt; `refresh s`,",
        "the extra time of the refresh steps) spread over its interval (default `max(4, N // (16 B))` batches;",
        "`-` when no refresh fell in the measured steps). `build s` = allocation + first draw (fit and O(N)",
        "build). Bytes per sample = `sampler.nbytes / N` (loss table 12 + the draw scheme's structures: the sum",
        "tree for i.i.d. draws; mass, credit offset and draw count records plus the key tree for balanced draws).",
        "",
        markdown_table(head, rows),
        "",
        "Naive O(N) methods (set the B entries of a float64 weight vector, then draw over the full vector;",
        "median ms per step) and the ratio of cumsum + searchsorted to ours:",
        "",
        markdown_table(nhead, nrows),
        "",
        "At N = 1e8, B = 4096:",
        "",
        *summary(ordered),
        "",
        "Refreshes counted by `stats()` equal those predicted from `refresh_interval` in every configuration."
        if not refresh_notes else "Refresh counts that differ from the prediction: " + "; ".join(refresh_notes),
        "",
        f"Plot: `{os.path.relpath(args.out_png, HERE.parent)}` (log-log ms per step vs N, one panel per B).",
        "",
    ]
    args.out_md.write_text("\n".join(md))
    print(f"\nwrote {args.out_md} and {args.out_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
