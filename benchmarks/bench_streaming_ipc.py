"""Where the weighted streaming path's throughput goes with DataLoader workers: the ``sample_idx`` tensor.

Every IR-DRO path must report which samples a batch held, so ``WeightedStreamingDataset`` adds
``sample_idx`` to each sample and the default collate turns it into one more tensor per batch. With
workers, every batch tensor crosses into the main process through shared memory; under torch's default
``file_descriptor`` sharing strategy that costs a few syscalls and a file-descriptor transfer per tensor.
This runs, round by round with a rotating order, native ``StreamingDataset``, ``WeightedStreamingDataset``
with the default collate, the same with ``IndexListCollate`` (the ids travel as a list pickled with the
batch: the remedy docs/streaming.md advises) and the weighted dataset with ``sample_idx`` removed (the
floor: it cannot report losses), and prints the median seconds per round::

    python benchmarks/bench_streaming_ipc.py --workers 2
    python benchmarks/bench_streaming_ipc.py --workers 2 --sharing-strategy file_system
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from streaming import StreamingDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_streaming as bs  # noqa: E402

from irdro_sampler import IndexListCollate  # noqa: E402
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
            "weighted, default collate": WeightedStreamingDataset(round_size=15_360, local=bs.local_dir(root), **common),
            "weighted + IndexListCollate": WeightedStreamingDataset(round_size=15_360, local=bs.local_dir(root),
                                                                    **common),
            "weighted without sample_idx": WeightedWithoutIndex(round_size=15_360, local=bs.local_dir(root), **common),
        }
        runs = bs.run_streaming_interleaved(arms, args.workers, 64, args.rounds,  # rotating order
                                            collate={"weighted + IndexListCollate": IndexListCollate()})
        times = {k: [n / sps for sps, _, n in per_round] for k, (per_round, _) in runs.items()}
        strategy = torch.multiprocessing.get_sharing_strategy()
        print(f"workers={args.workers}, sharing strategy {strategy}, median s per round of 15,360 samples "
              f"(rounds >= 1), ratio = native / arm:")
        base = float(np.median(times["native"][1:]))
        for k, t in times.items():
            m = float(np.median(t[1:]))
            print(f"  {k:30s} {m:.3f} s   ratio {base / m:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
