"""Benchmark: streaming rounds planned from sharded weights (``plan_sharded_round``) on 1, 2, 4 gloo ranks
against the unsharded planner ``WeightedStreamingDataset`` uses today (``plan_round``, one process holding
all N), through public calls only.

Per configuration (N, world, draws), 3 rounds of ``round_size`` draws, the weights changing every round
(gamma(0.5) from a generator seeded per (round, virtual shard), so a rank builds only its own slice and the
unsharded process sees the same weights concatenated). Per rank and round: the planning wall time
(``time.perf_counter`` around the call, after a ``dist.barrier``), the process CPU time of the call, the
time spent inside ``torch.distributed`` collectives and their number (counted by wrapping the collectives
in the benchmark process). Reported: the median over the rounds, the max over the ranks. Memory: the O(N)
bytes a rank holds (``nbytes`` of its weights and carries; unsharded: the node's frozen and pending rows
and the carry), the per-node O(round) bytes, peak RSS (``ru_maxrss``, includes torch) and the peak minus
the RSS just before the first planning call. Every configuration runs in fresh processes.

The unsharded balanced rounds cost two O(N) passes per round in the dataset: ``plan_round`` (the counts
from the carry at the round's start) and advancing the carry when the next round's weights are frozen
(``balanced_counts(carry, p, round_size)[1]``); the latter is timed apart ("carry s"). The sharded
planner returns the next carry from the same call.

    python benchmarks/bench_sharded_rounds.py            # N in {1e6, 1e7}, world 1, 2, 4 (~5 min)
    python benchmarks/bench_sharded_rounds.py --quick    # N = 1e6, world 1, 2 (smoke run)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _gloo import free_port, gloo_group
from tqdm import tqdm

from irdro_sampler.carried_rounding import balanced_counts, initial_carry
from irdro_sampler.integrations.streaming_rounds import plan_round
from irdro_sampler.sharded_rounds import plan_sharded_round
from irdro_sampler.virtual_shards import VirtualShards, default_num_shards

SEED = 1234
ROUNDS = 3
MDS_SHARD = 1 << 15  # synthetic MDS shards of the unsharded planner
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "all_gather_object")


def _rss_mb() -> float:
    """Current resident set (MB) from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _fill_weights(out: np.ndarray, shards: VirtualShards, first_shard: int, last_shard: int, round_idx: int) -> None:
    """Round ``round_idx``'s weights of shards [first, last) into ``out`` (their ids, contiguous), each
    shard from its own generator: the same values whichever rank (or the unsharded process) builds them."""
    base = shards.shard_range(first_shard)[0]
    for s in range(first_shard, last_shard):
        a, b = shards.shard_range(s)
        if b > a:
            np.random.default_rng([SEED, round_idx, s]).standard_gamma(0.5, out=out[a - base : b - base])


class _CollectiveClock:
    """Counts calls to, and wall time inside, torch.distributed collectives (wrapped in this process)."""

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0
        self._orig = {}
        for name in _COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._orig[name] = fn
                setattr(dist, name, self._wrap(fn))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        return timed

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0


def _sharded_worker(rank: int, world: int, port: int, results, n: int, draws: str, round_size: int) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world, port):
        shards = VirtualShards(n, default_num_shards(n))
        start, stop = shards.ids_of_rank(rank, world)
        owned = shards.shards_of_rank(rank, world)
        w = np.empty(stop - start)
        clock = _CollectiveClock()
        carry, walls, cpus, coll_s, coll_n, digests = None, [], [], [], [], []
        held = round_bytes = 0
        rss0 = None
        for r in range(ROUNDS):
            _fill_weights(w, shards, owned.start, owned.stop, r)  # in place: one weights array per rank
            if rss0 is None:
                rss0 = _rss_mb()
            dist.barrier()
            clock.reset()
            t0, c0 = time.perf_counter(), time.process_time()
            plan = plan_sharded_round(draws, w, shards, seed=SEED, round_idx=r, round_size=round_size,
                                      carry=carry if draws == "balanced" else None)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            coll_s.append(clock.seconds)
            coll_n.append(clock.calls)
            # At the call boundary a rank holds its weights, the carry passed in and the one returned.
            held = max(held, w.nbytes + (2 * plan.carry.nbytes if plan.carry is not None else 0))
            round_bytes = 2 * (plan.ids.nbytes + plan.probabilities.nbytes)  # node: two planned rounds
            digests.append(hashlib.sha1(plan.ids.tobytes()).hexdigest()[:12])
            carry = plan.carry
        results[rank] = dict(
            wall=statistics.median(walls), cpu=statistics.median(cpus), coll_s=statistics.median(coll_s),
            coll_n=int(statistics.median(coll_n)), held=held, owned=stop - start, round_bytes=round_bytes,
            peak=_peak_mb(), delta=_peak_mb() - rss0, digests=digests, shards=shards.num_shards,
        )


