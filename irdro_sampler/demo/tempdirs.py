"""Temporary folders of the demo that do not outlive it.

* SIGINT and SIGTERM (and SIGHUP) unwind the demo like an exception (:func:`signals_unwind`), so every
  ``finally`` removes the folders it made.
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


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """While active, SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` (SIGINT already raises
    ``KeyboardInterrupt``), so ``finally`` blocks run. Only in the main thread; handlers are restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {n: signal.signal(getattr(signal, n), _terminate) for n in names}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(getattr(signal, n), handler)
