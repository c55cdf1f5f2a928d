"""One :class:`ShardedIRDROSampler` driven by hand with recorded feedback: what the trainer integrations'
2-rank runs must reproduce (tests/test_hf_sharded.py, tests/test_lightning_sharded.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
from _core_helpers import gloo_group

from irdro_sampler import ShardedIRDROSampler


def drive_by_hand(rank: int, world: int, port: int, results: Any, steps: list[int], feedback: list,
                  options: dict[str, Any]) -> None:
    """In a process group of ``world`` ranks on 127.0.0.1:``port`` (gloo), draw global batches ``steps`` of a
    ``ShardedIRDROSampler(**options)``, applying each recorded ``(step, indices, losses)`` after its batch;
    ``results[rank]`` gets ``{"drawn": {b: indices}, "fingerprint": ...}``."""
    with gloo_group(rank, world, port):
        sampler = ShardedIRDROSampler(**options)
        drawn = {}
        for b in steps:
            drawn[b] = sampler.batch(b)[0].tolist()
            for step, idx, losses in feedback:
                if step == b:
                    sampler.update(np.asarray(idx, dtype=np.int64), np.asarray(losses, dtype=np.float32), step=step)
        results[rank] = {"drawn": drawn, "fingerprint": sampler.fingerprint()}
