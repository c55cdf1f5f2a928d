"""The first-visit screen in the Hugging Face Trainer's step (``IRDROTrainer(..., irdro_screen=True)``).

:meth:`IRDROSampler.screen <irdro_sampler.IRDROSampler.screen>` says which samples of a micro-batch to learn
from: ``False`` for a first visit (a sample the table holds no loss of yet) whose loss the last refit's cut
would take. The step then trains on the Trainer's own loss *less the screened samples' share of it*:

    loss' = loss - loss / S * sum_{i screened} s_i,      S = sum_i s_i (detached),

where ``s_i`` is sample ``i``'s share of the loss up to one factor common to the batch: its sum of token
losses for token-level models (the Trainer's cross-entropy is ``sum_tokens / n`` with ``n`` the batch's
target tokens or ``num_items_in_batch``), its loss for one loss per sample (a sequence classifier's mean).
Wherever the Trainer's loss is that common factor times ``S`` (Hugging Face's own losses without label
smoothing), ``loss'`` is exactly the loss with the screened samples' terms removed and the divisor kept: the
kept samples' gradients are those of the unscreened step, the screened ones' are zero. Because ``loss'`` is
scaled from ``loss`` itself, whatever normalisation the Trainer applied (token mean, ``num_items_in_batch``
across gradient accumulation, the world-size factor of ``average_tokens_across_devices``) is kept, in every
supported transformers version, and the logged training loss is that of the samples learned from.

Pure functions of tensors; :class:`~irdro_sampler.integrations.hf.IRDROTrainerMixin` wires them in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from irdro_sampler.losses import classification_per_sample_loss, token_loss_sums

__all__ = ["batch_share_total", "loss_shares", "target_counts", "without_screened"]


def target_counts(labels: torch.Tensor, *, shift: bool, ignore_index: int = -100) -> torch.Tensor:
    """Target tokens per sequence of ``labels`` ``(B, T)`` (shifted for causal LMs), int64 ``(B,)``."""
    target = labels[:, 1:] if shift else labels
    return (target != ignore_index).sum(dim=1)


def loss_shares(
    outputs: Any,
    inputs: Mapping[str, Any],
    rows: torch.Tensor,
    *,
    kind: str | None,
    logits_of: Callable[[Any], torch.Tensor],
    loss_fn: Callable[[Any, Mapping[str, Any]], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The shares ``s_i`` of the micro-batch's samples ``rows`` in its loss, attached to the graph.

    Token-level logits ``(B, T, V)``: the sum of the sample's token cross-entropies (``kind='causal'`` shifts
    the labels); logits ``(B, C)``: the per-sample loss; a custom ``loss_fn``: its losses, which must keep
    autograd (the model's loss is then taken to be their batch mean).
    """
    if loss_fn is not None:
        return loss_fn(outputs, inputs)[rows.to(torch.long)]
    logits = logits_of(outputs)
    labels = inputs["labels"].to(logits.device)
    rows = rows.to(logits.device)
    if logits.ndim == 3:
        sums, _ = token_loss_sums(logits[rows], labels[rows], shift=kind == "causal")
        return sums
    return classification_per_sample_loss(logits[rows], labels[rows])


def batch_share_total(per_sample: torch.Tensor, inputs: Mapping[str, Any], *, token_level: bool, shift: bool) -> float:
    """``S``, the sum of every sample's share, from the detached per-sample losses (token means weighted by
    their target counts for token-level losses); NaN losses (no target) count 0."""
    losses = per_sample.detach().double().cpu()
    if token_level:
        losses = losses * target_counts(inputs["labels"].cpu(), shift=shift).double()
    return float(torch.nan_to_num(losses, nan=0.0).sum())


def without_screened(loss: torch.Tensor, total: float, screened: torch.Tensor) -> torch.Tensor:
    """``loss - loss / total * screened.sum()``: the loss less the screened samples' shares (see the module
    docstring). ``loss`` unchanged when ``total`` is not a positive finite number (nothing to scale by)."""
    if not (total > 0.0 and torch.isfinite(torch.tensor(total))):
        return loss
    factor = loss.detach() / total
    return loss - factor * screened.to(loss.dtype).sum().to(loss.device)
