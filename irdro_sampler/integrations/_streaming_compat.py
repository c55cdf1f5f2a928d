"""Every private name of mosaicml-streaming that irdro_sampler relies on, in one place.

``WeightedStreamingDataset`` replaces streaming's per-epoch planning: it overrides ``resample_streams``
(public) and, through :class:`NodePlannedDataset` here, the private ``_get_work`` (copying its
leader/barrier/shared-memory protocol); it wraps ``state_dict``, ``load_state_dict``, ``get_item`` and
``__iter__``, and reads streaming's private worlds, barrier and shared-memory prefix. Those are not a
public API, so this module is the only one that names them: the accessor functions below
(:func:`shm_prefix_int`, :func:`unique_rank_world`, :func:`node_barrier`, :func:`stream_mixing_options`,
...) and :class:`NodePlannedDataset` are what the rest of the package calls, and
``tests/test_private_names.py`` fails when any other module uses a private name of a streaming object.

:data:`CHECKED_SOURCES` holds a hash of the source of every streaming function or class whose
behaviour the integration copies or depends on, identical in every version of :data:`TESTED_VERSIONS`.
``tests/test_streaming_compat.py`` fails when the installed streaming differs, so a new release is
caught by CI rather than by users; importing this module on an untested version only warns.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import streaming
from filelock import FileLock
from streaming import Stream, StreamingDataset
from streaming.base import batching as _batching
from streaming.base.batching import generate_work
from streaming.base.batching import random as _random_batching
from streaming.base.shared import SharedBarrier, SharedMemory
from streaming.base.shared import prefix as _prefix

from irdro_sampler.integrations import _source_pins

__all__ = [
    "CHECKED_SOURCES",
    "PRIVATE_ATTRIBUTES",
    "STREAM_PRIVATE_ATTRIBUTES",
    "TESTED_VERSIONS",
    "NodePlannedDataset",
    "SharedMemory",
    "changed_internals",
    "current_iteration",
    "generate_work",
    "node_barrier",
    "parallel_rank_world",
    "parallel_worker_world",
    "remove_stale_empty_blocks",
    "shm_name",
    "shm_prefix_int",
    "source_hashes",
    "stop_iteration",
    "stream_mixing_options",
    "unique_rank_world",
    "unique_worker_world",
]

#: Streaming releases whose internals were read and tested (their hashes below are identical).
TESTED_VERSIONS = ("0.12.0", "0.13.0")

#: Private attributes of a constructed ``StreamingDataset`` (and its ``Stream`` objects) this module
#: reads: the worlds (node/rank/worker layout), the barrier and work sharing of ``_get_work``, the
#: shared-memory prefix, and the stream mixing options the integration refuses.
PRIVATE_ATTRIBUTES = (
    "_unique_rank_world",
    "_parallel_rank_world",
    "_unique_worker_world",
    "_parallel_worker_world",
    "_shared_barrier",
    "_shm_prefix_int",
    "_share_work",
    "_attach_work",
    "_iterator",
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
    "StreamingDataset.__init__": "34032a553e3c5801",
    "Stream.__init__": "f64ac00f15d8d23a",
    "SharedBarrier.__init__": "7765ec4404fb2a7d",
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
        # Sets the private worlds, the barrier (and deletes its lock), the shared-memory prefix.
        "StreamingDataset.__init__": StreamingDataset.__init__,
        # Stores the mixing options as `_proportion`/`_repeat`/`_choose`.
        "Stream.__init__": Stream.__init__,
        # Creates the barrier's `lock`, which StreamingDataset deletes and `_get_work` recreates lazily.
        "SharedBarrier.__init__": SharedBarrier.__init__,
        "generate_work": _batching.generate_work,
        "generate_work_random_batching": _random_batching.generate_work_random_batching,
        "SharedMemory": SharedMemory,
        "SharedBarrier.__call__": SharedBarrier.__call__,
        "_get_path": _prefix._get_path,
    }


def source_hashes() -> dict[str, str]:
    """The installed streaming's hashes, keyed like :data:`CHECKED_SOURCES`."""
    return _source_pins.source_hashes(_checked_objects())


