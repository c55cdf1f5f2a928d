"""Every private name of the Hugging Face ``Trainer`` this project uses, behind one accessor each.

``IRDROTrainer.get_train_dataloader`` must build the train DataLoader the way the Trainer does before
handing it to accelerate: the per-device batch size the Trainer computed, and its removal of the
columns the model's ``forward`` does not take. transformers exposes these only as private members, so
they are read here and nowhere else; :func:`missing_internals` (run by ``tests/test_hf_compat.py`` in the
main environment and at both ends of the ``[hf]`` lane) fails as soon as an installed transformers
renames one or changes its call.
"""

from __future__ import annotations

import inspect
from typing import Any

#: Trainer members used, and the keyword each method must accept.
USED_METHODS = {"_remove_unused_columns": "description", "_get_collator_with_removed_columns": "description"}
USED_ATTRIBUTES = ("_train_batch_size",)


def train_batch_size(trainer: Any) -> int:
    """The per-device train batch size the Trainer uses (``per_device_train_batch_size``, or what
    ``auto_find_batch_size`` settled on)."""
    return int(trainer._train_batch_size)


def remove_unused_columns(trainer: Any, dataset: Any) -> Any:
    """A ``datasets.Dataset`` without the columns the model's ``forward`` does not take (as the Trainer does)."""
    return trainer._remove_unused_columns(dataset, description="training")


def collator_without_unused_columns(trainer: Any, collator: Any) -> Any:
    """The Trainer's collator wrapped to drop unused columns from non-``datasets`` samples."""
    return trainer._get_collator_with_removed_columns(collator, description="training")


def missing_internals(trainer_class: Any = None) -> list[str]:
    """What this module uses that the installed ``transformers.Trainer`` lacks (empty when all is there)."""
    if trainer_class is None:
        from transformers import Trainer as trainer_class
    missing = []
    for name, keyword in USED_METHODS.items():
        method = getattr(trainer_class, name, None)
        if method is None or keyword not in inspect.signature(method).parameters:
            missing.append(f"Trainer.{name}({keyword}=...)")
    # Attributes are set in the Trainer's own source (any transformers class of the MRO).
    source = "".join(inspect.getsource(c) for c in trainer_class.__mro__ if c.__module__.startswith("transformers"))
    missing += [f"Trainer.{a}" for a in USED_ATTRIBUTES if f"self.{a} =" not in source]
    return missing
