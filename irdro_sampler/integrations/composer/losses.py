"""Per-sample losses from a model's outputs, and the losses IRDRO backpropagates in its loss modes.

Pure functions of tensors (no Composer object): the per-sample loss functions compute one loss per
sample of a microbatch from ``state.outputs`` and the microbatch, without another forward pass; the
loss functions of the ``importance`` and ``reweight`` modes turn those into the scalar that replaces
``state.loss``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from irdro_sampler import DROWeighting, kl_dro_weights
from irdro_sampler.integrations._class_targets import batch_targets, looks_like_class_indices
from irdro_sampler.losses import causal_lm_per_sample_loss, classification_per_sample_loss, token_loss_sums
from irdro_sampler.screened_loss import screened_loss

__all__ = [
    "PerSampleLossFn",
    "causal_lm_loss_sums",
    "causal_lm_per_sample_loss",
    "check_per_sample_losses",
    "classification_per_sample_loss",
    "default_per_sample_loss",
    "importance_weighted_loss",
    "resolve_loss_fn",
    "reweighted_loss",
]

#: ``(outputs, batch) -> 1-D tensor``: one loss per sample of the microbatch.
PerSampleLossFn = Callable[[Any, Any], torch.Tensor]


def causal_lm_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    max_chunk_bytes: int = 2**28,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of next-token cross-entropy and number of target tokens: the core's
    :func:`irdro_sampler.losses.token_loss_sums` with ``shift=True`` (labels shifted as HuggingFace causal LMs
    and llm-foundry do)."""
    return token_loss_sums(logits, labels, shift=True, ignore_index=ignore_index, max_chunk_bytes=max_chunk_bytes)


def _logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(
        f"the default per-sample loss cannot find logits in the model outputs ({type(outputs).__name__}); "
        "pass loss_fn=(outputs, batch) -> 1-D tensor of per-sample losses to IRDRO"
    )


def _targets_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping):
        if "labels" in batch:
            return batch["labels"]
        if "input_ids" in batch:  # causal LM without explicit labels: predict the inputs, skip padding
            labels = batch["input_ids"].clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"] == 0] = -100
            return labels
        raise KeyError(
            f"the default per-sample loss needs 'labels' (or 'input_ids') in the batch; it has {sorted(batch)}"
        )
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise TypeError(
        f"the default per-sample loss cannot find targets in a batch of type {type(batch).__name__}; "
        "pass loss_fn to IRDRO"
    )


def has_class_targets(batch: Any) -> bool:
    """Whether the batch's targets look like class indices: one integer per sample (``labels`` or ``batch[1]``)."""
    return looks_like_class_indices(batch_targets(batch))


def default_per_sample_loss(outputs: Any, batch: Any) -> torch.Tensor:
    """Per-sample loss from model outputs and the (micro)batch, without another forward pass.

    * Causal LMs (logits ``(B, T, V)``, labels ``(B, T)``; HuggingFace or llm-foundry outputs with
      ``logits``, batch with ``labels`` or else ``input_ids``/``attention_mask``):
      :func:`causal_lm_per_sample_loss` (shifted labels, ignore_index -100, chunked float32 upcast).
    * Classifiers (logits ``(B, C)``, integer targets ``(B,)`` from ``batch['labels']`` or
      ``batch[1]``): :func:`classification_per_sample_loss`.

    Anything else (token classification, regression, custom losses) needs an explicit ``loss_fn``.
    """
    logits = _logits_of(outputs)
    targets = _targets_of(batch)
    if logits.ndim == 3 and targets.ndim == 2:
        return causal_lm_per_sample_loss(logits, targets)
    if logits.ndim == 2 and targets.ndim == 1:
        return classification_per_sample_loss(logits, targets)
    raise ValueError(
        f"the default per-sample loss handles causal LMs (logits (B, T, V), labels (B, T)) and classifiers "
        f"(logits (B, C), targets (B,)); got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: "
        "pass loss_fn to IRDRO"
    )


_NAMED_LOSS_FNS: dict[str, PerSampleLossFn] = {
    "auto": default_per_sample_loss,
    "causal_lm": lambda outputs, batch: causal_lm_per_sample_loss(_logits_of(outputs), _targets_of(batch)),
    "classification": lambda outputs, batch: classification_per_sample_loss(_logits_of(outputs), _targets_of(batch)),
}


def is_builtin_loss_fn(loss_fn: PerSampleLossFn) -> bool:
    """Whether ``loss_fn`` is one of the per-sample losses above (their shares of the model's loss are known:
    token-loss sums for a causal LM's logits, the loss itself for a classifier's), not the user's."""
    return any(loss_fn is fn for fn in _NAMED_LOSS_FNS.values())