def changed_internals() -> list[str]:
    """Names in :data:`CHECKED_SOURCES` whose installed source differs from the checked one."""
    return _source_pins.changed(CHECKED_SOURCES, _checked_objects())


def shm_name(prefix_int: int, name: str) -> str:
    """Streaming's shared-memory block name for ``name`` under the dataset's prefix."""
    return _prefix._get_path(prefix_int, name)


#: Where streaming's SharedMemory (``shm_open``) puts its blocks on Linux.
SHM_FOLDER = "/dev/shm"
_BLOCK_NAME = re.compile(r"\d{6}_\w+")  # shm_name(prefix_int, name), pinned by the "_get_path" hash


def remove_stale_empty_blocks(min_age_s: float = 10.0, folder: str = SHM_FOLDER) -> list[str]:
    """Unlink streaming's empty shared-memory blocks older than ``min_age_s`` seconds; returns their names.

    Python's SharedMemory creates a block and then sizes it; a process stopped in between (a signal raised
    as an exception there, SIGKILL) leaves a 0-byte block behind. Streaming's search for a free prefix
    attaches to the blocks of every prefix in use, and an empty one fails it ("cannot mmap an empty
    file"): every later StreamingDataset on the machine would fail to start. No live dataset has an empty
    block (a block is sized before its name is shared), and the age spares one being created right now.
    """
    if not os.path.isdir(folder):
        return []
    removed = []
    now = time.time()
    for entry in os.scandir(folder):
        if not _BLOCK_NAME.fullmatch(entry.name):
            continue
        try:
            stat = entry.stat()
            if stat.st_size == 0 and now - stat.st_mtime >= min_age_s:
                os.unlink(entry.path)
                removed.append(entry.name)
        except FileNotFoundError:  # removed by another process meanwhile
            continue
    return removed


# ---------------------------------------------------------------------- accessors
# One function per private attribute read elsewhere, so a renamed attribute is fixed here only.


def shm_prefix_int(dataset: StreamingDataset) -> int:
    """The dataset's shared-memory prefix (unique per node among live datasets), set at construction."""
    return int(dataset._shm_prefix_int)


def unique_rank_world(dataset: StreamingDataset) -> Any:
    """The ``World`` of this rank (``is_local_leader``, ``num_ranks``, ...), set at construction."""
    return dataset._unique_rank_world


def parallel_rank_world(dataset: StreamingDataset) -> Any:
    """The rank ``World`` streaming partitions for (equal to the unique one without replication)."""
    return dataset._parallel_rank_world


def unique_worker_world(dataset: StreamingDataset) -> Any:
    """The ``World`` of this DataLoader worker (``worker_of_node``, ``workers_per_node``, ...).

    Set by ``StreamingDataset.__iter__``; undefined before the first iteration in this process.
    """
    return dataset._unique_worker_world


def parallel_worker_world(dataset: StreamingDataset) -> Any:
    """The worker ``World`` streaming partitions for; set by ``StreamingDataset.__iter__``."""
    return dataset._parallel_worker_world


def current_iteration(dataset: StreamingDataset) -> Any:
    """The handle of the background threads of the dataset's latest ``__iter__`` in this process
    (streaming's ``_Iterator``), or None before the first one."""
    return getattr(dataset, "_iterator", None)


def stop_iteration(iteration: Any) -> None:
    """Stop an iteration's prepare and ready threads and wait for them (a no-op once they have exited).

    Streaming stops them when the epoch's samples run out or the next ``__iter__`` starts, not when the
    consumer abandons the generator.
    """
    iteration.exit()


