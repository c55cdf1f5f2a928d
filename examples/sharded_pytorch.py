"""The loss table sharded over ranks: ShardedIRDROSampler in a plain PyTorch DDP loop on gloo (CPU).

The task is ``plain_pytorch.py``'s (a common easy group, a rare hard group of 5%, 2% random labels),
trained on ``--world`` processes on this machine. Each rank keeps the running losses of its N / world
samples only, yet every global batch is drawn from the distribution over the whole data set, and the
global batches do not depend on the number of ranks. With the library's defaults, at the default seed
and flags: the rare group gets more than its 5% share of the draws and the noise less than its 2% share
(``tests/test_examples.py`` checks both); ``--save`` writes one row file per rank, and a run started with
another ``--world`` and ``--resume`` continues from them (the printed fingerprint, which every rank of
any world size shares, is the saved one).

    python examples/sharded_pytorch.py                                # 2 ranks
    python examples/sharded_pytorch.py --save /tmp/sharded            # ... and save the sampler
    python examples/sharded_pytorch.py --world 1 --resume /tmp/sharded --epochs 1

Every rank makes every sampler call (each draw is a collective), and ``update`` takes the feedback of
all ranks, gathered here with ``all_gather``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from irdro_sampler import ShardedIRDROSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain_pytorch import evaluate, make_data  # noqa: E402  (the same task as the unsharded example)


def gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (the same shape on each), concatenated in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


def run_rank(rank: int, args: argparse.Namespace, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    try:
        results[rank] = train(rank, args)
        dist.barrier()  # leave together: tearing gloo down while a peer is mid-collective can hang
    finally:
        dist.destroy_process_group()


def train(rank: int, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    base, group = make_data(args.samples, args.seed)
    test, test_group = make_data(20_000, args.seed + 1)
    x_all, y_all = base.tensors
    rare = (group == 1).long().numpy()
    # The library's defaults; group ids are asked for by id range, so a rank holds its own rows only.
    sampler = ShardedIRDROSampler(args.samples, args.batch_size // args.world,
                                  groups=lambda start, stop: rare[start:stop], seed=args.seed)
    if args.resume:
        sampler.load(args.resume)  # saved on any number of ranks
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.resume:
        log(f"resumed on {args.world} rank(s): sampler fingerprint {sampler.fingerprint():#x}", flush=True)
    drawn = np.zeros(3)
    step = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for ids in sampler.iter_batches():  # this rank's slice of global batch `step` (a collective)
            idx = torch.from_numpy(ids)
            per_sample = F.cross_entropy(model(x_all[idx]), y_all[idx], reduction="none")
            opt.zero_grad()
            per_sample.mean().backward()  # DDP averages over ranks: the global batch's plain mean
            opt.step()
            all_ids, all_losses = gather(idx), gather(per_sample.detach())
            sampler.update(all_ids, all_losses, step=step)  # the same call on every rank
            drawn += np.bincount(group[all_ids].numpy(), minlength=3)
            step += 1
        result = evaluate(model.module, test, test_group)
        result.update(drawn_rare=float(drawn[1] / drawn.sum()), drawn_noise=float(drawn[2] / drawn.sum()))
        log(f"epoch {epoch}: test loss common {result['common']:.3f} rare {result['rare']:.3f} | "
            f"drawn rare {result['drawn_rare']:.1%} noise {result['drawn_noise']:.1%}", flush=True)
    if args.save:
        sampler.save(args.save)  # one row file per rank + common.pt
        log(f"saved on {args.world} rank(s): sampler fingerprint {sampler.fingerprint():#x}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="gloo ranks on this machine")
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch (split over the ranks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="folder to save the sampler into at the end")
    ap.add_argument("--resume", default=None, help="folder of a saved sampler (any world size)")
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(run_rank, args=(args, port, results), nprocs=args.world, join=True)
    return dict(results[0])


if __name__ == "__main__":
    main()
