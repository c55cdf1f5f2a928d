"""Train a tiny model with Composer, with or without IR-DRO: the same script, one flag.

    python examples/composer_train.py --algorithm none
    python examples/composer_train.py --algorithm irdro              # resample by DRO weights (default)
    python examples/composer_train.py --algorithm irdro-importance   # same draws, unbiased ERM loss
    python examples/composer_train.py --algorithm irdro-reweight     # the paper's in-batch reweighting
    python examples/composer_train.py --task classifier --algorithm irdro

The data is made here (nothing is downloaded): for ``--task lm`` token sequences from a few synthetic
"domains" (repeating patterns of different periods, one of them rare) plus a share of pure-noise
sequences (uniform random tokens, unlearnable, like the corrupt documents of real corpora); the model
is a tiny GPT-2 built from ``GPT2Config``. For ``--task classifier`` Gaussian blobs with a few noisy
labels and a small MLP. It prints the training loss, the sampler's diagnostics and the share of draws
per group, so the effect of IR-DRO (more draws on hard groups, the cut keeping noise out) is visible.
Runs on CPU in well under two minutes.

The helpers (``make_lm_data``, ``build_trainer``, ...) are reused by the tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

ALGORITHMS = ("none", "irdro", "irdro-importance", "irdro-reweight")


# ------------------------------------------------------------------------------------------- data
class DictDataset(Dataset):
    """Rows of equally long tensors as dict samples."""

    def __init__(self, **columns: torch.Tensor) -> None:
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns must have equal lengths, got {lengths}")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def make_lm_data(
    num_samples: int = 1024, seq_len: int = 32, vocab_size: int = 64, noise_fraction: float = 0.05, seed: int = 0
) -> tuple[DictDataset, np.ndarray, list[str]]:
    """Synthetic LM data: ``(dataset, group_of_each_sample, group_names)``.

    Groups: ``common`` (period-4 patterns, 60%), ``medium`` (period-7, 30% minus noise), ``rare``
    (period-13, 10%) and ``noise`` (uniform random tokens). Each sample repeats a random pattern of its
    period with 3% of tokens corrupted, so longer periods are harder to learn.
    """
    rng = np.random.default_rng(seed)
    names = ["common", "medium", "rare", "noise"]
    shares = np.array([0.6, 0.3 - noise_fraction, 0.1, noise_fraction])
    groups = rng.choice(len(names), size=num_samples, p=shares / shares.sum())
    periods = {0: 4, 1: 7, 2: 13}
    ids = np.empty((num_samples, seq_len), dtype=np.int64)
    for i, g in enumerate(groups):
        if g == 3:
            ids[i] = rng.integers(0, vocab_size, seq_len)
            continue
        pattern = rng.integers(0, vocab_size, periods[int(g)])
        row = np.resize(pattern, seq_len)
        flip = rng.random(seq_len) < 0.03
        row[flip] = rng.integers(0, vocab_size, int(flip.sum()))
        ids[i] = row
    input_ids = torch.from_numpy(ids)
    data = DictDataset(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids.clone())
    return data, groups, names


def make_classifier_data(
    num_samples: int = 1024, num_features: int = 16, num_classes: int = 4, noise_fraction: float = 0.05, seed: int = 0
) -> tuple[DictDataset, np.ndarray, list[str]]:
    """Gaussian blobs (one rare class) with a share of random labels: ``(dataset, groups, names)``."""
    rng = np.random.default_rng(seed)
    shares = np.array([0.4, 0.3, 0.25, 0.05])[:num_classes]
    y = rng.choice(num_classes, size=num_samples, p=shares / shares.sum())
    centers = rng.normal(0, 1.5, (num_classes, num_features))
    x = centers[y] + rng.normal(0, 1.0, (num_samples, num_features))
    noisy = rng.random(num_samples) < noise_fraction
    y_obs = np.where(noisy, rng.integers(0, num_classes, num_samples), y)
    groups = np.where(noisy, num_classes, y)
    names = [f"class{c}" for c in range(num_classes)] + ["noise"]
    data = DictDataset(x=torch.tensor(x, dtype=torch.float32), labels=torch.tensor(y_obs, dtype=torch.int64))
    return data, groups, names


# ------------------------------------------------------------------------------------------- models
def build_lm_model(vocab_size: int = 64, seq_len: int = 32, seed: int = 0) -> Any:
    """A 2-layer GPT-2 with 32-dim embeddings (~40k parameters), wrapped for Composer."""
    from composer.models import HuggingFaceModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return HuggingFaceModel(GPT2LMHeadModel(config), use_logits=True)


def build_classifier_model(num_features: int = 16, num_classes: int = 4, seed: int = 0) -> Any:
    """A small MLP as a ComposerModel taking dict batches ``{'x', 'labels', ...}``."""
    from composer.models import ComposerModel

    class MLPClassifier(ComposerModel):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(num_features, 32), torch.nn.ReLU(), torch.nn.Linear(32, num_classes)
            )

        def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.net(batch["x"])

        def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(outputs, batch["labels"])

    torch.manual_seed(seed)
    return MLPClassifier()


# ------------------------------------------------------------------------------------------- wiring
def build_dataloader(
    dataset: Dataset,
    algorithm: str,
    batch_size: int,
    *,
    num_workers: int = 0,
    seed: int = 0,
    sampler_kwargs: dict[str, Any] | None = None,
) -> DataLoader:
    """The train DataLoader: an ``IRDROSampler`` for the resampling modes, a shuffling sampler otherwise.

    ``batch_size`` is per rank. The dataset is wrapped in ``IndexedDataset`` in every case, so the batch
    carries ``sample_idx`` (the reweight and baseline runs simply do not need it).
    """
    from composer.utils import dist

    from irdro_sampler import IndexedDataset, IRDROSampler

    data = IndexedDataset(dataset)
    if algorithm in ("irdro", "irdro-importance"):
        if algorithm == "irdro-importance":
            # Unbiased with a cut too (the floor reaches every sample), but a cut sample's weight 1/u is large.
            sampler_kwargs = {"truncate_zscore": None, **(sampler_kwargs or {})}
        # Ranks from the launcher's environment: the sampler is built before the Trainer starts torch.distributed.
        sampler = IRDROSampler(
            data,
            batch_size,
            seed=seed,
            num_replicas=dist.get_world_size(),
            rank=dist.get_global_rank(),
            **(sampler_kwargs or {}),
        )
    else:
        sampler = dist.get_sampler(data, shuffle=True, seed=seed)
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers)


def build_algorithms(algorithm: str, **irdro_kwargs: Any) -> list[Any]:
    """``[]`` for ``none``, else ``[IRDRO(mode=...)]`` with the given options."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"--algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "none":
        return []
    from irdro_sampler.integrations.composer import IRDRO

    mode = {"irdro": "resample", "irdro-importance": "importance", "irdro-reweight": "reweight"}[algorithm]
    return [IRDRO(mode=mode, **irdro_kwargs)]


