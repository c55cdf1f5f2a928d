"""``examples/composer_train.py`` loaded as a module: its data and model builders serve the Composer tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location("composer_train_example", ROOT / "examples" / "composer_train.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


ex = _load_example()
