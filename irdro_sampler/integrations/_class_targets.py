"""Class-index targets and groups: what the trainer integrations say or do when a classifier trains without them.

The cut judges a sample against the others of its group. Without groups every sample is judged against all
others, and a rare class whose losses are all high looks like noise. The task suite measured it (issue 18):
on its 29 labelled configurations the defaults were worse than uniform sampling on 5 without groups and on
2 with the labels as groups, for about the same share of the clean-data oracle's gain (0.19 and 0.15;
benchmarks/RESULTS_suite_defaults.md, 5 seeds). So the integrations pass the labels where the data set
declares them (a ``datasets.ClassLabel`` column: :func:`class_label_groups`) and otherwise say once, in the
log, how to pass them (:func:`no_groups_note`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

#: The columns a Hugging Face classification data set keeps its labels in.
LABEL_COLUMNS = ("label", "labels")
#: Group ids the loss table holds (uint16).
_MAX_GROUPS = 2**16


def looks_like_class_indices(targets: Any) -> bool:
    """Whether ``targets`` are one integer per sample: a 1-D integer tensor or array."""
    if isinstance(targets, torch.Tensor):
        return targets.ndim == 1 and not targets.dtype.is_floating_point and targets.dtype != torch.bool
    if isinstance(targets, np.ndarray):
        return targets.ndim == 1 and np.issubdtype(targets.dtype, np.integer)
    return False


def batch_targets(batch: Any) -> Any:
    """The targets of a batch as trainers pass them: ``batch['labels']`` or ``batch[1]``; None otherwise."""
    if isinstance(batch, Mapping):
        return batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    return None


def no_groups_note(how_to_pass: str) -> str:
    """The log note for class-index targets without groups: the measured consequence and ``how_to_pass``."""
    return (
        "IRDRO: the targets look like class indices and no groups were given, so the cut judges every "
        "sample against all others: a rare class whose losses are all high looks like noise. Measured "
        "(benchmarks/RESULTS_quality.md): on digits with three rare classes their accuracy fell to "
        "0.006-0.130 without groups against 0.420-0.691 under uniform sampling, and rose to 0.664-0.794 "
        "with them (0-20% flipped labels); on the task suite's labelled configurations with 10-30% noise "
        "they kept a median 0.29 of a clean-data oracle's gain against 0.10 (benchmarks/RESULTS_suite.md). "
        f"Pass the labels: {how_to_pass}"
    )


def _column_as_array(dataset: Any, column: str) -> np.ndarray:
    """One column as a numpy array, read in bulk: ``datasets`` 4+ returns a lazy ``Column`` for
    ``dataset[column]`` whose conversion goes row by row (10 s per million rows, measured)."""
    if hasattr(dataset, "select_columns") and hasattr(dataset, "with_format"):
        return np.asarray(dataset.select_columns([column]).with_format("numpy")[:][column])
    return np.asarray(dataset[column])


def class_label_groups(dataset: Any) -> tuple[str, np.ndarray] | None:
    """``(column, one group id per sample)`` from a Hugging Face ``datasets.Dataset`` whose ``label`` or
    ``labels`` column is a ``ClassLabel`` (the data set declares it holds class indices); None for any other
    data set, or when a label is missing (-1, as unlabelled splits have) or beyond 65535."""
    features = getattr(dataset, "features", None)
    if not isinstance(features, Mapping):
        return None
    for column in LABEL_COLUMNS:
        feature = features.get(column)
        if type(feature).__name__ != "ClassLabel":
            continue
        ids = _column_as_array(dataset, column)
        if ids.ndim != 1 or ids.size != len(dataset) or not np.issubdtype(ids.dtype, np.integer):
            return None
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= _MAX_GROUPS):
            return None
        return column, ids.astype(np.int64)
    return None
