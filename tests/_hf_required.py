"""Imported first by the Hugging Face Trainer tests: the importing test module is skipped where the Trainer cannot
run (no accelerate, no transformers, or a transformers whose Trainer does not import)."""

from __future__ import annotations

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("transformers")
try:
    from transformers import Trainer  # noqa: F401
except ImportError as exc:  # pragma: no cover
    pytest.skip(f"transformers' Trainer does not import: {exc}", allow_module_level=True)
