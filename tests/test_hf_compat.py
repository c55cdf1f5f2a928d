"""Drift test of the Hugging Face Trainer internals behind _hf_compat (runs wherever transformers imports:
the main environment's 4.x and both ends of the [hf] lane)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from irdro_sampler.integrations import _hf_compat  # noqa: E402


def _trainer_class():
    try:
        from transformers import Trainer
    except Exception as exc:  # Trainer needs accelerate; skip where it does not import
        pytest.skip(f"transformers' Trainer does not import: {exc}")
    return Trainer


def test_the_installed_trainer_has_every_internal_the_compat_module_uses():
    assert _hf_compat.missing_internals(_trainer_class()) == []


def test_a_renamed_internal_is_caught():
    class Renamed(_trainer_class()):
        _remove_unused_columns = None  # as if transformers had dropped or renamed it

    assert _hf_compat.missing_internals(Renamed) == ["Trainer._remove_unused_columns(description=...)"]
