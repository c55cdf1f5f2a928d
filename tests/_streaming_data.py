"""Helpers for the streaming tests: real MDS shards written with streaming.MDSWriter into tmp folders."""

from __future__ import annotations

import os
import uuid

import numpy as np


def write_mds(root: str, num_samples: int, samples_per_shard: int, payload_bytes: int = 0) -> str:
    """Write ``num_samples`` samples ({'x': int64 id[, 'pad': bytes]}) in shards of about ``samples_per_shard``."""
    from streaming import MDSWriter

    out = os.path.join(root, "remote")
    columns = {"x": "int64", "pad": "bytes"} if payload_bytes else {"x": "int64"}
    pad = b"\0" * payload_bytes
    # Shard size limit in bytes: a sample costs 8 (x) + a 4-byte offset (+ the pad and its 4-byte size).
    per_sample = 12 + (payload_bytes + 4 if payload_bytes else 0)
    with MDSWriter(out=out, columns=columns, size_limit=per_sample * samples_per_shard + 16) as w:
        for i in range(num_samples):
            w.write({"x": np.int64(i), "pad": pad} if payload_bytes else {"x": np.int64(i)})
    return out


def fresh_local(root: str) -> str:
    """A local cache dir never used before (streaming registers local dirs in shared memory)."""
    d = os.path.join(root, "local-" + uuid.uuid4().hex[:10])
    os.makedirs(d)
    return d
