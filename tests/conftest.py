"""Session setup shared by every test file."""

from __future__ import annotations


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
