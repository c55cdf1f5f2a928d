"""Composer integration: the ``IRDRO`` algorithm (``irdro_sampler.integrations.composer:IRDRO``).

One concern per module:

* :mod:`.algorithm`: :class:`IRDRO`, a thin ``match``/``apply`` that wires Composer's events to a
  feedback target and to the pure functions below; :func:`batch_sample_indices` for callbacks.
* :mod:`.targets`: what is fed (:class:`FeedbackTarget`, :class:`SamplerTarget`,
  :class:`StreamingTarget`) and the registry of target finders (:func:`register_target`).
* :mod:`.losses`: per-sample losses from model outputs, and the losses of the ``importance`` and
  ``reweight`` modes.
* :mod:`.batches`: sample indices in batches, and one batch's feedback over its microbatches.
* :mod:`.collectives`: gathering feedback over ranks, and checking the ranks agree.

Importing :mod:`irdro_sampler` never imports Composer; only this package does.
"""

from .algorithm import IRDRO, batch_sample_indices
from .collectives import gather_feedback
from .losses import (
    PerSampleLossFn,
    causal_lm_loss_sums,
    causal_lm_per_sample_loss,
    classification_per_sample_loss,
    default_per_sample_loss,
)
from .sharded_target import ShardedBatchSampler
from .targets import (
    FeedbackOptions,
    FeedbackTarget,
    SamplerTarget,
    ShardedSamplerTarget,
    StreamingTarget,
    find_target,
    register_target,
    unregister_target,
)

__all__ = [
    "IRDRO",
    "FeedbackOptions",
    "FeedbackTarget",
    "PerSampleLossFn",
    "SamplerTarget",
    "ShardedBatchSampler",
    "ShardedSamplerTarget",
    "StreamingTarget",
    "batch_sample_indices",
    "causal_lm_loss_sums",
    "causal_lm_per_sample_loss",
    "classification_per_sample_loss",
    "default_per_sample_loss",
    "find_target",
    "gather_feedback",
    "register_target",
    "unregister_target",
]
