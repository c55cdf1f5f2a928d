"""Session setup shared by every test file."""

from __future__ import annotations

import contextlib

import pytest


def pytest_configure(config) -> None:
    """Lift the soft limit on open files to the hard limit.

    mosaicml-streaming keeps a dataset's shared memory (and its prepare/ready threads) alive when an
    iteration is abandoned mid-epoch, as many tests here do on purpose, so one pytest process gathers
    thousands of descriptors over the streaming files (about 5,300 over tests/test_streaming_weighted.py
    alone). A machine whose soft limit is 1024 or 4096 would fail the later streaming tests for a reason
    that is not theirs.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _streaming_blocks() -> list:
    """Every streaming ``SharedMemory`` object alive in this process (none if streaming is not imported)."""
    import gc
    import sys

    memory = sys.modules.get("streaming.base.shared.memory")
    if memory is None:
        return []
    cls = memory.SharedMemory
    return [o for o in gc.get_objects() if type(o) is cls]


@pytest.fixture(scope="module", autouse=True)
def _release_streaming_blocks_of_the_module():
    """After a test file, release the shared memory its StreamingDatasets left in this process.

    Streaming registers every block it creates or attaches to with ``atexit``, so none is freed before the
    process exits, and each new dataset attaches once more to every live prefix while it looks for a free
    one: the descriptors held grow with the square of the datasets made in one process. Over the whole
    suite that reached the hard limit of open files (20,000 here) and later streaming tests failed with
    EMFILE. Module-scoped fixtures (the only wider ones here) are gone by now, so nothing still uses the
    blocks made during the file: attachments are closed, created blocks are unlinked (their names free
    for the next file's datasets; they are not closed, as an iteration thread may still hold a view).
    """
    before = {id(o) for o in _streaming_blocks()}
    yield
    for block in _streaming_blocks():
        if id(block) in before:
            continue
        for shm in block.opened_shms:
            with contextlib.suppress(Exception):
                shm.close()
        for shm in block.created_shms:
            with contextlib.suppress(Exception):
                shm.unlink()
