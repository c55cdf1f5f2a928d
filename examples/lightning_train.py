"""IR-DRO sampling in a Lightning script: ``IRDROCallback`` plus the sampler in ``train_dataloader``.

The data is ``examples/plain_pytorch.py``'s: a 2-D classification task with a common easy group, a rare
hard group (5%, its own decision boundary) and 2% of samples with random labels (noise). Uniform sampling
under-trains the rare group; IR-DRO with the library's defaults and the groups (common or rare; the noise
is not known) draws it more often while the loss cut keeps the noise out: at the default seed the rare
group's test loss ends no worse than with uniform sampling, and the noise gets less than its share of the
draws (``tests/test_examples.py`` checks both). The lines a Lightning script adds are marked ``# IR-DRO``.

    python examples/lightning_train.py                      # IR-DRO
    python examples/lightning_train.py --sampler uniform    # the baseline
    python examples/lightning_train.py --devices 2          # DDP on 2 CPU processes (gloo)
    python examples/lightning_train.py --checkpoint-dir ck  # checkpoints; rerun with --resume ck/last.ckpt
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from irdro_sampler import IndexedDataset, IRDROSampler
from irdro_sampler.integrations.lightning import IRDROCallback  # IR-DRO


def make_data(n: int, seed: int) -> tuple[TensorDataset, torch.Tensor]:
    """Features, labels and a group id per sample: 0 common, 1 rare (5%), 2 random labels (2%)."""
    g = torch.Generator().manual_seed(seed)
    group = torch.zeros(n, dtype=torch.long)
    u = torch.rand(n, generator=g)
    group[u < 0.07] = 1
    group[u < 0.02] = 2
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > 0).long()
    rare = group == 1
    x[rare] = x[rare] * 0.5 + torch.tensor([3.0, 3.0])
    y[rare] = (x[rare, 1] > 3.0).long()
    noisy = group == 2
    y[noisy] = torch.randint(0, 2, (int(noisy.sum()),), generator=g)
    return TensorDataset(x, y), group


class Classifier(L.LightningModule):
    def __init__(self, data: TensorDataset, group: torch.Tensor, batch_size: int, seed: int,
                 irdro: IRDROCallback | None) -> None:
        super().__init__()
        self.data, self.group, self.batch_size, self.seed, self.irdro = data, group, batch_size, seed, irdro
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        self.drawn = torch.zeros(3)

    def train_dataloader(self) -> DataLoader:
        dataset = IndexedDataset(self.data)  # IR-DRO: each sample becomes (x, y, index)
        if self.irdro is not None:
            groups = (self.group == 1).long()  # the known sources: common or rare
            sampler = self.irdro.attach(IRDROSampler(dataset, self.batch_size, groups=groups, seed=self.seed))  # IR-DRO
        else:
            sampler = RandomSampler(dataset, replacement=True, generator=torch.Generator().manual_seed(self.seed))
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        per_sample = F.cross_entropy(self.net(x), y, reduction="none")
        self.drawn += torch.bincount(self.group[idx.cpu()], minlength=3)
        return {"loss": per_sample.mean(), "per_sample_loss": per_sample.detach()}  # IR-DRO: the per-sample losses

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)


@torch.no_grad()
def evaluate(model: torch.nn.Module, test: TensorDataset, group: torch.Tensor) -> dict[str, float]:
    x, y = test.tensors
    loss = F.cross_entropy(model(x), y, reduction="none")
    return {"common": loss[group == 0].mean().item(), "rare": loss[group == 1].mean().item()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--sampler", choices=["irdro", "uniform"], default="irdro")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-dir", default=None, help="save a checkpoint after every epoch here")
    ap.add_argument("--resume", default=None, help="a checkpoint to resume from")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    data, group = make_data(args.samples, args.seed)
    test, test_group = make_data(20_000, args.seed + 1)
    irdro = IRDROCallback() if args.sampler == "irdro" else None  # IR-DRO
    timer = StepTimer()
    callbacks: list[Callback] = [timer] + ([irdro] if irdro is not None else [])
    if args.checkpoint_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, save_last=True))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(args.checkpoint_dir),
        use_distributed_sampler=False,  # IR-DRO: the sampler already splits each global batch by rank
    )
    model = Classifier(data, group, args.batch_size, args.seed, irdro)
    trainer.fit(model, ckpt_path=args.resume)
    result = evaluate(model.net, test, test_group)
    drawn = model.drawn
    result.update(drawn_rare=float(drawn[1] / drawn.sum()), drawn_noise=float(drawn[2] / drawn.sum()),
                  share_rare=float((group == 1).float().mean()), share_noise=float((group == 2).float().mean()),
                  step_ms=1000 * sorted(timer.times)[len(timer.times) // 2])
    if trainer.global_rank == 0:
        line = (f"{args.sampler}: test loss common {result['common']:.3f} rare {result['rare']:.3f} | drawn rare "
                f"{result['drawn_rare']:.1%} noise {result['drawn_noise']:.1%} (this rank) | median step "
                f"{result['step_ms']:.2f} ms")
        if irdro is not None:
            s = irdro.sampler.stats()
            line += f" | ESS {s['ess_fraction']:.2f} cut {s['truncated_fraction']:.1%}"
        print(line, flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
