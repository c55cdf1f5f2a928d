"""The state of :class:`~irdro_sampler.sharded_balanced.ShardedBalancedDraws` across world sizes.

A rank's state holds its per-sample arrays over global ids ``[start, stop)``, its per-shard arrays over
shards ``[first_shard, stop_shard)``, the replicated clock scalars and the configuration (see
``ShardedBalancedDraws.state_dict``). :func:`merge_states` joins the parts of consecutive ranks into one
state and :func:`slice_state` cuts out what a rank of any world size owns, so a run saved on W ranks
continues on W' (tests/test_sharded_balanced.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .virtual_shards import VirtualShards

__all__ = ["CONFIG_FIELDS", "KEYS_FIELD", "PER_SAMPLE_FIELDS", "PER_SHARD_FIELDS", "SCALAR_FIELDS", "merge_states", "slice_state"]

#: State arrays indexed by global id over ``[start, stop)``.
PER_SAMPLE_FIELDS = ("masses", "offsets", "draws")
#: The key tree's keys, indexed by global id like PER_SAMPLE_FIELDS; absent from states saved before
#: deferred keys (they rebuild their keys and draw without deferral, as they did).
KEYS_FIELD = "keys"
#: State arrays indexed by shard over ``[first_shard, stop_shard)``.
PER_SHARD_FIELDS = ("shard_totals", "shard_moved")
#: The clock scalars every rank holds the same copy of.
SCALAR_FIELDS = ("clock", "drift1", "drift2", "alpha", "beta", "ref_total", "rekeys", "needs_reference")
#: The configuration a state must match to be loaded.
CONFIG_FIELDS = ("dataset_size", "num_shards", "global_batch", "uniform_mix", "seed")


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One state covering the union of ``states`` (the parts of consecutive ranks, in any order): the
    per-sample and per-shard arrays concatenated; configuration and scalars must agree."""
    if not states:
        raise ValueError("merge_states needs at least one state")
    # A rank owning no shard holds nothing (its ids read [N, N)): only its scalars are checked.
    parts = sorted((s for s in states if s["stop_shard"] > s["first_shard"]), key=lambda s: s["first_shard"])
    parts = parts or [states[0]]
    first = parts[0]
    for part in states:
        for name in (*CONFIG_FIELDS, *SCALAR_FIELDS):
            if part[name] != first[name]:
                raise ValueError(f"states disagree on '{name}': {first[name]!r} vs {part[name]!r}")
    for a, b in zip(parts, parts[1:], strict=False):
        if a["stop"] != b["start"] or a["stop_shard"] != b["first_shard"]:
            raise ValueError(f"states are not contiguous: ids [{a['start']}, {a['stop']}) then "
                             f"[{b['start']}, {b['stop']}), shards up to {a['stop_shard']} then from {b['first_shard']}")
    out = dict(first)
    out["stop"], out["stop_shard"] = parts[-1]["stop"], parts[-1]["stop_shard"]
    for name in (*PER_SAMPLE_FIELDS, *PER_SHARD_FIELDS, "held_ids", "held_credits"):
        out[name] = np.concatenate([p[name] for p in parts])
    has_keys = {p.get(KEYS_FIELD) is not None for p in states}
    if len(has_keys) > 1:
        raise ValueError(f"states disagree on '{KEYS_FIELD}': some hold the key tree's keys, some do not")
    if has_keys.pop():
        out[KEYS_FIELD] = np.concatenate([p[KEYS_FIELD] for p in parts])
    return out


def slice_state(state: dict[str, Any], shards: VirtualShards, rank: int, world_size: int) -> dict[str, Any]:
    """The part of ``state`` (e.g. from :func:`merge_states`) that rank ``rank`` of ``world_size`` owns."""
    start, stop = shards.ids_of_rank(rank, world_size)
    owned = shards.shards_of_rank(rank, world_size)
    if not (state["start"] <= start and stop <= state["stop"]
            and state["first_shard"] <= owned.start and owned.stop <= state["stop_shard"]):
        raise ValueError(f"state covers ids [{state['start']}, {state['stop']}) and shards "
                         f"[{state['first_shard']}, {state['stop_shard']}); rank {rank} of {world_size} needs ids "
                         f"[{start}, {stop}) and shards [{owned.start}, {owned.stop})")
    out = dict(state)
    lo, hi = start - state["start"], stop - state["start"]
    for name in (*PER_SAMPLE_FIELDS, KEYS_FIELD) if state.get(KEYS_FIELD) is not None else PER_SAMPLE_FIELDS:
        out[name] = state[name][lo:hi]
    for name in PER_SHARD_FIELDS:
        out[name] = state[name][owned.start - state["first_shard"] : owned.stop - state["first_shard"]]
    held = (state["held_ids"] >= start) & (state["held_ids"] < stop)
    out["held_ids"], out["held_credits"] = state["held_ids"][held], state["held_credits"][held]
    out.update(start=start, stop=stop, first_shard=owned.start, stop_shard=owned.stop)
    return out
