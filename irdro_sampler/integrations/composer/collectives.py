"""The collectives IRDRO runs: gathering every rank's feedback, and checking the ranks agree.

Both must be called by every rank (they are collectives over Composer's process group); in a
single process they do no communication.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from composer.utils import dist

__all__ = ["check_ranks_agree", "gather_feedback"]


def gather_feedback(indices: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather variable-length ``(indices, losses)`` from every rank, concatenated in rank order.

    Contract: must be called by every rank (a collective). ``indices`` int, ``losses`` float, both 1-D of
    the same length, on the rank's training device (NCCL needs CUDA tensors). Counts may differ between
    ranks: each rank pads to the largest count. Losses travel bit-exactly as float32 (reinterpreted as
    int32 inside one int64 tensor, so one collective carries both). Returns CPU ``(int64, float32)``
    tensors, identical on every rank.
    """
    indices = indices.reshape(-1).to(torch.int64)
    losses = losses.reshape(-1).to(torch.float32)
    if dist.get_world_size() == 1:
        return indices.cpu(), losses.cpu()
    device = indices.device
    count = torch.tensor([indices.numel()], dtype=torch.int64, device=device)
    counts = [int(c.item()) for c in dist.all_gather(count)]
    longest = max(counts)
    if longest == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32)
    packed = torch.zeros((longest, 2), dtype=torch.int64, device=device)
    packed[: indices.numel(), 0] = indices
    packed[: indices.numel(), 1] = losses.to(device).view(torch.int32).to(torch.int64)
    parts = [p[:c].cpu() for p, c in zip(dist.all_gather(packed), counts, strict=True)]
    both = torch.cat(parts)
    return both[:, 0].contiguous(), both[:, 1].to(torch.int32).view(torch.float32).contiguous()



def check_ranks_agree(fingerprint: Callable[[], int], device: torch.device, *, what: str, when: str) -> None:
    """One all-gather of every rank's ``fingerprint()``; ``RuntimeError`` naming the ranks when they differ.

    ``fingerprint`` is only called with more than one rank (on the streaming path it costs O(N)). ``what`` names the state compared (for the message), ``when`` the point of the run. Every rank sees
    the same gathered values, so every rank raises together (no rank is left waiting in a later
    collective).
    """
    if dist.get_world_size() == 1:
        return
    gathered = dist.all_gather(torch.tensor([fingerprint()], dtype=torch.int64, device=device))
    values = [int(t.item()) for t in gathered]
    if len(set(values)) == 1:
        return
    groups: dict[int, list[int]] = {}
    for rank, v in enumerate(values):
        groups.setdefault(v, []).append(rank)
    listing = "; ".join(f"ranks {ranks} have {v:#018x}" for v, ranks in groups.items())
    raise RuntimeError(
        f"IRDRO: the ranks' {what} states diverged (checked at {when}): fingerprints differ: {listing}. "
        "Every rank must build the sampler with the same seed and options and apply the same feedback "
        "(IRDRO gathers it; do not call update() on one rank only), and resume from the same checkpoint"
    )