def _unsharded_worker(_: int, port: int, results, n: int, draws: str, round_size: int) -> None:
    torch.set_num_threads(1)
    offsets = np.arange(0, n, MDS_SHARD, dtype=np.int64)
    sizes = np.minimum(offsets + MDS_SHARD, n) - offsets
    vs = VirtualShards(n, default_num_shards(n))  # only to generate the same weights as the sharded runs
    pending = np.empty(n)  # the node's pending-weights row
    frozen = np.empty(n)  # the frozen row: p of the round
    carry = initial_carry(n, SEED) if draws == "balanced" else np.zeros(1)  # the dataset keeps 1 entry for iid
    walls, cpus, carry_s, digests = [], [], [], []
    rss0 = None
    for r in range(ROUNDS):
        _fill_weights(pending, vs, 0, vs.num_shards, r)
        np.divide(pending, pending.sum(), out=frozen)
        if rss0 is None:
            rss0 = _rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        _, ids = plan_round(draws, frozen, seed=SEED, round_idx=r, round_size=round_size, offsets=offsets,
                            sizes=sizes, carry=carry if draws == "balanced" else None)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        digests.append(hashlib.sha1(ids.tobytes()).hexdigest()[:12])
        t0 = time.perf_counter()
        if draws == "balanced":  # the dataset advances the carry when the next round is frozen
            carry = balanced_counts(carry, frozen, round_size)[1]
        carry_s.append(time.perf_counter() - t0)
    results[0] = dict(
        wall=statistics.median(walls), cpu=statistics.median(cpus), carry_s=statistics.median(carry_s),
        held=pending.nbytes + frozen.nbytes + carry.nbytes, round_bytes=0, peak=_peak_mb(),
        delta=_peak_mb() - rss0, digests=digests,
    )


def _spawn(fn, nprocs: int, *args) -> list[dict]:
    results = mp.Manager().dict()
    if fn is _sharded_worker:
        mp.spawn(fn, args=(nprocs, free_port(), results, *args), nprocs=nprocs, join=True)
    else:
        mp.spawn(fn, args=(free_port(), results, *args), nprocs=1, join=True)
    return [results[r] for r in range(nprocs)]