def build_trainer(
    model: Any,
    dataloader: DataLoader,
    algorithms: list[Any],
    *,
    steps: int,
    seed: int = 0,
    lr: float = 3e-3,
    optimizer: torch.optim.Optimizer | None = None,
    microbatch_size: int | None = None,
    loggers: list[Any] | None = None,
    **trainer_kwargs: Any,
) -> Any:
    """A CPU Composer ``Trainer`` for ``steps`` batches (AdamW at ``lr`` unless ``optimizer``), no schedule."""
    from composer import Trainer

    if optimizer is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    return Trainer(
        model=model,
        train_dataloader=dataloader,
        optimizers=optimizer,
        max_duration=f"{steps}ba",
        algorithms=algorithms,
        device="cpu",
        seed=seed,
        device_train_microbatch_size=microbatch_size,
        loggers=loggers,
        progress_bar=False,
        log_to_console=False,
        **trainer_kwargs,
    )


def evaluate_per_group(model: Any, dataset: Dataset, groups: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Mean per-sample loss of every group over the whole data set (the model in eval mode, no grad)."""
    from torch.utils.data import default_collate

    from irdro_sampler.integrations.composer import default_per_sample_loss

    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = default_collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            losses.append(default_per_sample_loss(model(batch), batch))
    per = torch.cat(losses).numpy()
    model.train()
    return np.array([per[groups == g].mean() for g in range(int(groups.max()) + 1)])


def DrawCounter(groups: np.ndarray) -> Any:
    """A Composer callback counting the trained samples per group (from the batch's sample indices)."""
    from composer.core import Callback

    from irdro_sampler.integrations.composer import batch_sample_indices

    class _DrawCounter(Callback):
        def __init__(self) -> None:
            self.counts: Counter[int] = Counter()

        def after_dataloader(self, state: Any, logger: Any) -> None:
            for i in batch_sample_indices(state).tolist():  # IRDRO took them out of the batch
                self.counts[int(groups[i])] += 1

    return _DrawCounter()


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="irdro")
    parser.add_argument("--task", choices=("lm", "classifier"), default="lm")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--microbatch-size", type=int, default=None)
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--noise-fraction", type=float, default=0.05)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--log-interval", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    np.finfo(np.float32).smallest_subnormal, np.finfo(np.float64).smallest_subnormal  # noqa: B018 (cache before flushing)
    torch.set_flush_denormal(True)  # tiny CPU models run several times faster

    from composer.loggers import InMemoryLogger

    if args.task == "lm":
        data, groups, names = make_lm_data(args.num_samples, noise_fraction=args.noise_fraction, seed=args.seed)
        model = build_lm_model(seed=args.seed)
    else:
        data, groups, names = make_classifier_data(args.num_samples, noise_fraction=args.noise_fraction, seed=args.seed)
        model = build_classifier_model(seed=args.seed)
    # The library's defaults. A classifier passes its labels as groups: each sample's loss is then judged
    # against its own class, so a rare class whose losses are all high is not mistaken for noise.
    sampler_kwargs = {} if args.task == "lm" else {"groups": data.columns["labels"]}
    dataloader = build_dataloader(
        data, args.algorithm, args.batch_size, num_workers=args.num_workers, seed=args.seed, sampler_kwargs=sampler_kwargs
    )
    irdro_kwargs: dict[str, Any] = {"log_interval": args.log_interval}
    memory = InMemoryLogger()
    drawn = DrawCounter(groups)
    trainer = build_trainer(
        model,
        dataloader,
        build_algorithms(args.algorithm, **irdro_kwargs),
        steps=args.steps,
        seed=args.seed,
        microbatch_size=args.microbatch_size,
        loggers=[memory],
        callbacks=[drawn],
    )

    start = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - start

    losses = [v for _, v in memory.data.get("loss/train/total", [])]
    tail = float(np.mean(losses[-20:])) if losses else float("nan")
    total = sum(drawn.counts.values()) or 1
    group_loss = evaluate_per_group(model, data, groups)
    print(f"task={args.task} algorithm={args.algorithm} steps={args.steps} time={elapsed:.1f}s")
    print(f"train loss as optimized (mean of the last 20 batches; weighted in importance/reweight): {tail:.4f}")
    print("per group: share of draws vs share of data, and final loss over all its samples:")
    for g, name in enumerate(names):
        print(f"  {name:>8}: drawn {drawn.counts[g] / total:6.1%}   data {np.mean(groups == g):6.1%}"
              f"   loss {group_loss[g]:.4f}")
    clean = [g for g, name in enumerate(names) if name != "noise"]
    print(f"  worst clean group loss {group_loss[clean].max():.4f}; "
          f"mean clean loss {np.average(group_loss[clean], weights=[np.sum(groups == g) for g in clean]):.4f}")
    algo = trainer.state.algorithms[0] if trainer.state.algorithms else None
    stats: dict[str, float] = {}
    if algo is not None and algo.sampler is not None:
        stats = algo.sampler.stats()
        keys = ("ess_fraction", "kl_to_uniform", "temperature", "max_prob", "seen_fraction", "truncated_fraction")
        print("sampler: " + ", ".join(f"{k}={stats[k]:.4g}" for k in keys))
    trainer.close()
    return {"loss": tail, "drawn": dict(drawn.counts), "stats": stats, "elapsed": elapsed,
            "group_loss": dict(zip(names, group_loss.tolist(), strict=True))}


if __name__ == "__main__":
    main(sys.argv[1:])
