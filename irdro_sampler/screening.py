"""The first-visit screen: which samples of a trained batch the step should learn from.

The cut acts through the draws: a seen sample above its threshold keeps only the floor's share of them. A
sample the table has not seen cannot be steered that way: it is drawn at the prior's weight and trained on at
its first visit, wrong labels and random documents included. Where training makes one or two passes over the
data (continual training of a language model) most draws are first visits, so most of the noise is trained on
before the cut can see it (benchmarks/RESULTS_suite_scored.md).

Inside the step the loss of every drawn sample is known before the backward pass. The screen judges a first
visit there by the rule's parameters of the last refit, as the cut would judge that loss as the sample's first:
no gate can spare it (its loss has not fallen), so it is left out where its group's threshold (or split) lies
below it. Samples the table has seen are always kept: the draws already weigh them, and a cut sample drawn by
the floor is trained on as before (the floor is what lets a sample the model comes to fit be re-admitted).

``block_only`` narrows the screen to first visits inside a block of unlearnable samples: a tight, far high mode of
the refit's seen losses (random documents, corrupt records), the test ``cut_rule="zscore-mode"`` makes. Inside a
group with a learnable minority the model has not learned yet, the full screen keeps that minority from the very
step after which its loss would fall (``benchmarks/screen_subgroup.py``); a block's loss does not fall, so this
narrower screen cannot starve such a minority, and without a block it leaves out nothing.

A pure function of the parameters and the table, read-only: it changes neither the sample order nor the state.
"""

from __future__ import annotations

import numpy as np

from .loss_table import LossTable
from .weights import WeightParams, kept_mask


def screen_first_visits(
    losses: np.ndarray, seen: np.ndarray, params: WeightParams | None, groups: np.ndarray | None = None,
    *, block_only: bool = False,
) -> np.ndarray:
    """``True`` where a sample of a batch is trained on; ``False`` for a first visit the cut would take.

    ``losses`` (float) are the step's per-sample losses, ``seen`` whether the table holds a loss of each sample,
    ``params`` the rule's parameters of the last refit (``None`` before the first: nothing is screened) and
    ``groups`` the samples' group ids (required when ``params`` cut per group). A non-finite loss is not judged
    (kept). The loss is compared as the table would store it (float32), so the screen says ``False`` exactly
    where the sample would be cut once its loss is applied, were the parameters still the same. With
    ``block_only`` a first visit is left out only where its loss lies above ``params.block_valley`` (inside a
    block of unlearnable samples; groups play no part).
    """
    keep = np.ones(losses.shape[0], dtype=bool)
    judge = ~seen & np.isfinite(losses)
    if params is None or not judge.any():
        return keep
    stored = losses[judge].astype(np.float32)
    if block_only:
        keep[judge] = ~(stored > params.block_valley)
        return keep
    part_groups = None if groups is None else groups[judge]
    keep[judge] = kept_mask(stored, params, part_groups, stored if params.reads_first else None)
    return keep


def screen_table_rows(
    table: LossTable, rows: np.ndarray, losses: np.ndarray, params: WeightParams | None, block_only: bool = False
) -> np.ndarray:
    """:func:`screen_first_visits` of the samples at ``rows`` of ``table`` (seen where it holds a loss, judged in
    their groups) with their step's ``losses``: what every sampler's ``screen`` asks of the rows it holds."""
    seen = ~np.isnan(table.losses[rows])
    groups = None if table.groups is None else table.groups[rows]
    return screen_first_visits(losses, seen, params, groups, block_only=block_only)


def check_block_only(block_only: object) -> bool:
    """``block_only`` of a ``screen`` call, checked: a bool."""
    if not isinstance(block_only, bool):
        raise TypeError(f"block_only must be True or False, got {block_only!r}")
    return block_only
