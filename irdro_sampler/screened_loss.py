"""A trainer's own loss less the screened samples' share of it: the first-visit screen inside a framework's step
(the Hugging Face Trainer's ``irdro_screen``, Composer's ``IRDRO(screen="block")``).

:meth:`IRDROSampler.screen <irdro_sampler.IRDROSampler.screen>` says which samples of a micro-batch to learn
from: ``False`` for a first visit (a sample the table holds no loss of yet) whose loss the last refit's cut
would take. The step then trains on the trainer's own loss *less the screened samples' share of it*:

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

Pure functions of tensors; :class:`~irdro_sampler.integrations.hf.IRDROTrainerMixin` and Composer's
:class:`~irdro_sampler.integrations.composer.IRDRO` wire them in (each says where its targets are: ``labels_of``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from irdro_sampler.losses import classification_per_sample_loss, target_counts, token_loss_sums

__all__ = ["screened_loss"]

PerSampleLoss = Callable[[Any, Mapping[str, Any]], torch.Tensor]


def screened_loss(
    loss: torch.Tensor,
    outputs: Any,
    inputs: Any,
    per_sample: torch.Tensor,
    keep: np.ndarray,
    *,
    kind: str | None,
    logits_of: Callable[[Any], torch.Tensor],
    loss_fn: PerSampleLoss | None = None,
    labels_of: Callable[[Any], torch.Tensor] = lambda inputs: inputs["labels"],
) -> torch.Tensor:
    """``loss - loss / S * sum_{i screened} s_i`` for the micro-batch's samples with ``keep`` False (see the module
    docstring); ``loss`` itself when none is screened or ``S`` is not a positive finite number.

    ``per_sample`` are the step's per-sample losses (detached; token means for token-level logits), ``kind`` the
    per-sample loss's kind (``'causal'`` shifts the labels), ``loss_fn`` a custom per-sample loss, whose
    losses must keep autograd (the model's loss is then taken to be their batch mean), and ``labels_of`` where the
    targets are in ``inputs`` (Hugging Face: ``inputs["labels"]``).
    """
    rows = np.flatnonzero(~keep)
    if rows.size == 0:
        return loss
    token_level = loss_fn is None and logits_of(outputs).ndim == 3
    total = _share_total(per_sample, inputs, token_level=token_level, shift=kind == "causal", labels_of=labels_of)
    if not (total > 0.0 and math.isfinite(total)):
        return loss
    screened = _shares(outputs, inputs, torch.from_numpy(rows), token_level=token_level, kind=kind,
                       logits_of=logits_of, loss_fn=loss_fn, labels_of=labels_of)
    return loss - loss.detach() / total * screened.to(loss.dtype).sum().to(loss.device)


def _shares(outputs: Any, inputs: Any, rows: torch.Tensor, *, token_level: bool, kind: str | None,
            logits_of: Callable[[Any], torch.Tensor], loss_fn: PerSampleLoss | None,
            labels_of: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """The shares ``s_i`` of the samples ``rows``, attached to the graph: token-loss sums (token level), the
    per-sample loss (logits ``(B, C)``) or ``loss_fn``'s losses."""
    if loss_fn is not None:
        shares = loss_fn(outputs, inputs)
        return shares[rows.to(shares.device)]
    logits = logits_of(outputs)
    labels = labels_of(inputs).to(logits.device)
    rows = rows.to(logits.device)
    if token_level:
        return token_loss_sums(logits[rows], labels[rows], shift=kind == "causal")[0]
    return classification_per_sample_loss(logits[rows], labels[rows])


def _share_total(per_sample: torch.Tensor, inputs: Any, *, token_level: bool, shift: bool,
                 labels_of: Callable[[Any], torch.Tensor]) -> float:
    """``S``, every sample's share summed, from the detached per-sample losses (token means weighted by their
    target counts at token level: no second pass over the logits); NaN losses (no target) count 0."""
    losses = per_sample.detach().double().cpu()
    if token_level:
        losses = losses * target_counts(labels_of(inputs).cpu(), shift=shift).double()
    return float(torch.nan_to_num(losses, nan=0.0).sum())
