"""The demo's tiny byte-level causal LM, built from a config (nothing downloaded), and its evaluation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

VOCAB = 256  # bytes; every document has exactly seq_len bytes, so no padding token is needed


@dataclass
class ModelConfig:
    """Size of the tiny GPT-2. The defaults train at a few ms per batch of 32 x 128 bytes on one CPU core."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    seq_len: int = 128


def build_hf_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A ``GPT2LMHeadModel`` with a byte vocabulary, initialised from ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    conf = GPT2Config(
        vocab_size=VOCAB,
        n_positions=cfg.seq_len,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(conf)
    return model


def build_composer_model(cfg: ModelConfig, seed: int = 0):
    """The tiny GPT-2 wrapped in ``composer.models.HuggingFaceModel`` (loss = the model's own token-mean CE)."""
    from composer.models import HuggingFaceModel

    from irdro_sampler.integrations._composer_compat import assume_causal_lm

    hf = build_hf_model(cfg, seed)
    # HuggingFaceModel.__init__ asks Composer whether the model is a registered causal LM only to default
    # `shift_labels`, which we pass explicitly; that check imports every model class transformers has
    # (~5-20 s of CPU per model), more than the whole tiny training run. Skip it for this construction.
    with assume_causal_lm():
        return HuggingFaceModel(hf, use_logits=True, shift_labels=True)


def collate_bytes(samples: Sequence[Mapping], seq_len: int) -> dict[str, torch.Tensor]:
    """Collate MDS samples (``tokens`` bytes or ``text`` str, optional ``domain``, ``sample_idx``)
    into ``input_ids``/``labels`` of shape (B, seq_len); short documents are zero-padded with
    label -100 so that padding never counts in the loss."""
    b = len(samples)
    ids = torch.zeros((b, seq_len), dtype=torch.long)
    labels = torch.full((b, seq_len), -100, dtype=torch.long)
    for r, s in enumerate(samples):
        t = s["tokens"] if "tokens" in s else s["text"].encode("utf-8")
        arr = np.frombuffer(t, dtype=np.uint8)[:seq_len] if isinstance(t, bytes | bytearray) else np.asarray(
            t, dtype=np.uint8
        )[:seq_len]
        row = torch.from_numpy(arr.astype(np.int64))
        ids[r, : len(row)] = row
        labels[r, : len(row)] = row
    out = {"input_ids": ids, "labels": labels}
    if all("sample_idx" in s for s in samples):
        out["sample_idx"] = torch.as_tensor([int(s["sample_idx"]) for s in samples], dtype=torch.long)
    if all("domain" in s for s in samples):
        out["domain"] = torch.as_tensor([int(s["domain"]) for s in samples], dtype=torch.long)
    return out


def tokens_tensor(tokens: Sequence[np.ndarray], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) for a list of byte arrays (cut or padded to ``seq_len``, padding label -100)."""
    batch = collate_bytes([{"tokens": bytes(np.asarray(t, np.uint8))} for t in tokens], seq_len)
    return batch["input_ids"], batch["labels"]


@torch.no_grad()
def per_sequence_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy (nats) of each sequence under ``model`` (an HF causal LM), labels shifted."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    tgt = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="none"
    ).view(tgt.shape)
    mask = (tgt != -100).float()
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def unwrap_hf(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a Composer ``HuggingFaceModel`` (or the model itself)."""
    return getattr(model, "model", model)


@torch.no_grad()
def evaluate_domains(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    domains: np.ndarray,
    domain_names: Sequence[str],
    batch_size: int = 256,
) -> dict[str, float]:
    """Mean held-out loss per domain (nats per byte), keyed by domain name."""
    hf = unwrap_hf(model)
    was_training = hf.training
    hf.eval()
    losses = []
    for i in range(0, len(input_ids), batch_size):
        losses.append(per_sequence_loss(hf, input_ids[i : i + batch_size], labels[i : i + batch_size]))
    if was_training:
        hf.train()
    per = torch.cat(losses).numpy().astype(np.float64)
    out = {}
    for d, name in enumerate(domain_names):
        m = domains == d
        if m.any():
            out[name] = float(per[m].mean())
    return out


def summarize(per_domain: Mapping[str, float], shares: Mapping[str, float], rare: Sequence[str]) -> dict[str, float]:
    """The demo's headline metrics from per-domain held-out losses.

    ``mean``: training-weighted mean (each clean domain weighted by its share of the clean training data:
    the loss uniform ERM optimizes, the check that nothing was paid for a gain); ``macro``: plain mean over
    domains; ``worst``: the largest domain loss; ``rare``: mean over the rare domains.
    """
    names = [d for d in shares if d in per_domain]
    tot = sum(shares[d] for d in names)
    res = {
        "mean": sum(shares[d] * per_domain[d] for d in names) / tot,
        "macro": float(np.mean([per_domain[d] for d in names])),
        "worst": max(per_domain[d] for d in names),
    }
    r = [per_domain[d] for d in rare if d in per_domain]
    res["rare"] = float(np.mean(r)) if r else float("nan")
    return res
