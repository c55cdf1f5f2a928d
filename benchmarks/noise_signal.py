"""Why the defaults keep a small share of the oracle's gain on some noisy classifiers (issue 18): is it the
signal (the running losses do not separate wrong labels from clean hard samples) or the cut's placement
(they do, and the cut stops short)?

For every noisy labelled configuration of the task suite (noise >= 10%, Gaussian-mixture and digits) and seed,
the defaults run with the class labels as groups (``tasks.run_arm``, the suite's ``irdro`` arm). At the end of
training, over the samples seen at least once:

* ``cut`` and ``recall``: the share of samples the cut removes and the share of wrong labels among them
  found (``kept_mask`` of the sampler's own rule and table);
* ``AUC``: how well a score ranks wrong labels above clean ones (0.5 = chance), for the running loss divided
  by its class's median (what a per-class cut judges) and for the same of a slow signal, the mean of every
  loss the sample reported (what the table would hold in a 4-byte column; tracked here outside the library
  by wrapping ``IRDROSampler.update``);
* ``P@k``: the share of wrong labels among the k samples with the highest score, k = the number of wrong
  labels: what the best cut on that score could reach;
* the suite's oracle gain and the defaults' share of it (7 seeds, from ``task_suite_out/runs.jsonl``).

    python benchmarks/noise_signal.py --seeds 2 --results benchmarks/RESULTS_noise_signal.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (ties count half): the Mann-Whitney U."""
    from scipy.stats import rankdata

    ranks = rankdata(score)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def class_relative(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``values`` divided by the median of their class (NaN where unseen)."""
    out = np.full_like(values, np.nan)
    for k in np.unique(labels):
        member = labels == k
        if np.isfinite(values[member]).any():
            out[member] = values[member] / max(float(np.nanmedian(values[member])), 1e-12)
    return out


def precision_at_k(score: np.ndarray, positive: np.ndarray, k: int) -> float:
    order = np.argsort(-np.where(np.isfinite(score), score, -np.inf), kind="stable")
    return float(positive[order[:k]].mean()) if k else float("nan")


def suite_oracle(runs: Path, seeds: int) -> dict[str, tuple[float, float]]:
    """``{configuration: (oracle gain, defaults' share of it)}`` from the suite's runs (mean paired deltas)."""
    by: dict[tuple[str, str], dict[int, float]] = {}
    for line in runs.read_text().splitlines():
        r = json.loads(line)
        if r["seed"] < seeds and r["arm"] in ("uniform", "oracle", "irdro"):
            by.setdefault((r["config"], r["arm"]), {})[r["seed"]] = r["score"]
    out = {}
    for (name, arm), scores in by.items():
        if arm != "uniform":
            continue
        uni = scores
        ora, ird = by.get((name, "oracle"), {}), by.get((name, "irdro"), {})
        both = sorted(set(uni) & set(ora) & set(ird))
        if both:
            gain = float(np.mean([ora[s] - uni[s] for s in both]))
            mine = float(np.mean([ird[s] - uni[s] for s in both]))
            out[name] = (gain, mine / gain if gain > 0 else float("nan"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated configuration names (default: every noisy classifier)")
    ap.add_argument("--results", default=None, help="write the markdown report here")
    args = ap.parse_args(argv)
    import torch
    from task_suite_families import make_task
    from tasks import run_arm
    from tqdm import tqdm

    from irdro_sampler import IRDROSampler
    from irdro_sampler.weights import kept_mask

    torch.set_num_threads(1)
    configs = [c for c in json.loads((HERE / "task_suite_configs.json").read_text())["configs"]
               if c["family"] in ("gmm", "digits") and c["noise"] >= 0.1]
    if args.only:
        configs = [c for c in configs if c["name"] in args.only.split(",")]
    update = IRDROSampler.update
    rows = []
    for cfg in tqdm(configs, desc="configurations"):
        cells = []
        for seed in range(args.seeds):
            task = make_task(cfg, seed)
            n = len(task.y)
            total, count = np.zeros(n), np.zeros(n)

            def recording(self, indices, losses, step=None, total=total, count=count):
                np.add.at(total, np.asarray(indices), np.asarray(losses, dtype=np.float64))
                np.add.at(count, np.asarray(indices), 1)
                return update(self, indices, losses, step=step)

            end: dict = {}

            def at_end(epoch, sampler, drawn, end=end):
                table = sampler.table
                end["cut"] = ~kept_mask(table.losses, sampler.rule.fit(table), table.groups, first=table.first_losses)
                end["running"] = table.losses.astype(np.float64)

            IRDROSampler.update = recording
            try:
                run_arm(task, "irdro", {"groups": "labels"}, seed, on_epoch_end=at_end)
            finally:
                IRDROSampler.update = update
            seen, noisy, labels = count > 0, task.noisy, task.y.numpy()
            mean = np.where(seen, total / np.maximum(count, 1), np.nan)
            running, slow = class_relative(end["running"], labels), class_relative(mean, labels)
            k = int(noisy[seen].sum())
            cells.append([end["cut"].mean(), (end["cut"] & noisy).sum() / max(noisy.sum(), 1),
                          auc(running[seen], noisy[seen]), auc(slow[seen], noisy[seen]),
                          precision_at_k(running[seen], noisy[seen], k), precision_at_k(slow[seen], noisy[seen], k)])
        rows.append((cfg, np.mean(cells, axis=0)))
    oracle = suite_oracle(HERE / "task_suite_out" / "runs.jsonl", 7)
    lines = ["| configuration | noise | oracle gain / defaults' share (suite, 7 seeds) | cut | recall | AUC running / mean "
             "| P@k running / mean |", "|---|---|---|---|---|---|---|"]
    for cfg, m in rows:
        gain, share = oracle.get(cfg["name"], (float("nan"), float("nan")))
        lines.append(f"| `{cfg['name']}` | {cfg['noise']:.2f} | {gain:+.3f} / {share:+.2f} | {m[0]:.3f} | {m[1]:.2f} | "
                     f"{m[2]:.3f} / {m[3]:.3f} | {m[4]:.2f} / {m[5]:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.results:
        command = "python benchmarks/noise_signal.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.results).write_text(
            "## Signal or placement: what the running losses know about wrong labels (issue 18)\n\n"
            f"Command: `{command}`\n\n{args.seeds} seed(s) per configuration; defaults with the class labels as "
            "groups; scores are relative to the class's median; AUC and P@k over the samples seen at least once. "
            "See the module docstring for the definitions.\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
