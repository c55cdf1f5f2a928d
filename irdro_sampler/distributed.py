"""torch.distributed helpers shared by the trainer integrations (Composer, Hugging Face, Lightning).

The sampler never communicates: every rank must apply the same ``update`` calls in the same order. The
integrations gather each step's feedback from all ranks with :func:`gather_feedback` and compare the
samplers' fingerprints now and then with :func:`check_ranks_agree`. Both work without an initialised
process group (one process: no communication) and with any backend (NCCL needs CUDA tensors: pass
``device``). The Composer algorithm uses them too (its process group is torch.distributed's default).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["check_ranks_agree", "gather_feedback", "process_group_up", "world_size"]


def process_group_up() -> bool:
    """Whether a torch.distributed process group is initialised; without one, a single process is the
    whole world (no collective runs). The one place this is asked."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of ranks of the default process group (1 when none is initialised)."""
    return dist.get_world_size() if process_group_up() else 1


def gather_feedback(
    indices: torch.Tensor, losses: torch.Tensor, *, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather variable-length ``(indices, losses)`` from every rank, concatenated in rank order.

    Contract: a collective; every rank of the default group must call it. ``indices`` (integers) and
    ``losses`` (floats) are 1-D of equal length; counts may differ between ranks (each rank pads to the
    largest). Losses travel bit-exactly as float32 (reinterpreted as int32 inside one int64 tensor, so
    one collective carries both, after one for the counts). ``device``: where the collectives run
    (default: the tensors' device; NCCL needs a CUDA device). Returns CPU ``(int64, float32)`` tensors,
    identical on every rank.
    """
    indices = torch.as_tensor(indices).reshape(-1).to(torch.int64)
    losses = torch.as_tensor(losses).reshape(-1).to(torch.float32)
    if indices.numel() != losses.numel():
        raise ValueError(f"indices and losses must have the same length, got {indices.numel()} and {losses.numel()}")
    if world_size() == 1:
        return indices.cpu(), losses.cpu()
    device = torch.device(device) if device is not None else indices.device
    n = world_size()
    count = torch.tensor([indices.numel()], dtype=torch.int64, device=device)
    counts_t = [torch.zeros_like(count) for _ in range(n)]
    dist.all_gather(counts_t, count)
    counts = [int(c.item()) for c in counts_t]
    longest = max(counts)
    if longest == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32)
    packed = torch.zeros((longest, 2), dtype=torch.int64, device=device)
    packed[: indices.numel(), 0] = indices.to(device)
    packed[: indices.numel(), 1] = losses.to(device).view(torch.int32).to(torch.int64)
    parts_t = [torch.zeros_like(packed) for _ in range(n)]
    dist.all_gather(parts_t, packed)
    both = torch.cat([p[:c].cpu() for p, c in zip(parts_t, counts, strict=True)])
    return both[:, 0].contiguous(), both[:, 1].to(torch.int32).view(torch.float32).contiguous()


def check_ranks_agree(value: int, what: str, *, device: torch.device | str | None = None,
                      prefix: str | None = None) -> None:
    """Raise ``RuntimeError`` on every rank unless all ranks pass the same signed 64-bit ``value``.

    A collective (one all-gather of one int64). Every rank sees the same gathered values, so every rank
    raises together and none is left waiting in a later collective. ``what`` names the value in the
    message (e.g. ``"IRDROSampler fingerprint at step 12"``); ``prefix`` replaces the message's opening
    ("the ranks disagree on the {what}").
    """
    if world_size() == 1:
        return
    mine = torch.tensor([int(value)], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(gathered, mine)
    values = [int(t.item()) for t in gathered]
    if len(set(values)) == 1:
        return
    groups: dict[int, list[int]] = {}
    for rank, v in enumerate(values):
        groups.setdefault(v, []).append(rank)
    listing = "; ".join(f"ranks {ranks} have {v:#018x}" for v, ranks in groups.items())
    raise RuntimeError(
        f"{prefix or f'the ranks disagree on the {what}'}: {listing}. Every rank must build the sampler with the "
        "same seed and options, apply the same feedback (gathered from all ranks; never update() on one rank "
        "only) and resume from the same checkpoint"
    )
