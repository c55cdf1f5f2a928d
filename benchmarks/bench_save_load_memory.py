"""Peak RSS of ShardedIRDROSampler.save + load on one gloo rank (a fresh process per run).

Usage: ``PYTHONPATH=. python benchmarks/bench_save_load_memory.py [N] [folder]``. Prints, in MB: the
sampler's O(N) structures (``nbytes``), the peak RSS after construction and a few steps (which includes
torch, ~0.45 GB), after ``save`` and after ``load`` (``ru_maxrss``, so each is the peak so far), and
the save/load times.
"""

from __future__ import annotations

import resource
import socket
import sys
import tempfile
import time

import numpy as np
import torch.distributed as dist

from irdro_sampler.sharded_sampler import ShardedIRDROSampler


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(n: int, folder: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        s = ShardedIRDROSampler(n, 4096, feedback_delay=4, refresh_interval=20)
        rng = np.random.default_rng(0)
        for b in range(6):
            ids = s.batch(b)[0]
            s.update(ids, rng.random(ids.size) + 0.5, step=b)
        steps = _peak_mb()
        t0 = time.perf_counter()
        s.save(folder)
        save_s, after_save = time.perf_counter() - t0, _peak_mb()
        t0 = time.perf_counter()
        s.load(folder)
        load_s, after_load = time.perf_counter() - t0, _peak_mb()
        print(f"N={n:.1e} nbytes={s.nbytes / 2**20:.0f} MB peak RSS: steps {steps:.0f} MB, +save {after_save:.0f} MB, "
              f"+load {after_load:.0f} MB; save {save_s:.2f} s, load {load_s:.2f} s")
        dist.barrier()  # leave together: tearing gloo down while a peer is mid-collective can hang
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    n = int(float(sys.argv[1])) if len(sys.argv) > 1 else 20_000_000
    with tempfile.TemporaryDirectory() as tmp:
        main(n, sys.argv[2] if len(sys.argv) > 2 else tmp)
