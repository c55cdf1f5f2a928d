"""The tiny Composer model of the streaming tests (imports Composer: use it from tests that need Composer).

It classifies ``x mod 4`` from an embedding of ``x mod 64`` (``x`` the sample id that ``_streaming_data.write_mds``
writes), so some samples are harder than others; ``per_sample_loss`` is IRDRO's ``loss_fn`` for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from composer.models import ComposerModel


class Tiny(ComposerModel):
    """Classifies x mod 4 from an embedding of x mod 64: some samples are harder than others."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(64, 8)
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, batch):
        return self.lin(self.emb(batch["x"] % 64))

    def loss(self, outputs, batch, *args, **kwargs):
        return F.cross_entropy(outputs, batch["x"] % 4)


def per_sample_loss(outputs, batch):
    return F.cross_entropy(outputs, batch["x"] % 4, reduction="none")
