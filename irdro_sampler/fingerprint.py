"""Digests that let ranks check they agree: the one place fingerprints are computed.

A fingerprint is a signed 64-bit blake2b digest (it fits an int64 tensor for one all-gather). The
map-style sampler chains a 16-byte digest over every applied feedback record (O(B) per record) and
keys the digest of its options with it; the streaming path digests its table and weights.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from .loss_table import LossTable

EMPTY_DIGEST = bytes(16)


def digest_to_int(data: bytes, key: bytes = b"") -> int:
    """A signed 64-bit blake2b digest of ``data`` (fits an int64 tensor for an all-gather)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=key).digest(), "little", signed=True)


def chain_digest(prev: bytes, step: int, indices: np.ndarray, losses: np.ndarray) -> bytes:
    """The running feedback digest ``prev`` extended by one applied record (O(B))."""
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(int(step).to_bytes(8, "little", signed=True))
    h.update(np.ascontiguousarray(indices, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(losses, dtype="<f8").tobytes())
    return h.digest()


def table_digest(table: LossTable) -> bytes:
    """Digest of a table's contents (O(N)): the feedback digest of states saved before it existed (ranks
    that load the same old state still agree), and the streaming path's fingerprint."""
    h = hashlib.blake2b(b"irdro-table", digest_size=16)
    for arr in (table.losses, table.counts, table.last_step):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.digest()


def options_fingerprint(options: Any, key: bytes = b"") -> int:
    """The fingerprint of ``options`` (a tuple of primitives, compared through its ``repr``) keyed by
    ``key`` (a running digest of the data that moved the state)."""
    return digest_to_int(repr(options).encode(), key=key)
