"""A tiny real Lightning run with IRDROCallback (CPU; ``--devices 2``: DDP on gloo, Lightning's own launcher).

The features of sample ``i`` start with ``i`` itself, so what ``training_step`` received is decoded back to
sample ids. Each rank records per batch the sampler step, the batch's indices and the decoded ids, and
writes ``<out>/rank<r>.json`` (with the sampler's fingerprint and stats).

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29555 python tests/_lightning_worker.py --out DIR --devices 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from irdro_sampler import IndexedDataset, IRDROSampler
from irdro_sampler.integrations.lightning import IRDROCallback

warnings.filterwarnings("ignore")


def make_data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 1] + 0.5 * torch.randn(n, generator=g) > 0).long()
    x[:, 0] = torch.arange(n, dtype=torch.float32)  # the id, decoded from what the model is fed
    return TensorDataset(x, y)


class Module(L.LightningModule):
    def __init__(self, irdro: IRDROCallback, n: int, batch_size: int, flat: bool, workers: int) -> None:
        super().__init__()
        self.irdro, self.n, self.batch_size, self.flat, self.workers = irdro, n, batch_size, flat, workers
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        self.record: list[dict] = []

    def train_dataloader(self) -> DataLoader:
        ds = IndexedDataset(make_data(self.n))
        sampler = self.irdro.attach(IRDROSampler(ds, self.batch_size, seed=3))
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.workers)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        step = self.current_epoch * self.irdro.sampler.batches_per_epoch + batch_idx
        self.record.append({"step": int(step), "idx": idx.tolist(), "fed": x[:, 0].long().tolist()})
        per_sample = F.cross_entropy(self.net(x[:, 1:]), y, reduction="none")
        reported = torch.ones_like(per_sample) if self.flat else per_sample.detach()
        return {"loss": per_sample.mean(), "per_sample_loss": reported}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--save-every", type=int, default=0, help="also checkpoint every this many optimizer steps")
    ap.add_argument("--resume", default=None)
    ap.add_argument("--flat", action="store_true")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--use-distributed-sampler", action="store_true")
    ap.add_argument("--limit-batches", type=int, default=None, help="Trainer(limit_train_batches=...)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    irdro = IRDROCallback(check_interval=5)
    callbacks = [irdro]
    if args.save_every:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), every_n_train_steps=args.save_every,
                                         save_top_k=-1, filename="{epoch}-{step}"))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs, accumulate_grad_batches=args.grad_accum, callbacks=callbacks,
        use_distributed_sampler=args.use_distributed_sampler, logger=L.pytorch.loggers.CSVLogger(args.out),
        log_every_n_steps=2, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(args.save_every), default_root_dir=args.out,
        limit_train_batches=args.limit_batches,
    )
    module = Module(irdro, args.samples, args.batch_size, args.flat, args.workers)
    trainer.fit(module, ckpt_path=args.resume)
    sampler = irdro.sampler
    result = {"record": module.record, "fingerprint": sampler.fingerprint(),
              "stats": {k: float(v) for k, v in sampler.stats().items()},
              "logged": sorted(k for k in trainer.logged_metrics if k.startswith("irdro/")),
              "global_step": int(trainer.global_step)}
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
