"""Every private name of Composer that irdro_sampler relies on, in one place.

One used: ``composer.models.huggingface._is_registered_causal_lm``. ``HuggingFaceModel.__init__``
calls it on every construction (Composer 0.32.1, even when ``shift_labels`` is given) to default
``shift_labels``; it lists ``MODEL_FOR_CAUSAL_LM_MAPPING.values()``, which imports every model class
transformers has (seconds of CPU per construction). :func:`assume_causal_lm` replaces it for one
construction of a model that is a causal LM and whose ``shift_labels`` the caller passes.

Three more are only read, not used: the checkpoint saving that the sharded sampler's sidecar files
(:mod:`irdro_sampler.integrations.composer.sharded_target`) rely on, pinned so that a Composer that
changes when or where it saves fails the drift test.

Like :mod:`irdro_sampler.integrations._streaming_compat`, :data:`CHECKED_SOURCES` pins the source of
what this module depends on, identical in every version of :data:`TESTED_VERSIONS`;
``tests/test_composer_compat.py`` fails when the installed Composer differs, and
``tests/test_private_names.py`` fails when another module uses a private name of a Composer object.
Importing this module imports ``composer``; ``composer.models.huggingface`` (and so transformers) only
when a function here needs it.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import composer

from irdro_sampler.integrations import _source_pins

__all__ = ["CHECKED_SOURCES", "TESTED_VERSIONS", "assume_causal_lm", "changed_internals", "source_hashes"]

#: Composer releases whose internals were read and tested.
TESTED_VERSIONS = ("0.32.1",)

_HF_MODULE = "composer.models.huggingface"

#: First 16 hex digits of sha256(inspect.getsource(obj)) in every tested version.
CHECKED_SOURCES = {
    "HuggingFaceModel.__init__": "444e512831849b61",
    "_is_registered_causal_lm": "643c8e19bff62404",
    "CheckpointSaver._save_checkpoint": "2f1b5899b0e325bd",
    "CheckpointSaver._rotate_checkpoints": "fc52677b6d4f1e41",
    "checkpoint._save_checkpoint": "d1acbd0a8dc88793",
}


def _checked_objects() -> dict[str, Any]:
    hf = importlib.import_module(_HF_MODULE)
    saver = importlib.import_module("composer.callbacks.checkpoint_saver").CheckpointSaver
    checkpoint = importlib.import_module("composer.utils.checkpoint")
    return {
        # Calls _is_registered_causal_lm only to default shift_labels and to warn on shift_labels=False.
        "HuggingFaceModel.__init__": hf.HuggingFaceModel.__init__,
        "_is_registered_causal_lm": hf._is_registered_causal_lm,
        # The sharded sampler's sidecar files (integrations/composer/sharded_target.py) rely on behaviour,
        # not names: the saver records the new file's name in all_saved_checkpoints_to_timestamp before
        # save_checkpoint; _save_checkpoint calls state.state_dict() on every rank and writes rank 0's file
        # only (no FSDP sharding); the rotation removes the checkpoint file only.
        "CheckpointSaver._save_checkpoint": saver._save_checkpoint,
        "CheckpointSaver._rotate_checkpoints": saver._rotate_checkpoints,
        "checkpoint._save_checkpoint": checkpoint._save_checkpoint,
    }


def source_hashes() -> dict[str, str]:
    """The installed Composer's hashes, keyed like :data:`CHECKED_SOURCES`."""
    return _source_pins.source_hashes(_checked_objects())


def changed_internals() -> list[str]:
    """Names in :data:`CHECKED_SOURCES` whose installed source differs from the checked one."""
    return _source_pins.changed(CHECKED_SOURCES, _checked_objects())


@contextmanager
def assume_causal_lm() -> Iterator[None]:
    """Within the block, ``HuggingFaceModel(...)`` takes its model for a registered causal LM without
    asking transformers (which would import every model class it has).

    Use only to construct a model that *is* a causal LM, passing ``shift_labels`` explicitly: the check
    decides nothing else. Not thread-safe (it swaps a module attribute of Composer's for the block);
    the original is restored on exit, also on error.
    """
    hf = importlib.import_module(_HF_MODULE)
    original = hf._is_registered_causal_lm
    hf._is_registered_causal_lm = lambda model: True
    try:
        yield
    finally:
        hf._is_registered_causal_lm = original


if composer.__version__ not in TESTED_VERSIONS:  # pragma: no cover - depends on the environment
    warnings.warn(
        f"irdro_sampler's demo relies on a private function of Composer, tested with "
        f"{', '.join(TESTED_VERSIONS)}; found {composer.__version__}. See irdro_sampler/integrations/"
        "_composer_compat.py.",
        stacklevel=2,
    )