def node_barrier(dataset: StreamingDataset) -> Callable[[int], None]:
    """The node's inter-process barrier: ``node_barrier(ds)(num_procs)`` waits for ``num_procs`` processes.

    ``StreamingDataset.__init__`` deletes the barrier's file lock (it cannot be pickled to DataLoader
    workers); like ``StreamingDataset._get_work`` this recreates it in the calling process first.
    """
    barrier = dataset._shared_barrier
    if not hasattr(barrier, "lock"):
        barrier.lock = FileLock(barrier.filelock_path)
    return barrier


def stream_mixing_options(stream: Stream) -> dict[str, Any]:
    """The mixing options (``proportion``, ``repeat``, ``choose``) a ``Stream`` was given, without the unset ones."""
    given = {
        "proportion": getattr(stream, "_proportion", None),
        "repeat": getattr(stream, "_repeat", None),
        "choose": getattr(stream, "_choose", None),
    }
    return {k: v for k, v in given.items() if v is not None}


# ---------------------------------------------------------------------- the planning hook
class NodePlannedDataset(StreamingDataset):
    """A StreamingDataset whose per-epoch work comes from :meth:`plan_node_work`.

    Streaming's ``__iter__`` calls the private ``_get_work(epoch, sample_in_epoch)`` in every
    DataLoader worker. This class overrides it with the same protocol as
    ``StreamingDataset._get_work`` (pinned by :data:`CHECKED_SOURCES`): the node's local leader plans the
    whole world's epoch and shares it through shared memory; the other workers of the node wait at the
    node barrier, attach to it, and every worker takes its own slice. Two hooks replace streaming's
    fixed parts:

    * :meth:`plan_node_work` (leader only) returns the epoch's plan, shape (nodes, ranks per node,
      workers per rank, batches per worker, batch size), ``-1`` for padding. It must not raise: a
      leader that raised would leave the node's other workers waiting at the barrier forever, so it
      records the error where every worker can read it and returns an empty plan.
    * :meth:`planning_error` (every worker, after the plan is shared) returns that recorded error or
      None; it is raised in every worker once the shared blocks are released.
    """

    def __init__(self, **streaming_kwargs: Any) -> None:
        remove_stale_empty_blocks()  # or streaming's prefix search may fail on one (see there)
        super().__init__(**streaming_kwargs)

    def plan_node_work(self, epoch: int, sample_in_epoch: int, world: Any) -> np.ndarray:
        """The whole world's plan for ``epoch`` from ``sample_in_epoch`` (``world``: the parallel worker world)."""
        return generate_work(self.batching_method, self, world, epoch, sample_in_epoch)

    def planning_error(self) -> Exception | None:
        """The error the node's planner recorded for this epoch, if any (read by every worker)."""
        return None

    def _get_work(self, epoch: int, sample_in_epoch: int) -> np.ndarray:
        barrier = node_barrier(self)
        u_world = self._unique_worker_world
        p_world = self._parallel_worker_world
        if u_world.is_local_leader:
            plan = self.plan_node_work(epoch, sample_in_epoch, p_world)
            shape_shm, data_shm = self._share_work(plan.astype(np.int64))
            barrier(u_world.workers_per_node)
        else:
            barrier(u_world.workers_per_node)
            plan, shape_shm, data_shm = self._attach_work()
        # Read before the last barrier: past it, the leader may start the next epoch and reset the error.
        error = self.planning_error()
        worker_ids = np.array(plan[p_world.node, p_world.rank_of_node, p_world.worker_of_rank]).flatten()
        barrier(u_world.workers_per_node)
        shape_shm.cleanup()
        if data_shm is not None:
            data_shm.cleanup()
        if error is not None:
            raise error
        return worker_ids


if streaming.__version__ not in TESTED_VERSIONS:  # pragma: no cover - depends on the environment
    _changed = changed_internals()
    warnings.warn(
        f"irdro_sampler's streaming integration overrides private planning code of mosaicml-streaming, tested "
        f"with {', '.join(TESTED_VERSIONS)}; found {streaming.__version__}, in which "
        + (f"these internals changed: {', '.join(_changed)}" if _changed else "the internals it copies are unchanged")
        + ". See docs/streaming.md before relying on it.",
        stacklevel=2,
    )
