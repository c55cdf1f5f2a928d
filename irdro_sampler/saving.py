"""Crash-safe saving of sampler states (and anything else ``torch.save`` writes)."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import torch

_TMP_SUFFIX = ".tmp"


def save_state(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves ``path`` half written.

    The object is written to a temporary file in the same folder, flushed and fsynced, then moved
    over ``path`` with ``os.replace`` (atomic on POSIX and Windows), and the folder is fsynced where
    the platform allows it. A process killed at any moment leaves ``path`` either as it was or as the
    complete new file. A kill during the write can leave the temporary file
    (``.<name>.<host>.<pid>.<random>.tmp``); the next ``save_state`` to the same path removes those of
    processes of this host that no longer run.

    Load with ``torch.load(path, weights_only=True)``: sampler states hold tensors and primitives only.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"path: {path} is a directory; give a file name")
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"path: folder {folder} does not exist")
    _remove_stale_temporaries(target)
    tmp = folder / f".{target.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
    # os.open with mode 0o666: the umask applies, so the file gets the permissions torch.save would give it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname())[:64] or "host"


def _fsync_folder(folder: Path) -> None:
    """Persist the rename itself (POSIX); not possible on Windows, where opening a folder fails."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries of ``target`` left by killed ``save_state`` calls of this host (POSIX only:
    on Windows ``os.kill`` cannot probe a process)."""
    if os.name != "posix":
        return
    prefix = f".{target.name}.{_host()}."
    for leftover in target.parent.glob(f".{target.name}.*{_TMP_SUFFIX}"):
        rest = leftover.name[len(prefix) :] if leftover.name.startswith(prefix) else ""
        pid = rest.split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its file
    return True
