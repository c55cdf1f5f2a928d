"""Per-sample losses from model outputs, without another forward pass (torch only).

The one place where a batch's logits and labels become the one loss per sample that
``IRDROSampler.update`` takes; every trainer integration (Composer, Hugging Face, Lightning) uses it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "causal_lm_per_sample_loss",
    "classification_per_sample_loss",
    "target_counts",
    "token_loss_sums",
    "token_per_sample_loss",
]


def target_counts(labels: torch.Tensor, *, shift: bool, ignore_index: int = -100) -> torch.Tensor:
    """Target tokens per sequence of ``labels`` ``(B, T)``, int64 ``(B,)``: positions other than ``ignore_index``,
    from the second on with ``shift=True`` (causal LMs: position ``t`` predicts ``labels[:, t + 1]``)."""
    target = labels[:, 1:] if shift else labels
    return (target != ignore_index).sum(dim=1)


def token_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool,
    ignore_index: int = -100,
    max_chunk_bytes: int = 2**28,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of token cross-entropy and number of target tokens: ``(sums, counts)``, float32
    and int64, shape ``(B,)``.

    Contract: ``logits`` ``(B, T, V)`` (any float dtype), ``labels`` ``(B, T)`` with ``ignore_index`` where a
    position has no target. ``shift=True`` (causal LMs, as Hugging Face and llm-foundry shift them):
    position ``t`` predicts ``labels[:, t + 1]``; ``shift=False`` (masked LMs, token classification):
    labels are aligned with the logits. Logits are upcast to float32 a chunk of sequences at a time (at
    most ``max_chunk_bytes`` of float32 logits exist at once: B x T x V float32 never has to fit).
    Gradients flow through ``sums`` if ``logits`` requires grad, even when no position has a target.
    """
    if logits.ndim != 3 or labels.ndim != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"a token-level loss needs logits (B, T, V) and labels (B, T); got logits {tuple(logits.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    b, t, v = logits.shape
    target = labels.to(logits.device)
    counts = target_counts(target, shift=shift, ignore_index=ignore_index)
    if shift:
        logits, target = logits[:, :-1], target[:, 1:]
        t -= 1
    if b == 0 or t < 1:
        # Still attached to the graph: a loss built from it can be backpropagated (to zero gradients).
        return logits.new_zeros((b,), dtype=torch.float32) + 0.0 * logits.sum(), counts
    rows = max(1, int(max_chunk_bytes) // max(1, t * v * 4))
    parts = []
    for start in range(0, b, rows):
        chunk = logits[start : start + rows].float()
        tok = F.cross_entropy(
            chunk.reshape(-1, v), target[start : start + rows].reshape(-1), ignore_index=ignore_index,
            reduction="none",
        )
        parts.append(tok.view(chunk.shape[0], t).sum(dim=1))
    return torch.cat(parts), counts


def token_per_sample_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool,
    ignore_index: int = -100,
    max_chunk_bytes: int = 2**28,
) -> torch.Tensor:
    """Token-mean cross-entropy per sequence, float32, shape ``(B,)`` (see :func:`token_loss_sums`).

    A sequence without any target gets NaN (the sampler skips non-finite feedback; the modes that change
    the loss give it weight 0). The token-weighted mean ``sum(loss * counts) / sum(counts)`` equals the
    model's own batch loss.
    """
    sums, counts = token_loss_sums(logits, labels, shift=shift, ignore_index=ignore_index, max_chunk_bytes=max_chunk_bytes)
    mean = sums / counts.clamp(min=1).to(sums.dtype)
    # torch.where (not masking by multiplication) so the NaN never reaches a gradient.
    return torch.where(counts > 0, mean, torch.full_like(mean, math.nan))


def causal_lm_per_sample_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, max_chunk_bytes: int = 2**28
) -> torch.Tensor:
    """:func:`token_per_sample_loss` with ``shift=True``: the per-sequence form of a causal LM's loss."""
    return token_per_sample_loss(logits, labels, shift=True, ignore_index=ignore_index, max_chunk_bytes=max_chunk_bytes)


def classification_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample loss of a sequence classifier, float32 ``(B,)``, as Hugging Face chooses its loss:

    * integer labels ``(B,)`` and logits ``(B, C)``, ``C > 1``: cross-entropy;
    * float labels ``(B,)`` or ``(B, 1)`` and logits ``(B, 1)`` or ``(B,)``: squared error (regression);
    * float labels ``(B, C)`` and logits ``(B, C)``: binary cross-entropy, mean over the C labels.
    """
    labels = labels.to(logits.device)
    if logits.ndim == 2 and labels.ndim == 1 and not labels.is_floating_point() and logits.shape[1] > 1:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if labels.is_floating_point() and logits.numel() == labels.numel() == logits.shape[0]:
        return (logits.float().reshape(-1) - labels.float().reshape(-1)) ** 2
    if labels.is_floating_point() and logits.ndim == 2 and logits.shape == labels.shape:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(dim=1)
    raise ValueError(
        f"classification_per_sample_loss handles logits (B, C) with integer labels (B,), regression (B, 1) with "
        f"float labels, and multi-label (B, C) with float labels (B, C); got logits {tuple(logits.shape)} "
        f"and labels {tuple(labels.shape)} ({labels.dtype})"
    )