def _fmt_n(n: int) -> str:
    return f"{n:.0e}".replace("e+0", "e")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 1e6, world 1 and 2 (smoke run)")
    ap.add_argument("--n", type=float, nargs="+", default=None, help="data set sizes (default 1e6 1e7)")
    ap.add_argument("--worlds", type=int, nargs="+", default=None, help="sharded world sizes (default 1 2 4)")
    ap.add_argument("--round-size", type=int, default=1 << 18)
    ap.add_argument("--out", default=None, help="markdown results file (default: RESULTS_sharded_rounds.md "
                                                "next to this script; none with --quick)")
    args = ap.parse_args()
    ns = [int(x) for x in (args.n or ([1e6] if args.quick else [1e6, 1e7]))]
    worlds = args.worlds or ([1, 2] if args.quick else [1, 2, 4])
    out = args.out or (None if args.quick else str(Path(__file__).with_name("RESULTS_sharded_rounds.md")))
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    r = args.round_size

    grid = [(n, d, w) for n in ns for d in ("balanced", "iid") for w in [0, *worlds]]  # world 0: unsharded
    rows, base, t_start = [], {}, time.time()
    for n, draws, world in tqdm(grid, desc="configs"):
        if world == 0:
            res = _spawn(_unsharded_worker, 1, n, draws, r)[0]
            base[(n, draws)] = res
            total_s = res["wall"] + res["carry_s"]
            rows.append(dict(n=n, planner="unsharded", world=1, draws=draws, wall=res["wall"], cpu=res["cpu"],
                             carry_s=res["carry_s"], coll_s=float("nan"), coll_n=0, t_ratio=1.0,
                             t2_ratio=res["wall"] / total_s, c_ratio=1.0, held=res["held"], per=res["held"] / n, b_ratio=1.0,
                             round_bytes=0, peak=res["peak"], delta=res["delta"], same="-",
                             digests=res["digests"]))
            continue
        per_rank = _spawn(_sharded_worker, world, n, draws, r)
        ub = base[(n, draws)]
        wall = max(x["wall"] for x in per_rank)
        held = max(x["held"] for x in per_rank)
        owned = max(x["owned"] for x in per_rank)
        same_ranks = all(x["digests"] == per_rank[0]["digests"] for x in per_rank)
        ref = next((row["digests"] for row in rows if row["n"] == n and row["draws"] == draws
                    and row["planner"] == "sharded" and row["world"] == worlds[0]), per_rank[0]["digests"])
        same = "yes" if same_ranks and per_rank[0]["digests"] == ref else "NO"
        if same == "yes" and per_rank[0]["digests"] == ub["digests"]:
            same = "yes, = unsharded ids"
        rows.append(dict(n=n, planner="sharded", world=world, draws=draws, wall=wall,
                         cpu=max(x["cpu"] for x in per_rank), carry_s=float("nan"),
                         coll_s=max(x["coll_s"] for x in per_rank), coll_n=max(x["coll_n"] for x in per_rank),
                         t_ratio=wall / ub["wall"], t2_ratio=wall / (ub["wall"] + ub["carry_s"]),
                         c_ratio=max(x["cpu"] for x in per_rank) / ub["cpu"], held=held,
                         per=held / owned, b_ratio=held / ub["held"], round_bytes=per_rank[0]["round_bytes"],
                         peak=max(x["peak"] for x in per_rank), delta=max(x["delta"] for x in per_rank),
                         same=same, digests=per_rank[0]["digests"], shards=per_rank[0]["shards"]))
    elapsed = time.time() - t_start

    header = ("| N | draws | planner | world | plan s | CPU s | in collectives s | collectives | carry s "
              "| time / unsharded plan | time / unsharded plan+carry | CPU / unsharded plan CPU | O(N) bytes per rank | B per owned sample "
              "| bytes / unsharded | O(round) bytes per node | peak RSS MB | peak - RSS before MB | same rounds |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for x in rows:
        planner = x["planner"] if x["planner"] == "unsharded" else f"sharded ({x['shards']} shards)"
        world = "1 process" if x["planner"] == "unsharded" else f"{x['world']}"

        def f(v, spec):
            return "-" if v != v else format(v, spec)

        lines.append(
            f"| {_fmt_n(x['n'])} | {x['draws']} | {planner} | {world} | {x['wall']:.3f} | {x['cpu']:.3f} "
            f"| {f(x['coll_s'], '.3f')} | {x['coll_n'] if x['planner'] == 'sharded' else '-'} "
            f"| {f(x['carry_s'], '.3f')} | {x['t_ratio']:.2f} | {x['t2_ratio']:.2f} | {x['c_ratio']:.2f} | {x['held']:,} "
            f"| {x['per']:.1f} | {x['b_ratio']:.3f} | {x['round_bytes']:,} | {x['peak']:.0f} | {x['delta']:.0f} "
            f"| {x['same']} |"
        )
    table = "\n".join(lines)
    print(table)
    print(f"\nround_size {r}, {ROUNDS} rounds per configuration, {elapsed:.0f} s in all")

    if out:
        load = os.getloadavg()
        text = f"""## Sharded streaming rounds vs the unsharded planner (`benchmarks/bench_sharded_rounds.py`)

Command: `nice -n 5 {command}` ({elapsed / 60:.1f} min)

Machine: one 2-core VM shared with other work (1-min load average at the end {load[0]:.1f}), gloo over
127.0.0.1, `torch.set_num_threads(1)` per process. Ranks share the 2 cores: on 4 ranks a rank's wall time
includes the other ranks' turns (and the other jobs'); CPU s is the rank process's own CPU time during the
call (gloo's threads included).

Setup: round_size = {r:,}, {ROUNDS} rounds per configuration with weights changing every round (gamma(0.5)
drawn per (round, virtual shard), each rank only its slice; the unsharded process the same weights), seed
{SEED}. Sharded: `plan_sharded_round` with `VirtualShards(N, default_num_shards(N))`, each rank passing the
weights of `shards.ids_of_rank(rank, world)` (balanced: the previous round's carry). Unsharded:
`plan_round` over synthetic MDS shards of 2^15 samples with p = weights / sum, carry from `initial_carry`
then `balanced_counts(carry, p, round_size)[1]`, one process. Every configuration runs in fresh processes.

Columns: plan s = median over the rounds of the planning wall time (`perf_counter` around the call, after
a `dist.barrier`), max over the ranks; CPU s the same in process CPU time; in collectives s / collectives
= wall time inside, and number of, `torch.distributed` collectives per round (max over ranks); carry s =
the unsharded dataset's second O(N) pass per balanced round, advancing the carry when the next round is
frozen (the sharded call returns the next carry itself); time / unsharded plan = plan s / the unsharded
plan s (same N and draws), time / unsharded plan+carry = plan s / (unsharded plan s + carry s), CPU / unsharded plan CPU = CPU s / the
unsharded CPU s (less sensitive to the other jobs than wall time). O(N) bytes
per rank = `nbytes` held at the call: sharded the rank's weights + the carry passed in and the one returned
(i.i.d.: weights only); unsharded the node's frozen and pending rows of N float64 + the carry (N float64 for
balanced, one entry for i.i.d., as the dataset's shared block). O(round) bytes per node: the sharded
dataset's two planned rounds (ids int64 + probabilities float64). Peak RSS (`ru_maxrss`, includes torch
and gloo) max over ranks; peak - RSS before = `ru_maxrss` after the rounds minus the resident set just
before the first planning call (round 0's weights already built). Same rounds: every rank got the same ids
and they equal the first world size's (sharded rounds do not depend on the world size); "= unsharded ids":
the ids also equal the unsharded planner's, round by round.

{table}
"""
        Path(out).write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
