"""Streaming rounds with the weights sharded over ranks: ShardedWeightedStreamingDataset in a DDP loop on gloo.

The task is ``plain_pytorch.py``'s (a common easy group, a rare hard group of 5%, 2% random labels),
written here as MDS shards (streaming's format) and trained on ``--world`` processes on this machine.
Each rank keeps the running losses of its own samples only (``ds.owned_ids``) and passes their weights
to ``set_weights`` once per round; the ranks plan the next round together, and every node's shared
memory holds that round (ids and probabilities), not weights of every sample. With the library's
defaults, at the default seed and flags: the rare group gets more than its 5% share of the draws and
the noise less than its 2% share (``tests/test_examples.py`` checks both); every rank prints the same
round fingerprint; ``--save`` writes one state per rank at a round boundary, and a run started with
``--resume`` continues from them (the printed fingerprint is the saved one).

    python examples/sharded_streaming.py                               # 2 ranks, 3 rounds
    python examples/sharded_streaming.py --save /tmp/sharded-stream    # ... and save one state per rank
    python examples/sharded_streaming.py --resume /tmp/sharded-stream --rounds 1

Every rank makes every dataset call that plans (``set_weights`` is a collective), and the table takes
the feedback of all ranks (``gather_feedback``), keeping the rows it owns.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from irdro_sampler import DROWeighting, LossTable
from irdro_sampler.distributed import gather_feedback
from irdro_sampler.sharded_rounds import sharded_probabilities

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain_pytorch import evaluate, make_data  # noqa: E402  (the same task as the unsharded example)


def write_shards(folder: str, samples: int, seed: int) -> None:
    """The training set as MDS shards of about 2,000 samples (what a remote bucket would hold)."""
    from streaming import MDSWriter

    base, group = make_data(samples, seed)
    x, y = base.tensors
    columns = {"x": "ndarray:float32:2", "y": "int64", "group": "int64"}
    with MDSWriter(out=folder, columns=columns, size_limit=2_000 * 40) as out:
        for i in range(samples):
            out.write({"x": x[i].numpy(), "y": np.int64(y[i]), "group": np.int64(group[i])})


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    """The default collate, with the MDS arrays copied (they are read-only views of the shard)."""
    return torch.utils.data.default_collate([{**s, "x": np.array(s["x"])} for s in samples])


def run_rank(rank: int, args: argparse.Namespace, port: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(args.world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    try:
        results[rank] = train(rank, args)
        dist.barrier()  # leave together: tearing gloo down while a peer is mid-collective can hang
    finally:
        dist.destroy_process_group()


def train(rank: int, args: argparse.Namespace) -> dict[str, float]:
    from irdro_sampler.integrations.streaming_sharded import ShardedWeightedStreamingDataset

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    _, group = make_data(args.samples, args.seed)  # group ids, to count what is drawn
    test, test_group = make_data(20_000, args.seed + 1)
    per_rank = args.batch_size // args.world
    round_size = args.samples // args.batch_size * args.batch_size  # a multiple of the global batch: no padding
    ds = ShardedWeightedStreamingDataset(round_size=round_size, remote=args.data, local=args.local,
                                         batch_size=per_rank, shuffle=True, seed=args.seed)
    start, stop = ds.owned_ids
    rare = (group == 1).long().numpy()
    table, rule = LossTable(stop - start, groups=rare[start:stop]), DROWeighting()  # the library's defaults
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.resume:
        saved = torch.load(os.path.join(args.resume, f"rank{rank}.pt"), weights_only=False)
        ds.load_state_dict(saved["dataset"])
        table.load_state_dict(saved["table"])
        log(f"resumed on {args.world} rank(s): round fingerprint {ds.fingerprint():#x}", flush=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=per_rank, num_workers=args.num_workers, collate_fn=collate)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    drawn = np.zeros(3)
    for rnd in range(args.rounds):
        for batch in loader:
            per_sample = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
            opt.zero_grad()
            per_sample.mean().backward()  # DDP averages over ranks: the global batch's plain mean
            opt.step()
            ids, losses = gather_feedback(batch["sample_idx"], per_sample.detach())  # every rank's
            mine = (ids >= start) & (ids < stop)
            table.update(ids[mine] - start, losses[mine])
            drawn += np.bincount(group[ids].numpy(), minlength=3)
        ds.set_weights(sharded_probabilities(rule, table, ds.virtual_shards))  # plans the next round
        result = evaluate(model.module, test, test_group)
        result.update(drawn_rare=float(drawn[1] / drawn.sum()), drawn_noise=float(drawn[2] / drawn.sum()))
        log(f"round {rnd}: test loss common {result['common']:.3f} rare {result['rare']:.3f} | "
            f"drawn rare {result['drawn_rare']:.1%} noise {result['drawn_noise']:.1%}", flush=True)
    prints = [None] * args.world
    dist.all_gather_object(prints, ds.fingerprint())
    log(f"round fingerprints {'equal' if len(set(prints)) == 1 else 'DIFFER'} on {args.world} rank(s)", flush=True)
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        state = {"dataset": ds.state_dict(0, True), "table": table.state_dict()}  # at a round boundary
        torch.save(state, os.path.join(args.save, f"rank{rank}.pt"))
        log(f"saved on {args.world} rank(s): round fingerprint {ds.fingerprint():#x}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="gloo ranks on this machine")
    ap.add_argument("--samples", type=int, default=20_000, help="samples (a round draws about as many)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128, help="global batch (split over the ranks)")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=None, help="folder for one state per rank at the end")
    ap.add_argument("--resume", default=None, help="folder of the saved states (the same --world)")
    args = ap.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="irdro-sharded-stream-")
    try:
        args.data, args.local = os.path.join(scratch, "remote"), os.path.join(scratch, "local")
        write_shards(args.data, args.samples, args.seed)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        results = mp.Manager().dict()
        mp.start_processes(run_rank, args=(args, port, results), nprocs=args.world, join=True, start_method="fork")
        return dict(results[0])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
