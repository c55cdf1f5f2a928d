"""The quality benchmark's map-style families (digits classification, diabetes regression).

Runs every arm over seeds and noise shares (in parallel processes), saves one JSON per family, and
formats the tables, the paired deltas to uniform and the target verdicts. Called by
``benchmarks/quality.py --families ...``; the data, model and training loop are in ``tasks.py``.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def with_option_off(arms: dict[str, dict[str, Any] | None], option: str,
                    off: Any = None) -> dict[str, dict[str, Any] | None]:
    """``arms`` with ``option`` set to ``off`` (None, or False for a flag) in every sampler arm but the defaults
    (``irdro``, ``irdro-nogroups``): the arms whose runs were made before ``option`` became a default keep their
    runs' options."""
    return {name: (opts if opts is None or name in ("irdro", "irdro-nogroups") else {**opts, option: off})
            for name, opts in arms.items()}


def with_old_default(arms: dict[str, dict[str, Any] | None], option: str,
                     old: Any) -> dict[str, dict[str, Any] | None]:
    """``arms`` with ``option`` at its ``old`` default in every sampler arm that does not name it, but the
    defaults' (``irdro``, ``irdro-nogroups``): the arms whose runs were made before the default changed keep
    their runs' options, and an arm that names the option keeps its own."""
    return {name: (opts if opts is None or name in ("irdro", "irdro-nogroups") or option in opts
                   else {**opts, option: old}) for name, opts in arms.items()}


#: Arm name -> IRDROSampler options (None: not an IRDROSampler arm). ``groups="labels"`` passes the
#: class labels as groups, which is how a classifier is meant to call the sampler.
TASK_ARMS: dict[str, dict[str, Any] | None] = {
    "uniform": None,  # shuffled epochs, DataLoader(shuffle=True)
    "oracle": None,  # shuffled epochs over the clean samples only
    "reweight": None,  # the paper's in-batch softmax reweighting on shuffled epochs
    "irdro": {"groups": "labels"},  # the library's defaults (labels as groups for classifiers)
    "irdro-nogroups": {},  # the defaults without labels
    "irdro-nocut": {"groups": "labels", "truncate_zscore": None},
    "irdro-logz": {"groups": "labels", "cut_rule": "log-zscore"},
    "irdro-mixture": {"groups": "labels", "cut_rule": "mixture"},
    "irdro-tau1": {"groups": "labels", "temperature": 1.0},  # the previous fixed temperature
    "irdro-ess0.8": {"groups": "labels", "ess_fraction": 0.8},  # a stronger tilt
    # Tried on the cells where the defaults miss a gain target (issue 10): a weaker tilt, a tighter cut,
    # a longer loss memory, a smaller floor.
    "irdro-ess0.95": {"groups": "labels", "ess_fraction": 0.95},
    "irdro-z3": {"groups": "labels", "truncate_zscore": 3.0},
    "irdro-ema0.8": {"groups": "labels", "ema": 0.8},
    "irdro-floor0.05": {"groups": "labels", "uniform_mix": 0.05},
}
# The arms above but the defaults were run before the cut was gated on the first losses (issue 18): they keep
# their runs' options with the gate off; the defaults' runs from then are the two "-ungated" arms.
TASK_ARMS = with_option_off(TASK_ARMS, "cut_learned_ratio")
TASK_ARMS.update({"irdro-ungated": {"groups": "labels", "cut_learned_ratio": None},
                  "irdro-nogroups-ungated": {"cut_learned_ratio": None}})
# A lower z-score with groups, with the defaults' gate (issue 18): better on the task suite with groups, worse
# on these families, so not adopted (RESULTS_suite_z25.md).
TASK_ARMS["irdro-z25"] = {"groups": "labels", "truncate_zscore": 2.5}
# Every arm above was run before the tilt's strength followed the share of the losses' spread the groups explain
# (group_tilt_share, issue 18): they keep their runs' options without it. On these families the groups explain
# 0.6-0.7 of it, so the defaults' runs are unchanged (RESULTS_suite_group_tilt.md).
TASK_ARMS = with_option_off(TASK_ARMS, "group_tilt_share")
# The tilt at full strength already where the groups explain half of the losses' spread (issue 18; the
# default is 1.0: the strength is the share itself; RESULTS_suite_group_tilt.md).
TASK_ARMS["irdro-tilt-share05"] = {"groups": "labels", "group_tilt_share": 0.5}
# Every arm above was run before the tilt faded with the share the cut removes (tilt_fade_cut=0.2, the default
# since issue 18; RESULTS_suite_tilt_fade.md): they keep their runs' options without it. The defaults before it
# are the two "-nofade" arms (the defaults' runs now were named "irdro(-nogroups)-fade02" until then;
# RESULTS_quality.md).
TASK_ARMS = with_option_off(TASK_ARMS, "tilt_fade_cut")
TASK_ARMS.update({"irdro-nofade": {"groups": "labels", "tilt_fade_cut": None},
                  "irdro-nogroups-nofade": {"tilt_fade_cut": None}})
