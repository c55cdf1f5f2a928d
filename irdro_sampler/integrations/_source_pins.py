"""Pinning third-party internals by the hash of their source: the drift check both compat modules use."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping
from typing import Any


def source_hashes(objects: Mapping[str, Any]) -> dict[str, str]:
    """A short sha256 of each object's source, keyed like ``objects``."""
    return {name: hashlib.sha256(inspect.getsource(obj).encode("utf-8")).hexdigest()[:16] for name, obj in objects.items()}


def changed(checked: Mapping[str, str], objects: Mapping[str, Any]) -> list[str]:
    """Names in ``checked`` whose installed source no longer has the checked hash."""
    now = source_hashes(objects)
    return sorted(name for name, digest in checked.items() if now.get(name) != digest)
