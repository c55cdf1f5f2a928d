"""Where the weighted streaming path's throughput goes with DataLoader workers: the ``sample_idx`` tensor.

Every IR-DRO path must report which samples a batch held, so ``WeightedStreamingDataset`` adds
``sample_idx`` to each sample and the default collate turns it into one more tensor per batch. With
workers, every batch tensor crosses into the main process through shared memory; under torch's default
``file_descriptor`` sharing strategy that costs a few syscalls and a file-descriptor transfer per tensor.
This runs, round by round with a rotating order, native ``StreamingDataset``, ``WeightedStreamingDataset``
and the same weighted dataset with ``sample_idx`` removed, and prints the median seconds per round::

    python benchmarks/bench_streaming_ipc.py --workers 2
    python benchmarks/bench_streaming_ipc.py --workers 2 --sharing-strategy file_system
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from streaming import StreamingDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_streaming as bs  # noqa: E402

from irdro_sampler.integrations.streaming import WeightedStreamingDataset  # noqa: E402


class WeightedWithoutIndex(WeightedStreamingDataset):
    """The weighted dataset minus ``sample_idx`` (for this measurement only: it cannot report losses)."""

    def get_item(self, sample_id: int, retry: int = 7):
        return StreamingDataset.get_item(self, sample_id, retry)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sharing-strategy", default=None, help="torch.multiprocessing sharing strategy")
    args = ap.parse_args()
    if args.sharing_strategy:
        torch.multiprocessing.set_sharing_strategy(args.sharing_strategy)
    warnings.simplefilter("ignore")
    root = tempfile.mkdtemp(prefix="bench_ipc_")
    try:
        remote = bs.write_dataset(root, 120_000, 60, 200)
        common = dict(remote=remote, batch_size=64, shuffle=True, shuffle_block_size=2048)
        arms = {
            "native": StreamingDataset(local=bs.local_dir(root), epoch_size=15_360, **common),
            "weighted": WeightedStreamingDataset(round_size=15_360, local=bs.local_dir(root), **common),
            "weighted without sample_idx": WeightedWithoutIndex(round_size=15_360, local=bs.local_dir(root), **common),
        }
        loaders = {k: torch.utils.data.DataLoader(d, batch_size=64, num_workers=args.workers,
                                                  persistent_workers=args.workers > 0) for k, d in arms.items()}
        times: dict[str, list[float]] = {k: [] for k in arms}
        names = list(arms)
        for r in range(args.rounds):
            for k in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                for _ in loaders[k]:
                    pass
                times[k].append(time.perf_counter() - t0)
        strategy = torch.multiprocessing.get_sharing_strategy()
        print(f"workers={args.workers}, sharing strategy {strategy}, median s per round of 15,360 samples "
              f"(rounds >= 1), ratio = native / arm:")
        base = float(np.median(times["native"][1:]))
        for k, t in times.items():
            m = float(np.median(t[1:]))
            print(f"  {k:28s} {m:.3f} s   ratio {base / m:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
