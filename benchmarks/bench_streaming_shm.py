"""Shared memory a weighted streaming dataset holds on its node, and what ``close()`` gives back.

Writes real MDS shards of ``--samples`` int64 samples into a temporary folder, builds each dataset over
them, iterates one round (so streaming has set up everything it keeps), and measures the new files in
/dev/shm (where streaming's SharedMemory lives on Linux): ours (the round state: weight rows or planned
rounds, carry, round control) and streaming's own, then again after ``close()``. Linux only.

    python benchmarks/bench_streaming_shm.py --samples 200000,1000000   # run alone: other processes' blocks would count
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import uuid

import numpy as np
import torch
from streaming import MDSWriter
from tqdm import tqdm

from irdro_sampler.integrations.streaming import WeightedStreamingDataset
from irdro_sampler.integrations.streaming_sharded import ShardedWeightedStreamingDataset

DATASETS = {"WeightedStreamingDataset": WeightedStreamingDataset,
            "ShardedWeightedStreamingDataset": ShardedWeightedStreamingDataset}


def write_shards(root: str, n: int, per_shard: int) -> str:
    out = os.path.join(root, "remote")
    with MDSWriter(out=out, columns={"x": "int64"}, size_limit=12 * per_shard + 16) as w:
        for i in tqdm(range(n), desc=f"MDS {n}", leave=False):
            w.write({"x": np.int64(i)})
    return out


def shm_sizes(names: set[str]) -> tuple[int, int]:
    """(bytes of our blocks, bytes of the others) among ``names`` still in /dev/shm."""
    ours = theirs = 0
    for f in names:
        path = os.path.join("/dev/shm", f)
        if os.path.exists(path):
            size = os.path.getsize(path)
            if "_irdro_" in f:
                ours += size
            else:
                theirs += size
    return ours, theirs


def measure(cls, remote: str, root: str, n: int, round_size: int) -> dict[str, int]:
    before = set(os.listdir("/dev/shm"))
    local = os.path.join(root, "local-" + uuid.uuid4().hex[:8])
    ds = cls(round_size=round_size, remote=remote, local=local, batch_size=10, seed=3)
    drawn = sum(len(b["x"]) for b in torch.utils.data.DataLoader(ds, batch_size=10))
    assert drawn == round_size, drawn
    new = set(os.listdir("/dev/shm")) - before
    ours, theirs = shm_sizes(new)
    ds.close()
    ours_after, theirs_after = shm_sizes(new)
    return {"ours": ours, "theirs": theirs, "ours_after": ours_after, "theirs_after": theirs_after}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", default="200000,1000000")
    ap.add_argument("--per-shard", type=int, default=5000)
    ap.add_argument("--round-size", type=int, default=20000)
    args = ap.parse_args(argv)
    if not os.path.isdir("/dev/shm"):
        print("no /dev/shm: Linux only", file=sys.stderr)
        return 1
    print("| samples | dataset | ours (B/sample) | streaming's | after close(): ours / streaming's | released |")
    print("|---|---|---|---|---|---|")
    for n in [int(s) for s in args.samples.split(",")]:
        root = tempfile.mkdtemp(prefix="irdro-shm-")
        try:
            remote = write_shards(root, n, args.per_shard)
            for name, cls in DATASETS.items():
                m = measure(cls, remote, root, n, args.round_size)
                total = m["ours"] + m["theirs"]
                released = 1 - (m["ours_after"] + m["theirs_after"]) / total
                print(f"| {n:,} | `{name}` | {m['ours']:,} ({m['ours'] / n:.2f}) | {m['theirs']:,} | "
                      f"{m['ours_after']:,} / {m['theirs_after']:,} | {released:.4f} |", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
