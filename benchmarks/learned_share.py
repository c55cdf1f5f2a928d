"""Diagnostic behind ``cut_learned_ratio`` (issue 18): of the samples the cut *without* the gate removes at the
end of training, the share whose running loss has fallen to at most r times its first loss, clean and noisy
apart, on task-suite configurations (open loop: the gate is off, the first losses are only recorded).

    python benchmarks/learned_share.py --only 11-digits-clean,20-gmm-pair19 --seeds 2 [--no-groups]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RATIOS = (0.5, 0.3, 0.2, 0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", required=True, help="comma-separated configuration names of the suite")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--no-groups", action="store_true", help="pass no groups (default: the class labels)")
    args = ap.parse_args(argv)
    import torch
    from task_suite_families import make_task
    from tasks import run_arm

    from irdro_sampler import IRDROSampler
    from irdro_sampler.weights import kept_mask

    torch.set_num_threads(1)
    configs = {c["name"]: c for c in json.loads((HERE / "task_suite_configs.json").read_text())["configs"]}
    build = IRDROSampler.__init__

    def recording(self, *a, **k):  # the gate off, the first losses kept all the same
        build(self, *a, **k)
        self.table.track_first_losses()

    IRDROSampler.__init__ = recording
    options = {"cut_learned_ratio": None, **({} if args.no_groups else {"groups": "labels"})}
    print("configuration, seed, cut share; per r: share of the cut clean / noisy samples at <= r x first loss")
    try:
        for name in args.only.split(","):
            for seed in range(args.seeds):
                task = make_task(configs[name], seed)
                end: dict = {}

                def at_end(epoch, sampler, drawn, end=end):
                    table = sampler.table
                    end["cut"] = ~kept_mask(table.losses, sampler.rule.fit(table), table.groups)
                    end["ratio"] = table.losses / table.first_losses

                run_arm(task, "irdro", dict(options), seed, on_epoch_end=at_end)
                cut, ratio, noisy = end["cut"], end["ratio"], task.noisy
                cells = []
                for r in RATIOS:
                    clean, bad = cut & ~noisy, cut & noisy
                    cells.append(f"r={r}: {np.mean(ratio[clean] <= r) if clean.any() else float('nan'):.2f} / "
                                 f"{np.mean(ratio[bad] <= r) if bad.any() else float('nan'):.2f}")
                print(f"{name} s{seed} cut {cut.mean():.3f} | " + " | ".join(cells), flush=True)
    finally:
        IRDROSampler.__init__ = build
    return 0


if __name__ == "__main__":
    sys.exit(main())
