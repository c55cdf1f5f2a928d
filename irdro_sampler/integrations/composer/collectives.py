"""The collectives IRDRO runs: gathering every rank's feedback, and checking the ranks agree.

Both are the core's (:mod:`irdro_sampler.distributed`, over torch.distributed's default group, which
Composer initialises); in a single process they do no communication.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from irdro_sampler.distributed import check_ranks_agree as _check_values_agree
from irdro_sampler.distributed import gather_feedback as _gather
from irdro_sampler.distributed import world_size

__all__ = ["check_ranks_agree", "gather_feedback"]


def gather_feedback(indices: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather variable-length ``(indices, losses)`` from every rank, concatenated in rank order, on the
    tensors' device (NCCL needs CUDA tensors): :func:`irdro_sampler.distributed.gather_feedback`."""
    return _gather(indices, losses)


def check_ranks_agree(fingerprint: Callable[[], int], device: torch.device, *, what: str, when: str) -> None:
    """One all-gather of every rank's ``fingerprint()``; ``RuntimeError`` on every rank naming the ranks when
    they differ. ``fingerprint`` is only called with more than one rank (on the streaming path it costs
    O(N)); ``what`` names the state compared, ``when`` the point of the run."""
    if world_size() == 1:
        return
    _check_values_agree(fingerprint(), what, device=device,
                        prefix=f"IRDRO: the ranks' {what} states diverged (checked at {when}): fingerprints differ")
