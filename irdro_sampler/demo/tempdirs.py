"""Temporary folders of the demo that do not outlive it.

* SIGINT and SIGTERM (and SIGHUP) unwind the demo like an exception (:func:`signals_unwind`), so every
  ``finally`` removes the folders it made. A signal that lands inside a ``__del__`` (where Python discards
  the exception) is raised again at the next training step (:func:`raise_if_signalled`).
* SIGKILL cannot be caught: nothing runs in the killed process. The folders are named
  ``<prefix><pid>-<random>``; the next demo run removes those whose process no longer exists
  (:func:`owned_tempdir`), so at most one killed run's leftovers exist at a time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from ..saving import _process_alive


def sweep_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove ``parent/<prefix><pid>-*`` folders whose process is gone; returns what was removed."""
    removed = []
    for folder in Path(parent).glob(f"{prefix}*"):
        pid = folder.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and folder.is_dir() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def owned_tempdir(prefix: str, parent: str | os.PathLike | None = None) -> Path:
    """``mkdtemp`` named ``<prefix><pid>-<random>`` in ``parent`` (default: the system temp folder),
    after removing the leftovers of killed runs there. The caller removes it (``try/finally``)."""
    base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    sweep_stale(base, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base))


# Signals received while :func:`signals_unwind` is active. Python discards an exception raised by a
# handler that runs inside ``__del__`` or a weakref callback ("Exception ignored in ..."), and the run
# would go on; the record lets :func:`raise_if_signalled` raise it again at the next safe point.
_received: list[int] = []


# Depth of :func:`signals_deferred` blocks: inside one, a signal is only recorded.
_deferring = [0]


def _terminate(signum: int, frame: object) -> None:
    _received.append(signum)
    if _deferring[0]:
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def raise_if_signalled() -> None:
    """Raise again a signal received under :func:`signals_unwind` whose exception was discarded."""
    if _received:
        if _received[-1] == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + _received[-1])


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back the exception of a signal that arrives under :func:`signals_unwind` until the block ends.

    For steps that must not stop half-way: Python's SharedMemory creates a block and then sizes it, and
    an exception between the two leaves an empty block that breaks later datasets. Outside
    :func:`signals_unwind` it changes nothing."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1
    if not _deferring[0]:
        raise_if_signalled()


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """While active, SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` and SIGINT raises
    ``KeyboardInterrupt``, so ``finally`` blocks run; a signal whose exception Python discarded is raised
    again by :func:`raise_if_signalled` (call it at safe points) or at the latest when the block ends.
    Only in the main thread; the previous handlers are restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with contextlib.suppress(ImportError):
        # Composer installs its own SIGTERM/SIGINT handlers when its engine is first imported; import it
        # now so that a lazy import later cannot replace these.
        import composer.core.engine  # noqa: F401
    names = [n for n in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, n)]
    _received.clear()
    previous = {n: signal.signal(getattr(signal, n), _terminate) for n in names}
    try:
        yield
        raise_if_signalled()
    finally:
        for n, handler in previous.items():
            signal.signal(getattr(signal, n), handler)
        _received.clear()
