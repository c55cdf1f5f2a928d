"""Every private name of mosaicml-streaming that irdro_sampler relies on, in one place.

``WeightedStreamingDataset`` replaces streaming's per-epoch planning: it overrides ``resample_streams``
and ``_get_work`` (copying the latter's leader/barrier/shared-memory protocol), wraps ``state_dict``,
``load_state_dict``, ``get_item`` and ``__iter__``, and reads streaming's private worlds and shared
memory helpers. Those are not a public API, so this module pins what was checked:
:data:`CHECKED_SOURCES` holds a hash of the source of every streaming function or class whose
behaviour the integration copies or depends on, identical in every version of :data:`TESTED_VERSIONS`.
``tests/test_streaming_compat.py`` fails when the installed streaming differs, so a new release is
caught by CI rather than by users; importing this module on an untested version only warns.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from typing import Any

import streaming
from streaming import StreamingDataset
from streaming.base import batching as _batching
from streaming.base.batching import generate_work
from streaming.base.batching import random as _random_batching
from streaming.base.shared import SharedBarrier, SharedMemory
from streaming.base.shared import prefix as _prefix

__all__ = [
    "CHECKED_SOURCES",
    "PRIVATE_ATTRIBUTES",
    "TESTED_VERSIONS",
    "SharedMemory",
    "changed_internals",
    "generate_work",
    "shm_name",
    "source_hashes",
]

#: Streaming releases whose internals were read and tested (their hashes below are identical).
TESTED_VERSIONS = ("0.12.0", "0.13.0")

#: Private attributes of a constructed ``StreamingDataset`` (and its ``Stream`` objects) the
#: integration reads: the worlds (node/rank/worker layout), the barrier and work sharing of
#: ``_get_work``, the shared-memory prefix, and the stream mixing options it refuses.
PRIVATE_ATTRIBUTES = (
    "_unique_rank_world",
    "_parallel_rank_world",
    "_unique_worker_world",
    "_parallel_worker_world",
    "_shared_barrier",
    "_shm_prefix_int",
    "_share_work",
    "_attach_work",
)
STREAM_PRIVATE_ATTRIBUTES = ("_proportion", "_repeat", "_choose")

#: First 16 hex digits of sha256(inspect.getsource(obj)) in every tested version.
CHECKED_SOURCES = {
    "StreamingDataset._get_work": "b44aef7d7bfdc6f2",
    "StreamingDataset._share_work": "d1e82efab458c46c",
    "StreamingDataset._attach_work": "466aee28993733fd",
    "StreamingDataset.resample_streams": "0f2bf8c08cdb76b5",
    "StreamingDataset.state_dict": "f43fd0324bbaddc3",
    "StreamingDataset.load_state_dict": "05a5e2b2930ea878",
    "StreamingDataset.__iter__": "6457c4cfbae05998",
    "StreamingDataset._resume": "308faccca0ea5c95",
    "StreamingDataset.get_item": "0082820df3629b50",
    "generate_work": "ffbeb270d08cb546",
    "generate_work_random_batching": "93645f14cdcc8b92",
    "SharedMemory": "1cde60a1296ef684",
    "SharedBarrier.__call__": "2974d6937d631cb2",
    "_get_path": "98a13aabf7d2dbf0",
}


def _checked_objects() -> dict[str, Any]:
    return {
        "StreamingDataset._get_work": StreamingDataset._get_work,
        "StreamingDataset._share_work": StreamingDataset._share_work,
        "StreamingDataset._attach_work": StreamingDataset._attach_work,
        "StreamingDataset.resample_streams": StreamingDataset.resample_streams,
        "StreamingDataset.state_dict": StreamingDataset.state_dict,
        "StreamingDataset.load_state_dict": StreamingDataset.load_state_dict,
        "StreamingDataset.__iter__": StreamingDataset.__iter__,
        "StreamingDataset._resume": StreamingDataset._resume,
        "StreamingDataset.get_item": StreamingDataset.get_item,
        "generate_work": _batching.generate_work,
        "generate_work_random_batching": _random_batching.generate_work_random_batching,
        "SharedMemory": SharedMemory,
        "SharedBarrier.__call__": SharedBarrier.__call__,
        "_get_path": _prefix._get_path,
    }


def source_hashes() -> dict[str, str]:
    """The installed streaming's hashes, keyed like :data:`CHECKED_SOURCES`."""
    return {
        name: hashlib.sha256(inspect.getsource(obj).encode("utf-8")).hexdigest()[:16]
        for name, obj in _checked_objects().items()
    }


def changed_internals() -> list[str]:
    """Names in :data:`CHECKED_SOURCES` whose installed source differs from the checked one."""
    now = source_hashes()
    return sorted(name for name, digest in CHECKED_SOURCES.items() if now.get(name) != digest)


def shm_name(prefix_int: int, name: str) -> str:
    """Streaming's shared-memory block name for ``name`` under the dataset's prefix."""
    return _prefix._get_path(prefix_int, name)


if streaming.__version__ not in TESTED_VERSIONS:  # pragma: no cover - depends on the environment
    _changed = changed_internals()
    warnings.warn(
        f"irdro_sampler's streaming integration overrides private planning code of mosaicml-streaming, tested "
        f"with {', '.join(TESTED_VERSIONS)}; found {streaming.__version__}, in which "
        + (f"these internals changed: {', '.join(_changed)}" if _changed else "the internals it copies are unchanged")
        + ". See docs/streaming.md before relying on it.",
        stacklevel=2,
    )
