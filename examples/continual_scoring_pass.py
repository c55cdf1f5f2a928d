"""Continual training over few passes: a scoring pass primes the sampler (``IRDROSampler.prime``), or the step
screens first visits (``IRDROSampler.screen``).

The data is made here: 64-byte documents of Python standard-library source code, a quarter of them
replaced by random bytes (content no model can learn). A tiny byte-level language model is trained on
all of it uniformly (the "starting model"), then trained further for about one pass over the same
documents, the way a model is continued on new data. In one pass most draws are first visits: the
sampler has not seen those documents' losses yet, so it cannot steer them, and its cut forms only late.
A scoring pass fixes that: the starting model's loss on every document (a forward pass, no backward),
reported with ``sampler.prime(indices, losses)`` before the first batch is drawn. With the library's
defaults, at the default seed, the primed sampler draws the random documents far below their 25% share
from the first batch on, and the held-out loss on clean code ends lower than with uniform sampling and
lower than without the scoring pass. Without a scoring pass, the step can screen: after the forward pass it
leaves out of the loss the first visits whose loss the sampler's cut would take (every loss is still
reported). It trains on the random documents at less than half the share the unscreened sampler does, and
its held-out loss ends between the unscreened sampler's and the primed one's (``tests/test_examples.py``
checks all of these). Runs in half a minute:

    python examples/continual_scoring_pass.py                 # the four arms side by side
    python examples/continual_scoring_pass.py --docs 1000     # fewer documents
"""

from __future__ import annotations

import argparse
import pathlib
import sysconfig
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from irdro_sampler import IndexedDataset, IRDROSampler

DOC_BYTES, CONTEXT = 64, 6


def make_documents(n: int, noise_share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` training documents (a ``noise_share`` of them random bytes), whether each is noise, and 500
    held-out clean documents: consecutive 64-byte pieces of the standard library's own source files."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    text = b"".join(p.read_bytes() for p in sorted(stdlib.glob("[a-m]*.py"))[:40])
    pieces = np.frombuffer(text, dtype=np.uint8)[: (len(text) // DOC_BYTES) * DOC_BYTES].reshape(-1, DOC_BYTES)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(pieces), size=n + 500, replace=False)
    docs, held_out = pieces[pick[:n]].copy(), pieces[pick[n:]]
    noisy = rng.random(n) < noise_share
    docs[noisy] = rng.integers(0, 256, size=(int(noisy.sum()), DOC_BYTES), dtype=np.uint8)
    return torch.from_numpy(docs).long(), torch.from_numpy(noisy), torch.from_numpy(held_out.copy()).long()


class ByteLM(torch.nn.Module):
    """Next-byte prediction from the previous ``CONTEXT`` bytes (an embedding and an MLP)."""

    def __init__(self, width: int = 48, hidden: int = 256) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(257, width)  # 256 = padding before the document starts
        self.mlp = torch.nn.Sequential(torch.nn.Linear(CONTEXT * width, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, 256))

    def forward(self, docs: torch.Tensor) -> torch.Tensor:
        """Per-document loss (mean cross-entropy over its bytes, in nats), shape ``(batch,)``."""
        padded = F.pad(docs, (CONTEXT, 0), value=256)
        windows = padded.unfold(1, CONTEXT, 1)[:, :-1]  # (batch, DOC_BYTES, CONTEXT): the bytes before each
        logits = self.mlp(self.embed(windows).flatten(2))
        return F.cross_entropy(logits.transpose(1, 2), docs, reduction="none").mean(1)


@torch.no_grad()
def scoring_pass(model: ByteLM, docs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The model's loss on every document: a forward pass, no backward, no update."""
    return torch.cat([model(docs[i:i + batch_size]) for i in range(0, len(docs), batch_size)])


def train(model: ByteLM, loader: DataLoader, steps: int, lr: float, sampler: IRDROSampler | None,
          noisy: torch.Tensor, screen: bool = False) -> tuple[float, float]:
    """``steps`` steps of Adam on the plain mean loss; reports each batch's losses to ``sampler``; with ``screen``
    leaves out of each step's loss the first visits the sampler's cut would take (``sampler.screen``). Returns the
    shares of draws that were noise documents, and that were noise documents trained on."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    step, noise_draws, noise_trained = 0, 0, 0
    while step < steps:
        for (docs,), idx in ((batch[:-1], batch[-1]) for batch in loader):
            loss = model(docs)
            keep = torch.ones(len(idx), dtype=torch.bool)
            if screen:
                keep = torch.as_tensor(sampler.screen(idx, loss.detach()))
            opt.zero_grad()
            (loss * keep).mean().backward()  # resampling: the plain mean has the DRO gradient in expectation
            opt.step()
            if sampler is not None:
                sampler.update(idx, loss.detach(), step=step)  # every loss, screened ones too
            noise_draws += int(noisy[idx].sum())
            noise_trained += int((noisy[idx] & keep).sum())
            step += 1
            if step == steps:
                break
        if sampler is not None:
            sampler.set_epoch(sampler.epoch + 1)
    return noise_draws / (steps * loader.batch_size), noise_trained / (steps * loader.batch_size)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--noise-share", type=float, default=0.25)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--passes", type=float, default=1.0, help="continual steps, in passes over the documents")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # a tiny model: threads only add overhead
    docs, noisy, held_out = make_documents(args.docs, args.noise_share, args.seed)
    dataset = IndexedDataset(TensorDataset(docs))  # each sample becomes (document, index)
    torch.manual_seed(args.seed)
    start = ByteLM()
    uniform = RandomSampler(dataset, replacement=True, generator=torch.Generator().manual_seed(args.seed))
    train(start, DataLoader(dataset, args.batch_size, sampler=uniform), args.pretrain_steps, 3e-3, None, noisy)
    steps = round(args.passes * args.docs / args.batch_size)

    results = {}
    for arm in ("uniform", "irdro", "irdro + screen", "irdro + scoring pass"):
        model = ByteLM()
        model.load_state_dict(start.state_dict())  # every arm continues the same starting model
        torch.manual_seed(args.seed + 1)
        sampler, scoring_seconds = None, 0.0
        if arm == "uniform":
            order = RandomSampler(dataset, replacement=True, generator=torch.Generator().manual_seed(args.seed + 1))
        else:
            sampler = order = IRDROSampler(dataset, args.batch_size, seed=args.seed + 1)  # the library's defaults
            if arm == "irdro + scoring pass":
                t0 = time.perf_counter()
                sampler.prime(torch.arange(len(docs)), scoring_pass(model, docs))
                scoring_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        share, trained = train(model, DataLoader(dataset, args.batch_size, sampler=order), steps, 1e-3, sampler, noisy,
                               screen=arm == "irdro + screen")
        train_seconds = time.perf_counter() - t0
        with torch.no_grad():
            held = float(model(held_out).mean())
        results[arm] = {"held_out_loss": held, "noise_draws": share, "noise_trained": trained,
                        "scoring_cost": scoring_seconds / train_seconds}
        cut = f", cut {sampler.stats()['truncated_fraction']:.1%}" if sampler is not None else ""
        print(f"{arm:>22}: held-out clean loss {held:.4f} nats/byte, draws on random documents {share:.1%} "
              f"(share {float(noisy.float().mean()):.1%}), trained on {trained:.1%}{cut}", flush=True)
    print(f"the scoring pass took {results['irdro + scoring pass']['scoring_cost']:.0%} of the continual training's "
          "time", flush=True)
    return results


if __name__ == "__main__":
    main()
