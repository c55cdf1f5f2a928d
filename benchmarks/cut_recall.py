"""Diagnostic: how much of the label noise the default cut finds, epoch by epoch, on a digits task.

Trains the ``irdro`` arm of the quality benchmark (library defaults, class labels as groups) and after
each listed epoch refits the rule on the loss table and reports the cut: its share of the samples,
its precision (noisy share of the cut) and recall (cut share of the noisy), the median running loss of
clean and of noisy samples (nan until feedback is applied: the default ``feedback_delay`` is 32
steps), and the noisy samples' share of all draws so far. Explains the gain cells
the defaults miss in ``RESULTS.md`` §3 (a few seconds per run):

    python benchmarks/cut_recall.py --family digits-pair --noise 0.2 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks  # noqa: E402

from irdro_sampler.weights import kept_mask  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="digits-pair", choices=["digits-pair", "digits-symmetric"])
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", default="1,2,3,5,10,20,40", help="epochs after which to report")
    args = ap.parse_args(argv)
    report_at = {int(e) for e in args.epochs.split(",")}
    task = tasks.make_task(args.family, args.noise, args.seed)
    noisy = task.noisy
    print(f"{args.family}, noise {args.noise:g}, seed {args.seed}: {noisy.size} training samples, {noisy.sum()} noisy")
    print("epoch  cut   precision  recall  median loss clean / noisy  noise share of draws")

    def on_epoch_end(epoch: int, sampler, drawn: np.ndarray) -> None:
        if epoch not in report_at:
            return
        table = sampler.table
        cut = ~kept_mask(table.losses, sampler.rule.fit(table), table.groups)
        seen = table.counts > 0
        clean_med = np.median(table.losses[seen & ~noisy]) if (seen & ~noisy).any() else float("nan")
        noisy_med = np.median(table.losses[seen & noisy]) if (seen & noisy).any() else float("nan")
        precision = noisy[cut].mean() if cut.any() else float("nan")
        print(f"{epoch:5d}  {cut.mean():.3f}  {precision:9.2f}  {cut[noisy].mean():6.2f}  "
              f"{clean_med:12.3f} / {noisy_med:.3f}  {drawn[noisy].sum() / drawn.sum():20.3f}")

    result = tasks.run_arm(task, "irdro", {"groups": "labels"}, args.seed, on_epoch_end=on_epoch_end)
    print(f"test accuracy {result['score']:.3f}, rare classes {result['rare']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
