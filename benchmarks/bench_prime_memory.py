"""Memory in transit when priming from a ``.npy`` file of one loss per sample: in one piece or in chunks.

Usage: ``python benchmarks/bench_prime_memory.py [N ...]`` (default 1e6 1e7). For each N it writes a
float32 ``.npy`` vector (10% NaN: not scored) to a temporary folder, then measures with ``tracemalloc`` the
peak of the allocations made while turning it into ``prime`` arguments, the arguments dropped after use:

* ``one piece``: :func:`irdro_sampler.initial_loss_feedback` (what the integrations did before: one call);
* ``chunks``: iterating :func:`irdro_sampler.initial_loss_chunks` (what they do now), one pair at a time.

and, for scale, the peak of priming an ``IRDROSampler`` both ways (the sampler's own O(N) table included:
what a run pays at its start). Only public API is called. Prints MB and the ratio one piece / chunks.
"""

from __future__ import annotations

import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from irdro_sampler import IRDROSampler, initial_loss_chunks, initial_loss_feedback


def _peak_mb(fn: Callable[[Path, int], None], path: Path, n: int) -> tuple[float, float]:
    """(peak MB of the allocations made by ``fn(path, n)``, seconds)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    fn(path, n)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak / 2**20, seconds


def _transit_one_piece(path: Path, n: int) -> None:
    idx, val = initial_loss_feedback(path, n)
    del idx, val


def _transit_chunks(path: Path, n: int) -> None:
    for idx, val in initial_loss_chunks(path, n):
        del idx, val


def _prime_one_piece(path: Path, n: int) -> None:
    IRDROSampler(n, 256, seed=0).prime(*initial_loss_feedback(path, n))


def _prime_chunks(path: Path, n: int) -> None:
    sampler = IRDROSampler(n, 256, seed=0)
    for idx, val in initial_loss_chunks(path, n):
        sampler.prime(idx, val)


def main(sizes: list[int]) -> None:
    print("| N | file MB | transit: one piece MB | transit: chunks MB | ratio | prime: one piece MB (s) "
          "| prime: chunks MB (s) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for n in sizes:
            rng = np.random.default_rng(0)
            losses = rng.gamma(2.0, 1.0, n).astype(np.float32)
            losses[rng.random(n) < 0.1] = np.nan
            path = Path(folder) / f"losses_{n}.npy"
            np.save(path, losses)
            del losses
            file_mb = path.stat().st_size / 2**20
            t_one, _ = _peak_mb(_transit_one_piece, path, n)
            t_chunks, _ = _peak_mb(_transit_chunks, path, n)
            p_one, s_one = _peak_mb(_prime_one_piece, path, n)
            p_chunks, s_chunks = _peak_mb(_prime_chunks, path, n)
            print(f"| {n:.0e} | {file_mb:.0f} | {t_one:.0f} | {t_chunks:.0f} | {t_one / t_chunks:.1f}x "
                  f"| {p_one:.0f} ({s_one:.1f}) | {p_chunks:.0f} ({s_chunks:.1f}) | {p_one / p_chunks:.2f}x |",
                  flush=True)
            path.unlink()


if __name__ == "__main__":
    main([int(float(a)) for a in sys.argv[1:]] or [10**6, 10**7])
