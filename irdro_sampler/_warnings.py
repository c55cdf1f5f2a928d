"""Where a warning about the user's arguments points: at the user's line, not inside the package."""

from __future__ import annotations

import os
import sys

# The package's own files: a warning about the user's arguments points past them, at the user's call.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def stacklevel_outside_package() -> int:
    """The ``stacklevel`` that points a warning raised by the *calling* function at the first frame outside
    irdro_sampler: the user's call, through however many of the package's functions it went (the sharded
    dataset's constructor adds one, the cache check another)."""
    level, frame = 2, sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        level, frame = level + 1, frame.f_back
    return level