# Every arm above was run before the fade stopped counting a block of unlearnable samples the cut takes whole
# (tilt_fade_skip_block=True, the default since issue 18; RESULTS_quality_fadeblock_lm8.md): they keep their runs'
# options with it off. The defaults before it are the two "-fadecount" arms.
TASK_ARMS = with_option_off(TASK_ARMS, "tilt_fade_skip_block", False)
TASK_ARMS.update({"irdro-fadecount": {"groups": "labels", "tilt_fade_skip_block": False},
                  "irdro-nogroups-fadecount": {"tilt_fade_skip_block": False}})
# The opt-in second cut where two modes of the log-losses cross (cut_rule="zscore-mode-split"; issue 18,
# RESULTS_suite_split.md), with groups.
TASK_ARMS["irdro-split"] = {"groups": "labels", "cut_rule": "zscore-mode-split"}
# The same, only in a class whose median lies below the split (cut_rule="zscore-mode-split-majority").
TASK_ARMS["irdro-split-majority"] = {"groups": "labels", "cut_rule": "zscore-mode-split-majority"}
# Every arm above was run before the split's gated form became the default cut_rule (issue 18;
# RESULTS_suite_split_gated.md): they keep "zscore-mode". The defaults before it are "irdro-split-off" (its runs
# are those named "irdro" until then; without groups the two rules are the same).
TASK_ARMS = with_old_default(TASK_ARMS, "cut_rule", "zscore-mode")
TASK_ARMS["irdro-split-off"] = {"groups": "labels", "cut_rule": "zscore-mode"}
# A group's lower z-score with a milder gate and the loop's first-visit screen: passes the task suite's targets
# with groups, costs these digits' rare classes their gain (RESULTS_suite_group_z.md).
TASK_ARMS["irdro-z20-screen-l7"] = {"groups": "labels", "truncate_zscore": 2.0, "cut_learned_ratio": 0.7,
                                    "screen_first": True}
#: Arms that only make sense where there are labels.
CLASSIFIER_ONLY = ("irdro-nogroups", "irdro-nogroups-ungated", "irdro-z25", "irdro-tilt-share05", "irdro-split",
                   "irdro-split-majority", "irdro-nogroups-nofade", "irdro-nogroups-fadecount", "irdro-split-off",
                   "irdro-z20-screen-l7")
METRICS = ("score", "rare", "worst")


def _one(job: tuple[str, float, int, str]) -> tuple[tuple[str, float, int, str], dict[str, Any]]:
    import torch
    from tasks import make_task, run_arm

    torch.set_num_threads(1)
    family, noise, seed, arm = job
    task = make_task(family, noise, seed)
    options = TASK_ARMS[arm]
    if options is not None and task.kind != "classification":
        options = {k: v for k, v in options.items() if k != "groups"}
    return job, run_arm(task, arm if options is None else "irdro", options, seed)


def run_family(family: str, noises: list[float], seeds: int, arms: list[str], jobs: int,
               progress: bool = True) -> dict[str, Any]:
    """Every (noise, seed, arm) run of one family; returns {noise: {arm: [result per seed]}}."""
    from tqdm import tqdm

    if family == "diabetes":
        arms = [a for a in arms if a not in CLASSIFIER_ONLY]
    todo = [(family, n, s, a) for n in noises for s in range(seeds) for a in arms]
    out: dict[str, dict[str, list]] = {f"{n:g}": {a: [None] * seeds for a in arms} for n in noises}
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker) as pool:
        for (_fam, n, s, a), res in tqdm(pool.map(_one, todo), total=len(todo), desc=family, disable=not progress):
            out[f"{n:g}"][a][s] = res
    return out


