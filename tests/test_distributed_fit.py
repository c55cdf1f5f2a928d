"""fit_sharded: the rule fitted from rows spread over gloo ranks equals the unsharded fit, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from _core_helpers import gloo_group, spawn_gloo

from irdro_sampler import DROWeighting, LossTable
from irdro_sampler.distributed_fit import fit_sharded
from irdro_sampler.virtual_shards import VirtualShards

N = 50_021
RULES = {
    "default": dict(),
    "small-calibration": dict(calibration_size=1000),  # a stride of 51: ranks' first strided rows differ
    "kl-quantile": dict(kl_radius=0.2, truncate_quantile=0.95),
    "mixture": dict(cut_rule="mixture", calibration_size=4096),
    "tilt-cap": dict(tilt_cap="zscore", cut_rule="mixture-valley", calibration_size=4096),  # capped shift
    "tilt-cap-nocut": dict(tilt_cap="zscore", truncate_zscore=None),
}


def _full_table(with_groups: bool, prior) -> LossTable:
    rng = np.random.default_rng(7)
    groups = (np.arange(N) * 13 % 11) if with_groups else None
    table = LossTable(N, prior=prior, groups=groups)
    seen = rng.random(N) < 0.8  # some samples unseen: the prior and the shift's unseen rule matter
    ids = np.flatnonzero(seen)
    loss = rng.gamma(2.0, 1.0, ids.size) * np.where(rng.random(ids.size) < 0.05, 6.0, 1.0)
    table.update(ids, loss, step=3)
    return table


def _slice(full: LossTable, start: int, stop: int) -> LossTable:
    part = LossTable(stop - start, ema=full.ema, prior=full.prior,
                     groups=None if full.groups is None else full.groups[start:stop])
    part.losses[:] = full.losses[start:stop]
    part.counts[:] = full.counts[start:stop]
    part.last_step[:] = full.last_step[start:stop]
    return part


TABLES = [(False, "mean"), (True, "mean"), (True, 2.5)]  # (groups, prior)


def _worker(rank: int, world: int, port: int, results) -> None:
    with gloo_group(rank, world, port):
        start, stop = VirtualShards(N, 64).ids_of_rank(rank, world)
        out = {}
        for with_groups, prior in TABLES:
            full = _full_table(with_groups, prior)
            for name, opts in RULES.items():
                rule = DROWeighting(**opts)
                got, want = fit_sharded(rule, _slice(full, start, stop), start, N), rule.fit(full)
                same = got[:4] == want[:4] and got.cap == want.cap and all(
                    (a is None and b is None) or np.array_equal(a, b)
                    for a, b in ((got.group_threshold, want.group_threshold), (got.group_cap, want.group_cap))
                )
                out[(with_groups, prior, name)] = (same, got[:4], want[:4])
        try:  # ranges that do not cover the data set are refused on every rank
            fit_sharded(DROWeighting(), _slice(full, start, stop), start, N + 1)
            out["bad-range"] = "accepted"
        except ValueError as e:
            out["bad-range"] = str(e)
        results[rank] = out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_fit_equals_the_unsharded_fit(world):
    for rank, out in enumerate(spawn_gloo(_worker, world)):
        for key in ((g, p, name) for g, p in TABLES for name in RULES):
            same, got, want = out[key]
            assert same, f"rank {rank}, table/rule {key}: sharded {got} != unsharded {want}"
        assert "must cover [0, 50022) in rank order" in out["bad-range"]