def screened_model_loss(loss: torch.Tensor, outputs: Any, batch: Any, per_sample: torch.Tensor, keep: np.ndarray,
                        loss_fn: PerSampleLossFn) -> torch.Tensor:
    """The model's ``loss`` less the screened samples' share of it (``keep`` False; see
    :mod:`irdro_sampler.screened_loss`): exact for a built-in ``loss_fn`` (a causal LM's token mean, a classifier's
    mean), proportional to ``loss_fn``'s losses otherwise, which must then keep autograd. ``loss`` itself when
    none is screened."""
    if keep.all():
        return loss
    if is_builtin_loss_fn(loss_fn):
        causal = _logits_of(outputs).ndim == 3
        return screened_loss(loss, outputs, batch, per_sample, keep, kind="causal" if causal else None,
                             logits_of=_logits_of, labels_of=_targets_of)

    def checked(outputs: Any, batch: Any) -> torch.Tensor:
        shares = loss_fn(outputs, batch)
        if not shares.requires_grad and torch.is_grad_enabled():
            raise ValueError("IRDRO(screen='block'): loss_fn returned losses without gradients; the screen removes "
                             "the screened samples' share through them, so it must compute them from state.outputs "
                             "with autograd (no .detach(), no torch.no_grad())")
        return shares

    return screened_loss(loss, outputs, batch, per_sample, keep, kind=None, logits_of=_logits_of, loss_fn=checked)


def resolve_loss_fn(loss_fn: PerSampleLossFn | str | None) -> PerSampleLossFn:
    """``loss_fn`` as a callable: None is :func:`default_per_sample_loss`, a callable is itself, a name
    is one of ``'auto'``, ``'causal_lm'``, ``'classification'``, and ``'package.module:function'``
    (for YAML configs) is imported. ``ValueError`` naming the value otherwise."""
    if loss_fn is None:
        return default_per_sample_loss
    if callable(loss_fn):
        return loss_fn
    if isinstance(loss_fn, str):
        if loss_fn in _NAMED_LOSS_FNS:
            return _NAMED_LOSS_FNS[loss_fn]
        if ":" in loss_fn:  # "package.module:function", for YAML configs
            module, _, name = loss_fn.partition(":")
            fn = getattr(importlib.import_module(module), name)
            if callable(fn):
                return fn
    raise ValueError(
        f"loss_fn must be a callable (outputs, batch) -> per-sample losses, one of {sorted(_NAMED_LOSS_FNS)}, "
        f"or 'package.module:function'; got {loss_fn!r}"
    )



def check_per_sample_losses(losses: Any, size: int | None) -> None:
    """``TypeError``/``ValueError`` unless ``losses`` is a 1-D floating tensor of ``size`` entries
    (any length when ``size`` is None): what a per-sample loss function must return."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"IRDRO: loss_fn must return a torch.Tensor, got {type(losses).__name__}")
    if losses.ndim != 1 or (size is not None and losses.shape[0] != size):
        expected = f"({size},)" if size is not None else "(batch size,)"
        raise ValueError(
            f"IRDRO: loss_fn must return one loss per sample, shape {expected}; got shape {tuple(losses.shape)}. "
            "Use reduction='none' and reduce over tokens per sequence"
        )
    if not losses.dtype.is_floating_point:
        raise TypeError(f"IRDRO: loss_fn must return floating point losses, got {losses.dtype}")


def importance_weighted_loss(losses: torch.Tensor, weights: np.ndarray) -> tuple[torch.Tensor, int]:
    """``sum_i w_i * l_i / n_finite`` over the finite losses, and the number of non-finite weights.

    ``weights`` are ``1 / (N p_i)`` (float64, one per loss). Non-finite losses count as 0 and are left
    out of the mean's denominator (they never reach a gradient). A non-finite weight can only come from
    a sample drawn under probabilities no longer known and cut since (``p = 0``): it is set to 0 rather
    than poisoning the step, and counted. Gradients flow through ``losses``.
    """
    finite = torch.isfinite(losses.detach())
    safe = torch.where(finite, losses, torch.zeros_like(losses))
    n_valid = int(finite.sum().item())
    w = torch.as_tensor(weights).to(device=safe.device, dtype=safe.dtype)
    nonfinite = 0
    if not bool(torch.isfinite(w).all()):
        nonfinite = int((~torch.isfinite(w)).sum())
        w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
    return (w * safe).sum() / max(n_valid, 1), nonfinite


def reweighted_loss(losses: torch.Tensor, rule: DROWeighting) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's in-batch objective ``sum_i softmax(l / tau)_i * l_i`` and its weights.

    The weights are the closed-form KL-DRO weights over this batch's finite losses (``tau`` from
    ``rule``: fixed, or calibrated on the batch), detached, 0 for non-finite losses; returned as a CPU
    float64 tensor. Gradients flow through ``losses`` only.
    """
    finite = torch.isfinite(losses.detach())
    safe = torch.where(finite, losses, torch.zeros_like(losses))
    weights = torch.zeros(losses.shape, dtype=torch.float64)
    ok = finite.cpu()
    if bool(ok.any()):
        kept = losses.detach().double().cpu()[ok].numpy()
        # The in-batch rule is the closed form itself, over this batch: the core computes it.
        weights[ok] = torch.from_numpy(kl_dro_weights(kept, rule.temperature_for(kept)))
    return (weights.to(device=safe.device, dtype=safe.dtype) * safe).sum(), weights