def _init_worker() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def verdict(results: dict[str, list[dict]], arm: str, noise: float, classification: bool) -> dict[str, Any]:
    """Paired deltas of ``arm`` to uniform and the issue's targets for the defaults."""
    base = results["uniform"]
    v: dict[str, Any] = {}
    for m in METRICS:
        d = np.array([r[m] - b[m] for r, b in zip(results[arm], base, strict=True)])
        spread = max(float(np.std([b[m] for b in base], ddof=1)), float(d.std(ddof=1)))
        v[m] = (float(d.mean()), spread)
    ok = {
        "score_no_worse": v["score"][0] >= -v["score"][1],
        "rare_no_worse": v["rare"][0] >= -v["rare"][1] and v["worst"][0] >= -v["worst"][1],
        "never_starved": all(r["rare_draws"] >= 0.5 * r["rare_share"] for r in results[arm]),
    }
    if noise > 0:
        ok["fewer_noise_draws"] = np.mean([r["noise_draws"] for r in results[arm]]) < np.mean(
            [r["noise_share"] for r in results[arm]])
        if classification:
            ok["gain_over_2_spread"] = v["score"][0] > 2 * v["score"][1]
    v["targets"] = ok
    return v


def format_family(family: str, data: dict[str, Any], seeds: int) -> list[str]:
    classification = family.startswith("digits")
    unit = "accuracy" if classification else "negated RMSE (target units)"
    lines = [f"### {family} ({seeds} seeds; metric: {unit}, higher is better)", ""]
    for noise, results in data.items():
        n = float(noise)
        lines += [f"#### noise {100 * n:g}%", "",
                  "| arm | score | rare | worst | Δscore | Δrare | Δworst | noise draws / share | rare draws / share | cut |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for arm, runs in results.items():
            mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if isinstance(runs[0][k], float)}
            v = verdict(results, arm, n, classification) if arm != "uniform" else None
            fmt = "{:.3f}" if classification else "{:.1f}"
            deltas = ["" if v is None else f"{v[m][0]:+.3f} ± {v[m][1]:.3f}" if classification
                      else f"{v[m][0]:+.1f} ± {v[m][1]:.1f}" for m in METRICS]
            lines.append(
                f"| `{arm}` | " + " | ".join(fmt.format(mean[m]) for m in METRICS) + " | " + " | ".join(deltas)
                + f" | {mean['noise_draws']:.3f} / {mean['noise_share']:.3f} | {mean['rare_draws']:.3f} / "
                f"{mean['rare_share']:.3f} | {mean.get('truncated_fraction', float('nan')):.2f} |"
            )
        lines.append("")
        v = verdict(results, "irdro", n, classification)
        passed = ", ".join(f"{k} {'PASS' if ok else 'FAIL'}" for k, ok in v["targets"].items())
        lines += [f"Targets for the defaults (`irdro`): {passed}.", ""]
    return lines


def plot_family(family: str, data: dict[str, Any], path: Path) -> None:
    """Paired Δscore to uniform per arm and noise share, with the spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noises = list(data)
    arms = [a for a in next(iter(data.values())) if a != "uniform"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(noises)
    for k, noise in enumerate(noises):
        vs = [verdict(data[noise], a, float(noise), family.startswith("digits"))["score"] for a in arms]
        ax.bar(np.arange(len(arms)) + k * width, [d for d, _ in vs], width, yerr=[s for _, s in vs],
               label=f"noise {100 * float(noise):g}%", capsize=2)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(arms)) + width * (len(noises) - 1) / 2, arms, rotation=30, ha="right")
    ax.set_ylabel("Δ score vs uniform (paired)")
    ax.set_title(f"{family}: paired difference to shuffled uniform epochs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_or_run(family: str, noises: list[float], seeds: int, arms: list[str], out: Path, jobs: int,
                fresh: bool) -> dict[str, Any]:
    path = out / family / "results.json"
    wanted = [a for a in arms if not (family == "diabetes" and a in CLASSIFIER_ONLY)]
    if path.exists() and not fresh:
        saved = json.loads(path.read_text())
        if saved["seeds"] == seeds and all(f"{n:g}" in saved["data"] for n in noises):
            missing = [a for a in wanted if any(a not in saved["data"][f"{n:g}"] for n in noises)]
            if missing:  # run only the arms not saved yet (e.g. after the defaults changed) and keep the rest
                new = run_family(family, noises, seeds, missing, jobs)
                for n in noises:
                    saved["data"][f"{n:g}"].update(new[f"{n:g}"])
                path.write_text(json.dumps(saved, indent=1))
                plot_family(family, {f"{n:g}": saved["data"][f"{n:g}"] for n in noises}, path.parent / "delta_score.png")
            return {f"{n:g}": saved["data"][f"{n:g}"] for n in noises}
    data = run_family(family, noises, seeds, arms, jobs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seeds": seeds, "data": data}, indent=1))
    plot_family(family, data, path.parent / "delta_score.png")
    return data
