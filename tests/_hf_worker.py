"""A tiny real Hugging Face Trainer run with IRDROTrainer, in-process or under torchrun (CPU, gloo).

Each sample ``i`` is a short token sequence whose first two tokens encode ``i`` (``i // 64``, ``i % 64``),
so what the model was fed can be decoded back to sample ids. The trainer records, per micro-batch, the
sampler step, the indices the batch carried and the ids decoded from its ``input_ids``; each rank writes
its record (and the sampler's fingerprint and stats) to ``<out>/rank<r>.json``.

    python -m torch.distributed.run --nproc_per_node 2 tests/_hf_worker.py --out DIR [options]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, TrainingArguments  # noqa: E402

from irdro_sampler.integrations.hf import INDEX_KEY, STEP_KEY, IRDROTrainer  # noqa: E402

VOCAB = 64
SEQ = 8


class Samples(torch.utils.data.Dataset):
    """Map-style: sample ``i`` -> {input_ids, attention_mask, labels}; labels as the task needs."""

    def __init__(self, n: int, task: str, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.n, self.task = n, task
        self.body = torch.randint(2, VOCAB, (n, SEQ - 2), generator=g)
        self.cls = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        ids = torch.cat([torch.tensor([i // VOCAB, i % VOCAB]), self.body[i]])
        item = {"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long)}
        item["labels"] = ids.clone() if self.task == "lm" else self.cls[i]
        return item


def decode(input_ids: torch.Tensor) -> list[int]:
    return (input_ids[:, 0] * VOCAB + input_ids[:, 1]).tolist()


class RecordingTrainer(IRDROTrainer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.record: list[dict] = []

    def training_step(self, model, inputs, *args, **kwargs):
        self.record.append({
            "step": int(inputs[STEP_KEY]),
            "idx": [int(i) for i in inputs[INDEX_KEY]],
            "fed": decode(inputs["input_ids"].cpu()),
            "global_step": int(self.state.global_step),
        })
        return super().training_step(model, inputs, *args, **kwargs)


class OutputsHookTrainer(RecordingTrainer):
    """Calls ``on_outputs(current, loss, outputs, labels)`` after each training micro-batch's ``compute_loss``
    (``current`` = (indices, sampler step); ``loss`` what goes back to the Trainer)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        current = self._irdro_current
        labels = inputs.get("labels")
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch,
                                             **kwargs)
        if current is not None:
            self.on_outputs(current, loss, outputs, labels)
        return (loss, outputs) if return_outputs else loss

    def on_outputs(self, current, loss, outputs, labels) -> None:
        pass


def build(argv: list[str] | None = None) -> tuple[RecordingTrainer, argparse.Namespace]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", choices=["lm", "cls"], default="lm")
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--flat", action="store_true", help="report the same loss for every sample (flat weights)")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--logging-steps", type=int, default=2)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    if args.task == "lm":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2))
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2, num_labels=2,
                         pad_token_id=0)
        model = GPT2ForSequenceClassification(cfg)
    targs = TrainingArguments(
        output_dir=args.out,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=1e-3,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=args.workers,
        disable_tqdm=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    extra = {"per_sample_loss": (lambda outputs, inputs: torch.ones(inputs["input_ids"].shape[0]))} if args.flat else {}
    trainer = RecordingTrainer(model=model, args=targs, train_dataset=Samples(args.samples, args.task),
                               irdro=dict(seed=3), **extra)
    return trainer, args


def main(argv: list[str] | None = None) -> dict:
    trainer, args = build(argv)
    trainer.train(resume_from_checkpoint=True if args.resume == "true" else args.resume)
    sampler = trainer.irdro_sampler
    result = {
        "record": trainer.record,
        "fingerprint": sampler.fingerprint(),
        "stats": {k: float(v) for k, v in sampler.stats().items()},
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
    }
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    # Leave together and tear the group down before exit, as _hf_sharded_worker.py does: a rank that exits while
    # gloo's threads still hold work aborts in the interpreter's finalization ("terminate called without an
    # active exception", seen once in CI on a 2-rank resume).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def exit_without_finalization() -> None:
    """Exit 0 once the results are written, without the interpreter's finalization: with 2 gloo ranks under the
    HF Trainer a rank still aborted there after the teardown above ("terminate called without an active
    exception", a C++ thread still joinable at static destruction, twice in CI's newest HF lane), after every
    result was on disk. Only the worker scripts exit this way; a failure before it raises as usual."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
    exit_without_finalization()
