"""A tiny real Hugging Face Trainer run with ``IRDROTrainer(irdro=dict(sharded=True, ...))`` under torchrun
(CPU, gloo): the loss table sharded over the ranks.

The data set and the recording trainer are tests/_hf_worker.py's (sample ``i``'s first two tokens encode
``i``). Besides what the model was fed, the trainer records every ``update`` the sharded sampler
receives (step, indices, losses), so a test can drive a ``ShardedIRDROSampler`` by hand with the same
feedback. Each rank writes ``<out>/rank<r>.json``.

    python -m torch.distributed.run --nproc_per_node 2 tests/_hf_sharded_worker.py --out DIR [options]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _hf_worker import SEQ, VOCAB, OutputsHookTrainer, Samples, exit_without_finalization  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

#: The sampler options of every run (the by-hand driver in tests/test_hf_sharded.py uses the same).
SEED, NUM_SHARDS, FEEDBACK_DELAY = 3, 8, 8


class FeedbackRecordingTrainer(OutputsHookTrainer):
    """Records each ``sampler.update`` call (the gathered feedback every rank applies)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.feedback: list[tuple[int, list[int], list[float]]] = []

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        sampler = self.irdro_sampler
        update = sampler.update

        def recording_update(indices, losses, step=None):
            self.feedback.append((int(step), torch.as_tensor(indices).tolist(), torch.as_tensor(losses).tolist()))
            update(indices, losses, step)

        sampler.update = recording_update
        return loader


class ScreenRecordingTrainer(FeedbackRecordingTrainer):
    """Also records, per micro-batch: the sampler step, indices, the loss returned to the Trainer, the model's own
    loss and every sample's token-loss sum (``--screen``: what the step learned from)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[dict] = []

    def on_outputs(self, current, loss, outputs, labels) -> None:
        from irdro_sampler.losses import token_loss_sums

        with torch.no_grad():
            sums, _ = token_loss_sums(outputs["logits"], labels, shift=True)
        self.losses.append({"step": current[1], "idx": list(current[0]), "loss": float(loss),
                            "own": float(outputs["loss"]), "sums": sums.double().tolist()})


def screen_primed(n: int) -> np.ndarray:
    """``--screen``'s scoring pass: tight low losses, NaN (not scored: first visits) for every 4th sample."""
    loss = np.random.default_rng(0).uniform(1.0, 1.2, n)
    loss[np.arange(n) % 4 == 0] = np.nan
    return loss


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--screen", action="store_true", help="irdro_screen=True, primed with screen_primed()")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2))
    targs = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs, learning_rate=1e-3,
        logging_steps=2, save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, ddp_backend="gloo",
    )
    irdro = dict(sharded=True, seed=SEED, num_shards=NUM_SHARDS, feedback_delay=FEEDBACK_DELAY)
    screen = {}
    if args.screen:
        irdro["initial_losses"] = screen_primed(args.samples)
        screen["irdro_screen"] = True
    trainer = ScreenRecordingTrainer(model=model, args=targs, train_dataset=Samples(args.samples, "lm"), irdro=irdro,
                                     **screen)
    trainer.train(resume_from_checkpoint=args.resume)
    sampler = trainer.irdro_sampler
    rank = int(os.environ.get("RANK", "0"))
    result = {
        "record": trainer.record,
        "feedback": trainer.feedback,
        "fingerprint": sampler.fingerprint(),
        "stats": {k: float(v) for k, v in sampler.stats().items()},
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "rows": [sampler.start, sampler.stop],
        "table_rows": int(sampler.table.dataset_size),
        "table_seen": int(sampler.table.num_seen),
        "type": type(sampler).__name__,
        "losses": trainer.losses,
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    # Leave together and tear the group down before exit: a rank exiting while gloo's threads still run
    # aborts ("terminate called without an active exception"), seen under a loaded CPU.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_without_finalization()
