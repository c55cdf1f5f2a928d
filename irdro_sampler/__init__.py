"""irdro-sampler: spend training steps on the samples that teach the model something.

The training loop reports per-sample losses; the library keeps a running loss for every sample and
draws the next samples with probability proportional to closed-form KL-DRO (IR-DRO) weights.
The core imports only numpy and torch; framework integrations live in ``irdro_sampler.integrations``.
"""

from .batch_sampler import IRDROBatchSampler
from .carried_rounding import balanced_counts, initial_carry
from .cut_rules import cut_threshold
from .diagnostics import weighting_diagnostics
from .draws import DrawScheme, register_draw_scheme
from .indexed import IndexedDataset, IndexListCollate
from .loss_table import LossTable
from .priming import initial_loss_chunks, initial_loss_feedback
from .round_feedback import RoundFeedback
from .sampler import DRAW_SCHEMES, IRDROSampler
from .saving import save_state
from .sharded_sampler import ShardedIRDROSampler
from .sum_tree import FanoutSumTree
from .weights import (
    DROWeighting,
    WeightParams,
    distribution_stats,
    effective_sample_size,
    kl_dro_weights,
    kl_to_uniform,
    midrank_weights,
    temperature_for_ess,
    temperature_for_kl,
)

__version__ = "0.1.0"

__all__ = [
    "DRAW_SCHEMES",
    "DrawScheme",
    "IRDROBatchSampler",
    "register_draw_scheme",
    "weighting_diagnostics",
    "DROWeighting",
    "FanoutSumTree",
    "IRDROSampler",
    "IndexListCollate",
    "IndexedDataset",
    "LossTable",
    "RoundFeedback",
    "ShardedIRDROSampler",
    "WeightParams",
    "balanced_counts",
    "cut_threshold",
    "distribution_stats",
    "effective_sample_size",
    "initial_loss_chunks",
    "initial_loss_feedback",
    "initial_carry",
    "kl_dro_weights",
    "kl_to_uniform",
    "midrank_weights",
    "save_state",
    "temperature_for_ess",
    "temperature_for_kl",
]
