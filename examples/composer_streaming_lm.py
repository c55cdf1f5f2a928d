"""Composer + mosaicml-streaming + IRDRO: a tiny causal LM trained on MDS shards drawn by IR-DRO weights.

Everything is made here: text from the Python standard library's own source, cut into 64-byte
documents, with 5% random-byte documents standing for corrupt data, written as MDS shards (the
"remote"), then streamed into a local cache. The wiring is what a user writes:

    dataset = WeightedStreamingDataset(round_size=..., remote=..., local=..., batch_size=..., shuffle=True)
    loader = DataLoader(dataset, ..., collate_fn=IndexListCollate(my_collate))  # ids as a list of ints
    trainer = Trainer(model=..., train_dataloader=loader, algorithms=[IRDRO()])

IRDRO computes each sequence's loss from the forward pass Composer already ran, keeps a running loss
per document, and at every round boundary (EPOCH_END) pushes the closed-form KL-DRO weights to the
dataset, which draws the next round with replacement. Run:

    python examples/composer_streaming_lm.py --algorithm irdro      # or none, irdro-reweight
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

SEQ_LEN = 64
ALGORITHMS = ("none", "irdro", "irdro-reweight")


def write_mds(remote: Path, num_docs: int, noise: float, seed: int) -> np.ndarray:
    """Write ``num_docs`` byte documents (column ``tokens``) to MDS shards; returns which are noise."""
    from streaming import MDSWriter

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join(p.read_bytes() for p in sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py")))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(text) - SEQ_LEN, num_docs)
    is_noise = rng.random(num_docs) < noise
    with MDSWriter(out=str(remote), columns={"tokens": "bytes"}, size_limit=1 << 14) as writer:
        for start, bad in zip(starts, is_noise, strict=True):
            doc = rng.integers(0, 256, SEQ_LEN, dtype=np.uint8).tobytes() if bad else text[start : start + SEQ_LEN]
            writer.write({"tokens": doc})
    return is_noise


def collate(samples: list[dict], seq_len: int) -> dict[str, torch.Tensor]:
    """Bytes -> ``input_ids``/``labels`` (``IndexListCollate`` adds the weighted dataset's ``sample_idx``)."""
    ids = torch.stack([torch.from_numpy(np.frombuffer(s["tokens"], dtype=np.uint8)[:seq_len].astype(np.int64)) for s in samples])
    return {"input_ids": ids, "labels": ids.clone()}


def build_model(seed: int):
    from composer.models import HuggingFaceModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=4)
    return HuggingFaceModel(GPT2LMHeadModel(config), use_logits=True, shift_labels=True)


class CountDraws:
    """A Composer callback counting how many drawn documents were noise."""

    def __init__(self, is_noise: np.ndarray) -> None:
        from composer.core import Callback

        from irdro_sampler.integrations.composer import batch_sample_indices

        outer = self

        class _Callback(Callback):
            def after_dataloader(self, state, logger) -> None:
                ids = batch_sample_indices(state)  # IRDRO took them out of the batch
                if ids is not None:
                    idx = ids.numpy()
                    outer.noise += int(is_noise[idx].sum())
                    outer.total += idx.size

        self.noise, self.total = 0, 0
        self.callback = _Callback()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithm", choices=ALGORITHMS, default="irdro")
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--round-batches", type=int, default=10, help="batches per round (weights refresh)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: intra-op threads only add overhead

    from composer import Trainer
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    from irdro_sampler import DROWeighting, IndexListCollate
    from irdro_sampler.integrations.composer import IRDRO
    from irdro_sampler.integrations.streaming import WeightedStreamingDataset

    with tempfile.TemporaryDirectory() as tmp:
        remote, local = Path(tmp) / "remote", Path(tmp) / "local"
        is_noise = write_mds(remote, args.docs, args.noise, args.seed)
        common = dict(remote=str(remote), local=str(local), batch_size=args.batch_size, shuffle=True, shuffle_seed=args.seed)
        if args.algorithm == "irdro":
            dataset = WeightedStreamingDataset(round_size=args.round_batches * args.batch_size, **common)
            algorithms = [IRDRO(log_interval=0)]  # defaults: tau = 1, adaptive cut, 10% uniform floor
        else:
            dataset = StreamingDataset(**common)
            algorithms = [IRDRO(mode="reweight", log_interval=0)] if args.algorithm == "irdro-reweight" else []
        collate_fn = partial(collate, seq_len=SEQ_LEN)
        if args.algorithm == "irdro":  # the ids IRDRO reports losses for, kept a list (cheap with workers)
            collate_fn = IndexListCollate(collate_fn)
        loader = DataLoader(dataset, batch_size=args.batch_size, drop_last=True, collate_fn=collate_fn)
        counter = CountDraws(is_noise)
        trainer = Trainer(model=build_model(args.seed), train_dataloader=loader, max_duration=f"{args.steps}ba",
                          optimizers=None, algorithms=algorithms, callbacks=[counter.callback], device="cpu",
                          seed=args.seed, progress_bar=False, log_to_console=False, loggers=[])
        trainer.fit()
        line = f"{args.algorithm}: {args.steps} steps, final train loss {float(trainer.state.loss):.3f}, "
        if counter.total:  # only the weighted dataset tags samples with their id
            line += f"noise share of draws {counter.noise / counter.total:.1%} (of data {is_noise.mean():.1%})"
        else:
            line += f"uniform draws: noise share of draws ~ its share of data ({is_noise.mean():.1%})"
        if args.algorithm == "irdro":
            algo = algorithms[0]
            probs = DROWeighting(**algo.rule_options).probabilities(algo.table)  # what the next round uses
            seen_noise = is_noise & ~np.isnan(algo.table.losses)
            line += (f"; next round: p(noise seen so far) = {probs[seen_noise].sum():.4f}, "
                     f"{algo.table.num_seen} of {algo.table.dataset_size} documents seen")
        print(line, flush=True)
        trainer.close()


if __name__ == "__main__":
    main()
