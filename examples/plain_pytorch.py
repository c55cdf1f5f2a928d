"""IR-DRO sampling in a plain PyTorch loop: DataLoader + IndexedDataset + IRDROSampler.

The data is made here: a 2-D classification task with a common easy group, a rare hard group (5%,
its own decision boundary), and 2% of samples with random labels (noise). Uniform sampling
under-trains the rare group; IR-DRO with the library's defaults draws it more often while the loss cut
keeps the noise out: at the default seed the rare group's test loss ends lower than with uniform
sampling, and the noise gets a smaller share of the draws than its 2% share of the data
(``tests/test_examples.py`` checks both). Per-sample losses go back to the sampler after every step.

The sampler is told which group each sample belongs to (``groups=``: here common or rare, as a data
source would be known; the noise is not known). Each loss is then judged against its own group, so the
rare group, whose losses are all high, is not mistaken for noise. ``--no-groups`` shows why this
matters: without groups the cut cannot tell the rare group from noise and starves it. Runs in seconds:

    python examples/plain_pytorch.py --epochs 5
    python examples/plain_pytorch.py --sampler uniform      # the baseline
    python examples/plain_pytorch.py --no-groups            # what happens without groups
    python examples/plain_pytorch.py --checkpoint run.pt    # crash-safe checkpoints; rerun to resume
    python examples/plain_pytorch.py --screen               # screen first visits (harms the rare group here:
                                                            # benchmarks/screen_subgroup.py)
    python examples/plain_pytorch.py --screen-block         # screen only a block of unlearnable samples: none
                                                            # here, so the run is the unscreened one
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from irdro_sampler import IndexedDataset, IRDROSampler, save_state


def make_data(n: int, seed: int) -> tuple[TensorDataset, torch.Tensor]:
    """Features, labels and a group id per sample: 0 common, 1 rare (5%), 2 random labels (2%)."""
    g = torch.Generator().manual_seed(seed)
    group = torch.zeros(n, dtype=torch.long)
    u = torch.rand(n, generator=g)
    group[u < 0.07] = 1
    group[u < 0.02] = 2
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > 0).long()  # common: a vertical boundary
    rare = group == 1
    x[rare] = x[rare] * 0.5 + torch.tensor([3.0, 3.0])
    y[rare] = (x[rare, 1] > 3.0).long()  # rare: a horizontal boundary somewhere else
    noisy = group == 2
    y[noisy] = torch.randint(0, 2, (int(noisy.sum()),), generator=g)
    return TensorDataset(x, y), group


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--sampler", choices=["irdro", "uniform"], default="irdro")
    ap.add_argument("--no-groups", action="store_true", help="do not pass the labels as groups")
    ap.add_argument("--screen", action="store_true",
                    help="leave out of each step the first visits the cut would take (sampler.screen)")
    ap.add_argument("--screen-block", action="store_true",
                    help="leave out only first visits inside a block of unlearnable samples "
                         "(sampler.screen(..., block_only=True))")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default=None,
                    help="after every epoch save model, optimizer and sampler here (crash-safe: save_state); "
                    "resume from it when it exists")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a tiny model: threads only add overhead
    base, group = make_data(args.samples, args.seed)
    test, test_group = make_data(20_000, args.seed + 1)
    dataset = IndexedDataset(base)  # each sample becomes (x, y, index)
    if args.sampler == "irdro":
        # The library's defaults; the labels as groups, so each sample's loss is judged against its class.
        groups = None if args.no_groups else (group == 1).long()
        sampler = IRDROSampler(dataset, args.batch_size, groups=groups, seed=args.seed)
    else:
        sampler = RandomSampler(dataset, replacement=True, generator=torch.Generator().manual_seed(args.seed))
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers)

    model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    step = start_epoch = 0
    if args.checkpoint and os.path.exists(args.checkpoint):
        ckpt = torch.load(args.checkpoint, weights_only=True)  # tensors and primitives only
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if isinstance(sampler, IRDROSampler):
            sampler.load_state_dict(ckpt["sampler"])  # checked in full; a bad state changes nothing
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        print(f"resumed after epoch {ckpt['epoch']} (step {step})", flush=True)
    result = evaluate(model, test, test_group)
    drawn = torch.zeros(3)  # draws per group over the whole run (since the resume)
    screened = 0  # draws left out of their step's loss by the screen
    for epoch in range(start_epoch, args.epochs):
        if isinstance(sampler, IRDROSampler):
            sampler.set_epoch(epoch)
        for x, y, idx in loader:
            per_sample = F.cross_entropy(model(x), y, reduction="none")
            opt.zero_grad()
            loss = per_sample.mean()  # resampling: the plain mean has the DRO gradient in expectation
            if (args.screen or args.screen_block) and isinstance(sampler, IRDROSampler):
                # a screened sample weighs 0, divisor kept
                keep = sampler.screen(idx, per_sample.detach(), block_only=args.screen_block)
                screened += int(keep.size - keep.sum())
                loss = (per_sample * torch.as_tensor(keep, dtype=per_sample.dtype)).mean()
            loss.backward()
            opt.step()
            if isinstance(sampler, IRDROSampler):
                sampler.update(idx, per_sample.detach(), step=step)
            drawn += torch.bincount(group[idx], minlength=3)
            step += 1
        result = evaluate(model, test, test_group)
        result.update(drawn_rare=float(drawn[1] / drawn.sum()), drawn_noise=float(drawn[2] / drawn.sum()),
                      screened=float(screened / drawn.sum()))
        line = (
            f"epoch {epoch}: test loss common {result['common']:.3f} rare {result['rare']:.3f} | "
            f"drawn rare {drawn[1] / drawn.sum():.1%} noise {drawn[2] / drawn.sum():.1%}"
        )
        if isinstance(sampler, IRDROSampler):
            s = sampler.stats()
            line += f" | ESS {s['ess_fraction']:.2f} KL {s['kl_to_uniform']:.3f} cut {s['truncated_fraction']:.1%}"
        print(line, flush=True)
        if args.checkpoint:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "step": step}
            if isinstance(sampler, IRDROSampler):
                state["sampler"] = sampler.state_dict()
            # Temporary file + fsync + os.replace: a kill mid-save keeps the previous checkpoint intact.
            save_state(state, args.checkpoint)
    return result


@torch.no_grad()
def evaluate(model: torch.nn.Module, test: TensorDataset, group: torch.Tensor) -> dict[str, float]:
    x, y = test.tensors
    loss = F.cross_entropy(model(x), y, reduction="none")
    return {"common": loss[group == 0].mean().item(), "rare": loss[group == 1].mean().item()}


if __name__ == "__main__":
    main()
