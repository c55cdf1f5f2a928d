"""A tiny real Lightning run with IRDROCallback and a ShardedIRDROSampler (CPU, ``--devices 2``: DDP on gloo,
Lightning's own launcher).

The data and the module are tests/_lightning_worker.py's (the features of sample ``i`` start with ``i``);
``train_dataloader`` attaches a ``ShardedIRDROSampler`` instead. Each rank also records every ``update`` the
sampler receives (step, indices, losses), so a test can drive a sampler by hand with the same feedback,
and writes ``<out>/rank<r>.json``.

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29555 python tests/_lightning_sharded_worker.py --out DIR --devices 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import lightning as L
import torch
from _lightning_worker import Module, make_data
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from irdro_sampler import IndexedDataset, ShardedIRDROSampler
from irdro_sampler.integrations.lightning import IRDROCallback

warnings.filterwarnings("ignore")

#: The sampler options of every run (the by-hand driver in tests/test_lightning_sharded.py uses the same).
SEED, NUM_SHARDS, FEEDBACK_DELAY = 3, 8, 8


class ShardedModule(Module):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.feedback: list[tuple[int, list[int], list[float]]] = []

    def train_dataloader(self) -> DataLoader:
        ds = IndexedDataset(make_data(self.n))
        sampler = ShardedIRDROSampler(len(ds), self.batch_size, seed=SEED, num_shards=NUM_SHARDS,
                                      feedback_delay=FEEDBACK_DELAY)
        update = sampler.update

        def recording_update(indices, losses, step=None):
            self.feedback.append((int(step), torch.as_tensor(indices).tolist(), torch.as_tensor(losses).tolist()))
            update(indices, losses, step)

        sampler.update = recording_update
        self.irdro.attach(sampler)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--top-k", type=int, default=-1, help="ModelCheckpoint(save_top_k=...): the latest k steps")
    ap.add_argument("--resume", default=None)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    irdro = IRDROCallback(check_interval=5)
    callbacks = [irdro]
    if args.save_every:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), every_n_train_steps=args.save_every,
                                         save_top_k=args.top_k, monitor="step", mode="max", filename="{epoch}-{step}"))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp", max_epochs=args.epochs, callbacks=callbacks,
        use_distributed_sampler=False, logger=False, log_every_n_steps=2, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(args.save_every), default_root_dir=args.out,
    )
    module = ShardedModule(irdro, args.samples, args.batch_size, False, 0)
    trainer.fit(module, ckpt_path=args.resume)
    sampler = irdro.sampler
    result = {"record": module.record, "feedback": module.feedback, "fingerprint": sampler.fingerprint(),
              "stats": {k: float(v) for k, v in sampler.stats().items()}, "global_step": int(trainer.global_step),
              "rows": [sampler.start, sampler.stop], "table_rows": int(sampler.table.dataset_size),
              "type": type(sampler).__name__}
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
