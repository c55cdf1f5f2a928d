"""The one place where the diagnostics of a weighting are computed.

The sampler's :meth:`~irdro_sampler.IRDROSampler.stats`, the ``inspect`` command and the integrations'
``irdro/*`` metrics all report these keys, computed here, so the same name always means the same
number.
"""

from __future__ import annotations

import numpy as np

from .loss_table import LossTable
from .weights import WeightParams, distribution_stats, kept_mask


def weighting_diagnostics(
    probabilities: np.ndarray, table: LossTable, params: WeightParams, *, kept_count: int | None = None
) -> dict[str, float]:
    """Diagnostics of ``probabilities`` drawn from ``table`` under the fitted ``params``.

    Keys: ``ess_fraction``, ``kl_to_uniform``, ``entropy``, ``max_prob``, ``max_prob_ratio`` (of the
    distribution), ``seen_fraction``, ``truncated_fraction`` (samples with no tilted mass),
    ``temperature``, ``threshold``, ``prior`` (the fit) and ``table_mean_loss``. ``kept_count`` (the
    number of samples keeping tilted mass) is counted from the table when not given (O(N)).
    """
    n = table.dataset_size
    if kept_count is None:
        kept_count = int(np.count_nonzero(kept_mask(table.losses, params, table.groups, table.first_losses)))
    return {
        **distribution_stats(probabilities),
        "seen_fraction": table.num_seen / n,
        "truncated_fraction": 1.0 - kept_count / n,
        "temperature": params.temperature,
        "threshold": params.threshold,
        "prior": params.prior,
        "table_mean_loss": table.mean_loss(),
    }


def metric_names(stats: dict[str, float], prefix: str = "irdro/") -> dict[str, float]:
    """``stats`` as logger metrics: numeric values only, keys under ``prefix``."""
    return {
        f"{prefix}{k}": float(v)
        for k, v in stats.items()
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    }
