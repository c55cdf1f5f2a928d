"""Randomised task suite (issue 18): does the sampler harm tasks nobody tuned it for?

A seeded generator draws task configurations (:func:`draw_configs`): a family (Gaussian-mixture or digits
classification with 5-50 classes and class sizes from flat to Zipf, tabular regression with light or
heavy tails, the demo's byte LM), a noise kind and share (none, symmetric or class-pair label flips,
outlier targets, random-byte documents; 5-30%), model width and depth, learning rate, batch size and
epochs. The list was drawn once and is committed as ``task_suite_configs.json``; ``--draw`` rewrites it
(the test checks that it reproduces from its seed). Families: ``task_suite_families.py``; training loop
and arms: ``tasks.run_arm`` (the quality benchmark's).

Arms, every one from the same initial model with the same steps and batch size per (configuration,
seed): ``uniform`` (shuffled epochs), ``oracle`` (shuffled epochs over the clean samples only; at 0%
noise it *is* uniform and is not re-run), ``irdro`` (library defaults, groups = the class labels, or
for the LM the documents' source domains; not run on regression, which has no labels), ``irdro-nogroups``
(library defaults, no groups), ``reweight`` (the paper's in-batch KL-DRO reweighting of shuffled
batches).

Report (``RESULTS_suite.md`` and PNGs): per configuration the paired deltas to uniform on the main
metric and the rare group's metric, the seed spread (the larger of uniform's std over seeds and the
paired deltas' std), "harmed" (worse than uniform by more than the spread on the main or the rare
metric), the fraction of configurations harmed per arm, the share of the oracle's gain captured at
noise >= 10% and the fraction of samples cut at 0% noise (``sampler.stats()["truncated_fraction"]`` at
the end of training, as in the quality benchmark).

Runs are appended to ``--out``/runs.jsonl as they finish, so an interrupted run resumes::

    nice -n 10 python benchmarks/task_suite.py            # the whole suite, 3 seeds (< 1 hour on 2 cores)
    python benchmarks/task_suite.py --quick               # a handful of configurations, 1 seed (CI)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality_tasks import with_old_default, with_option_off  # noqa: E402  (found through the path above)

CONFIGS_PATH = HERE / "task_suite_configs.json"
#: Appended to the full suite's RESULTS_suite.md: the reading of the last full run's figures.
NOTES_PATH = HERE / "task_suite_notes.md"
SUITE_SEED = 18
#: Arm name -> IRDROSampler options (None: not an IRDROSampler arm), as in quality_tasks.TASK_ARMS.
ARMS: dict[str, dict[str, Any] | None] = {
    "uniform": None,
    "oracle": None,
    "irdro": {"groups": "labels"},  # the library's defaults
    "irdro-nogroups": {},
    # The defaults before issue 18 (cut_rule="zscore"; the runs named irdro* before the default changed).
    "zscore": {"groups": "labels", "cut_rule": "zscore"},
    "zscore-nogroups": {"cut_rule": "zscore"},
    "reweight": None,
    # Cut rules that need evidence of noise (issue 18; RESULTS_suite_rules.md): run with --arms.
    "mixture-valley": {"groups": "labels", "cut_rule": "mixture-valley"},
    "mixture-valley-nogroups": {"cut_rule": "mixture-valley"},
    "mixture-valley-agree": {"groups": "labels", "cut_rule": "mixture-valley-agree"},
    "tail-normal": {"groups": "labels", "cut_rule": "tail-normal"},
    "tail-normal-nogroups": {"cut_rule": "tail-normal"},
    "tail-normal-agree": {"groups": "labels", "cut_rule": "tail-normal-agree"},
    "tail-normal-soft-nogroups": {"cut_rule": "tail-normal", "ess_fraction": 0.97},  # and a milder tilt
    "tail-normal-wide-nogroups": {"cut_rule": "tail-normal-wide"},
    "tail-normal-wide": {"groups": "labels", "cut_rule": "tail-normal-wide"},
    "tail-exp": {"groups": "labels", "cut_rule": "tail-exp"},
    "tail-exp-nogroups": {"cut_rule": "tail-exp"},
    # The tilt capped at the z-score threshold (tilt_cap="zscore"), the cut left to an evidence rule or off.
    "capped-valley-nogroups": {"tilt_cap": "zscore", "cut_rule": "mixture-valley"},
    "capped-valley": {"groups": "labels", "tilt_cap": "zscore", "cut_rule": "mixture-valley"},
    "capped-nocut-nogroups": {"tilt_cap": "zscore", "truncate_zscore": None},
    "capped-nocut": {"groups": "labels", "tilt_cap": "zscore", "truncate_zscore": None},
    "capped-wide-nogroups": {"tilt_cap": "zscore", "cut_rule": "tail-normal-wide"},
    "capped-wide": {"groups": "labels", "tilt_cap": "zscore", "cut_rule": "tail-normal-wide"},
    "capped-valley-soft-nogroups": {"tilt_cap": "zscore", "cut_rule": "mixture-valley", "ess_fraction": 0.97},
    "capped-wide-soft-nogroups": {"tilt_cap": "zscore", "cut_rule": "tail-normal-wide", "ess_fraction": 0.97},
    # The z-score, amended (RESULTS_suite_rules.md "Amended z-score"): the mixture's valley where a separate
    # high mode sits below the robust threshold; per group, agreement with or shrinkage to all samples.
    "zscore-mode-nogroups": {"cut_rule": "zscore-mode"},
    "zscore-mode": {"groups": "labels", "cut_rule": "zscore-mode"},
    "zscore-agree": {"groups": "labels", "cut_rule": "zscore-agree"},
    "zscore-shrunk": {"groups": "labels", "cut_rule": "zscore-shrunk"},
    # Milder defaults: a larger uniform floor (cut samples drawn at 30% of their share, not 10%), or a
    # milder tilt (ESS 0.95).
    "mix03-nogroups": {"uniform_mix": 0.3, "cut_rule": "zscore"},
    "mix03": {"groups": "labels", "uniform_mix": 0.3, "cut_rule": "zscore"},
    "ess095-nogroups": {"ess_fraction": 0.95, "cut_rule": "zscore"},
    "ess095": {"groups": "labels", "ess_fraction": 0.95, "cut_rule": "zscore"},
    # A floor under the cut for cross-entropy (not run on regression): a sample the model classifies right
    # (loss <= log 2: p(label) >= 1/2) is never cut.
    "cefloor-nogroups": {"cut_floor": math.log(2), "cut_rule": "zscore"},
    "cefloor": {"groups": "labels", "cut_floor": math.log(2), "cut_rule": "zscore"},
    # The defaults taken apart (RESULTS_suite_parts.md): the sampler with flat weights (no tilt, no cut: a
    # null arm that calibrates how often "harmed" fires by chance), the tilt alone (no cut) and the cut
    # alone (a flat tilt; tau = 1e30 so that it is flat at any loss scale, regression targets up to 1e3 included).
    "flat-nogroups": {"temperature": 1e30, "truncate_zscore": None},
    "tilt-only-nogroups": {"truncate_zscore": None},
    "tilt-only": {"groups": "labels", "truncate_zscore": None},
    "cut-only-nogroups": {"temperature": 1e30},
    "cut-only": {"groups": "labels", "temperature": 1e30},
}
# Every arm above was run before the cut was gated on the first losses (cut_learned_ratio, the default since
# issue 18): it keeps its runs' options with the gate off.
ARMS = with_option_off(ARMS, "cut_learned_ratio")
ARMS.update({
    # The defaults before the gate (the runs named irdro* until then; RESULTS_suite_learned.md).
    "ungated": {"groups": "labels", "cut_learned_ratio": None},
    "ungated-nogroups": {"cut_learned_ratio": None},
    # A stricter gate: spared only once the loss has fallen to a quarter of its first.
    "learned25-nogroups": {"cut_learned_ratio": 0.25},
    "learned25": {"groups": "labels", "cut_learned_ratio": 0.25},
    # The gate also spares a sample measured only once (its running loss is still its first loss).
    "remeasured-nogroups": {"cut_remeasured_only": True},
    "remeasured": {"groups": "labels", "cut_remeasured_only": True},
    # The cut only where the losses over all samples have an upper tail heavier than a log-normal bulk.
    "evidence-nogroups": {"cut_rule": "zscore-evidence"},
    "evidence": {"groups": "labels", "cut_rule": "zscore-evidence"},
    # A lower z-score: with the gate sparing what is being learned, can the cut take more of the flips?
    "z25-nogroups": {"truncate_zscore": 2.5},
    "z25": {"groups": "labels", "truncate_zscore": 2.5},
    # The defaults taken apart again, with the gate: the cut alone (a flat tilt).
    "cut-only-gated": {"groups": "labels", "temperature": 1e30},
    "cut-only-gated-nogroups": {"temperature": 1e30},
})
# Every arm above was run before the tilt's strength followed the share of the losses' spread the groups
# explain (group_tilt_share, the default since issue 18): it keeps its runs' options without it.
ARMS = with_option_off(ARMS, "group_tilt_share")
ARMS.update({
    # The defaults before the adaptation (the runs named irdro until then; RESULTS_suite_group_tilt.md).
    "group-tilt-off": {"groups": "labels", "group_tilt_share": None},
    # Full strength already where the groups explain a quarter or half of the spread (stronger tilts than the
    # default 1.0, where the strength is the share itself; its runs were named group-tilt10 before it became
    # the default).
    "group-tilt025": {"groups": "labels", "group_tilt_share": 0.25},
    "group-tilt05": {"groups": "labels", "group_tilt_share": 0.5},
})
# Every arm above was run before the tilt faded with the cut's share (tilt_fade_cut=0.2, the default since
# issue 18): it keeps its runs' options without the fade.
ARMS = with_option_off(ARMS, "tilt_fade_cut")
ARMS.update({
    # The defaults before the fade (the runs named irdro* until then; the defaults' runs now were named
    # fade02* before it became the default; RESULTS_suite_tilt_fade.md).
    "fade-off": {"groups": "labels", "tilt_fade_cut": None},
    "fade-off-nogroups": {"tilt_fade_cut": None},
    # A lower floor: cut samples drawn at 2% of their share, not 10% (RESULTS_suite_mix002.md).
    "mix002": {"groups": "labels", "uniform_mix": 0.02},
    "mix002-nogroups": {"uniform_mix": 0.02},
    # A milder gate: spared once the loss has fallen below 0.9 of its first; rejected: the outliers' losses
    # fall that far from the untrained model's (RESULTS_suite_learned90.md).
    "learned90": {"groups": "labels", "cut_learned_ratio": 0.9},
    "learned90-nogroups": {"cut_learned_ratio": 0.9},
    # The z-score on sqrt(loss): a squared error's residual scale (a normal residual: 0.6% cut, not 10%).
    "root": {"groups": "labels", "cut_rule": "zscore-mode-root"},
    "root-nogroups": {"cut_rule": "zscore-mode-root"},
})
# Every arm above was run before the fade stopped counting a block of unlearnable samples the cut takes whole
# (tilt_fade_skip_block=True, the default since issue 18): it keeps its runs' options with it off.
ARMS = with_option_off(ARMS, "tilt_fade_skip_block", False)
ARMS.update({
    # The defaults before (the runs named irdro* until then); the defaults' runs now were made as the opt-in
    # fadeblock* arms (RESULTS_suite_fadeblock.md), which keep their name for that report's command.
    "fadecount": {"groups": "labels", "tilt_fade_skip_block": False},
    "fadecount-nogroups": {"tilt_fade_skip_block": False},
    "fadeblock": {"groups": "labels", "tilt_fade_skip_block": True},
    "fadeblock-nogroups": {"tilt_fade_skip_block": True},
    # A scoring pass before training (IRDROSampler.prime with the starting model's losses on every sample): for
    # continual training over few passes, where most draws are first visits the loss cannot steer. A recipe,
    # not an option: run on the byte LM only (--only lm; the other families start from an untrained model).
    "scored": {"groups": "labels", "score_first": True},
    "scored-nogroups": {"score_first": True},
    # A bound, not a rule: the cut threshold on the running loss re-chosen at every refit with the noise labels
    # (the fewest misclassified samples), no gate (threshold_bound.py; RESULTS_suite_threshold_bound.md).
    "best-threshold": {"groups": "labels", "cut_oracle": True, "cut_learned_ratio": None},
    "best-threshold-nogroups": {"cut_oracle": True, "cut_learned_ratio": None},
    # Otsu's split of the log-losses over all samples as a second cut (per group floored at the group's 0.7
    # quantile): the placement the bound points to (RESULTS_suite_split.md).
    "split": {"groups": "labels", "cut_rule": "zscore-mode-split"},
    "split-nogroups": {"cut_rule": "zscore-mode-split"},
    # The split only in a group whose median lies below it (without groups the rule is "zscore-mode", the
    # defaults' arm): RESULTS_suite_split_majority.md.
    "split-majority": {"groups": "labels", "cut_rule": "zscore-mode-split-majority"},
    # A slower running loss (ema=0.8: the old value's weight), nearer the mean over visits, which separates
    # wrong labels better than the running loss on the suite's classifiers (RESULTS_noise_signal.md).
    "ema08": {"groups": "labels", "ema": 0.8},
    "ema08-nogroups": {"ema": 0.8},
})
# Every arm above was run before the split's gated form became the default cut_rule (issue 18): they keep
# "zscore-mode". The defaults before it are "split-off" (its runs are those named "irdro" until then; without
# groups the two rules are the same, so "irdro-nogroups" kept its runs); RESULTS_suite_split_gated.md.
ARMS = with_old_default(ARMS, "cut_rule", "zscore-mode")
ARMS["split-off"] = {"groups": "labels", "cut_rule": "zscore-mode"}
# The defaults with the first-visit screen in the training loop (IRDROSampler.screen: a first visit the cut would
# take is left out of the step's loss): a recipe, not a sampler option; RESULTS_suite_screen.md.
ARMS["screen"] = {"groups": "labels", "screen_first": True}
ARMS["screen-nogroups"] = {"screen_first": True}
# A probe: the defaults, flat (no cut, no tilt) at a refit whose losses show no evidence of noise (evidence_gate.py).
ARMS["evidence"] = {"groups": "labels", "evidence_gate": True}
ARMS["evidence-nogroups"] = {"evidence_gate": True}
# A lower z-score with groups only (a class's own statistics judge it; without groups a lower z-score cuts rare
# classes: RESULTS_suite_z25.md, run before the gated split), and with the first-visit screen as well.
ARMS["z30-groups"] = {"groups": "labels", "truncate_zscore": 3.0}
ARMS["z25-groups"] = {"groups": "labels", "truncate_zscore": 2.5}
ARMS["z25-screen"] = {"groups": "labels", "truncate_zscore": 2.5, "screen_first": True}
# ... with a milder learned gate (a sample is spared once its loss has fallen to 0.6 / 0.7 of its first): does it
# give back the clean samples the lower z-score takes?
ARMS["z25-screen-l6"] = {"groups": "labels", "truncate_zscore": 2.5, "screen_first": True, "cut_learned_ratio": 0.6}
ARMS["z25-screen-l7"] = {"groups": "labels", "truncate_zscore": 2.5, "screen_first": True, "cut_learned_ratio": 0.7}
# The same pair of options as a sampler default with groups (no screen in the loop).
ARMS["z25-l7"] = {"groups": "labels", "truncate_zscore": 2.5, "cut_learned_ratio": 0.7}
# A still lower z-score under the milder gate (which gave back the clean cut at 2.5), with the screen:
# RESULTS_suite_group_z.md (passes the suite's targets with groups; rejected: the screen keeps a rare sub-group from
# the first visits the gate needs, and the quality benchmark's clean rare digits lose half their gain).
ARMS["z20-screen-l7"] = {"groups": "labels", "truncate_zscore": 2.0, "screen_first": True, "cut_learned_ratio": 0.7}
ARMS["z225-screen-l7"] = {"groups": "labels", "truncate_zscore": 2.25, "screen_first": True, "cut_learned_ratio": 0.7}
# A probe: the screen only inside a block of unlearnable samples (block_screen.py), with and without groups.
ARMS["screen-block"] = {"groups": "labels", "screen_first": "block"}
ARMS["screen-block-nogroups"] = {"screen_first": "block"}
#: The arms of the defaults' suite (RESULTS_suite.md); the others run only when named with --arms.
# The library's block-only screen (IRDROSampler.screen(..., block_only=True): a block placed on >= 100 seen losses).
ARMS["screen-block100"] = {"groups": "labels", "screen_first": "library-block"}
ARMS["screen-block100-nogroups"] = {"screen_first": "library-block"}
ARMS["absloss-nogroups"] = {"report_root": True}  # probe: a regression reports |y - f(x)|, not its square

BASE_ARMS = ("uniform", "oracle", "irdro", "irdro-nogroups", "reweight")
COMPARED = ("oracle", "irdro", "irdro-nogroups", "reweight")
#: Steps of one MLP run are capped (epochs are reduced to fit) at MAX_STEPS and at an estimated
#: STEP_BUDGET_MS of training (2.5 ms + 0.06 ms per sample of a batch per step, measured on the shared
#: 2-core machine) so that the suite fits in an hour...
MAX_STEPS = 700
STEP_BUDGET_MS = 3000.0
#: ... and raised to at least MIN_STEPS (a run shorter than that is not a trained model).
MIN_STEPS = 150
#: Families in the suite and how many configurations of each (drawn in a seeded order).
FAMILY_COUNTS = {"gmm": 14, "digits": 9, "regression": 13, "lm": 6}
METRICS = ("score", "rare", "worst")


# --------------------------------------------------------------------------------- configurations
def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _sig(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}")


def draw_config(rng: np.random.Generator, family: str, index: int) -> dict[str, Any]:
    """One configuration of ``family`` (plain JSON types; fully determined by ``rng``'s state)."""
    cfg: dict[str, Any] = {"name": "", "family": family, "data_seed": int(rng.integers(1 << 30))}
    kinds = {"gmm": ("symmetric", "pair"), "digits": ("symmetric", "pair"), "regression": ("outliers",),
             "lm": ("random-bytes",)}[family]
    if rng.random() < 0.25:
        cfg["noise_kind"], cfg["noise"] = "none", 0.0
    else:
        cfg["noise_kind"] = str(rng.choice(kinds))
        cfg["noise"] = round(float(rng.uniform(0.05, 0.30)), 2)
    if family == "lm":
        cfg.update(seq_len=32, common_docs=int(rng.integers(300, 601)),
                   rare_docs=int(rng.integers(30, 81)), heldout_docs=48, width=int(rng.choice([32, 48, 64])),
                   layers=int(rng.integers(1, 3)), lr=_sig(_log_uniform(rng, 2e-3, 6e-3)),
                   batch_size=16, pretrain_steps=100, steps=int(rng.integers(80, 121)), epochs=1)
        cfg["pretrain_lr"] = cfg["lr"]
        n = None
    else:
        cfg.update(width=int(rng.choice([16, 32, 64, 128])), layers=int(rng.integers(1, 3)),
                   lr=_sig(_log_uniform(rng, 1e-3, 1e-2)), batch_size=int(rng.choice([16, 32, 64, 128])),
                   epochs=int(rng.integers(8, 41)), steps=None)
        from task_suite_families import zipf_sizes

        if family == "gmm":
            cfg.update(classes=int(rng.integers(5, 51)), dim=int(rng.integers(8, 33)),
                       separation=_sig(rng.uniform(1.8, 3.0)), largest_class=int(rng.integers(60, 201)),
                       zipf=_sig(rng.uniform(0.0, 1.5)), test_per_class=40)
            n = int(zipf_sizes(cfg["classes"], cfg["largest_class"], cfg["zipf"]).sum())
        elif family == "digits":
            cfg.update(classes=int(rng.integers(5, 11)), largest_class=int(rng.integers(60, 101)),
                       zipf=_sig(rng.uniform(0.0, 1.5)))
            n = int(zipf_sizes(cfg["classes"], cfg["largest_class"], cfg["zipf"]).sum())
        else:
            cfg.update(dim=int(rng.integers(4, 17)), n_train=int(rng.integers(500, 2001)),
                       rare_keep=_sig(rng.uniform(0.1, 0.3)), tails=str(rng.choice(["light", "heavy"])),
                       y_unit=_sig(10 ** rng.uniform(-1, 3)), y_offset=_sig(rng.normal(0, 3)), n_test=2000)
            n = cfg["n_train"]
        per_epoch = math.ceil(n / cfg["batch_size"])
        cap = int(min(MAX_STEPS, STEP_BUDGET_MS / (2.5 + 0.06 * cfg["batch_size"])))
        cfg["epochs"] = max(1, min(max(cfg["epochs"], -(-MIN_STEPS // per_epoch)), cap // per_epoch))
    noise = "clean" if cfg["noise_kind"] == "none" else f"{cfg['noise_kind']}{round(100 * cfg['noise'])}"
    cfg["name"] = f"{index:02d}-{family}-{noise}"
    cfg["approx_train_size"] = n
    return cfg


def draw_configs(seed: int = SUITE_SEED, counts: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The suite's configurations: ``counts`` per family, in an order shuffled by ``seed``."""
    counts = counts or FAMILY_COUNTS
    rng = np.random.default_rng(seed)
    families = [f for f, c in counts.items() for _ in range(c)]
    families = [families[i] for i in rng.permutation(len(families))]
    return [draw_config(rng, fam, i) for i, fam in enumerate(families)]


def load_configs(path: Path = CONFIGS_PATH) -> dict[str, Any]:
    return json.loads(path.read_text())


def quick_configs(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A handful for CI: the cheapest configuration of each family, plus the cheapest classifier with
    symmetric flips at >= 20% (where the oracle must beat uniform)."""
    def cost(c: dict[str, Any]) -> float:
        if c["family"] == "lm":
            return 1e9 + c["steps"] * (c["width"] + 16)
        return c["epochs"] * math.ceil(c["approx_train_size"] / c["batch_size"])

    picked = [min((c for c in configs if c["family"] == f), key=cost) for f in FAMILY_COUNTS]
    noisy = [c for c in configs if c["family"] in ("gmm", "digits") and c["noise_kind"] == "symmetric"
             and c["noise"] >= 0.2]
    extra = min(noisy, key=cost)
    if extra not in picked:
        picked.append(extra)
    return picked


def config_digest(cfg: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


def arms_for(cfg: dict[str, Any], arms: tuple[str, ...] = BASE_ARMS) -> list[str]:
    """The arms run on ``cfg``: arms that pass groups (the class labels) are not run on regression."""
    return [a for a in arms if not (cfg["family"] == "regression" and ((ARMS[a] or {}).get("groups") == "labels"
                                                                     or "cut_floor" in (ARMS[a] or {})))]


# ------------------------------------------------------------------------------------------- runs
def run_suite(configs: list[dict[str, Any]], seeds: int, out: Path, progress: bool = True,
              arms_run: tuple[str, ...] = BASE_ARMS) -> list[dict[str, Any]]:
    """Every (configuration, seed, arm) run not yet in ``out/runs.jsonl``; returns all runs of ``configs``."""
    import torch
    from task_suite_families import make_task
    from tasks import run_arm
    from tqdm import tqdm

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["digest"], r["seed"], r["arm"])] = r
    todo = [(c, s) for c in configs for s in range(seeds)]
    total = sum(len(arms_for(c, arms_run)) for c, _ in todo)
    bar = tqdm(total=total, desc="suite", disable=not progress, smoothing=0.05)
    for cfg, seed in todo:
        digest = config_digest(cfg)
        arms = arms_for(cfg, arms_run)
        missing = [a for a in arms if (digest, seed, a) not in done]
        bar.update(len(arms) - len(missing))
        if not missing:
            continue
        bar.set_postfix_str(cfg["name"])
        task = make_task(cfg, seed)
        for arm in missing:
            t0 = time.time()
            if arm == "oracle" and not task.noisy.any():  # no noise: the oracle's loader is uniform's
                res = dict(run_arm(task, "uniform", None, seed) if (digest, seed, "uniform") not in done
                           else done[(digest, seed, "uniform")])
            else:
                options = ARMS[arm]
                res = run_arm(task, arm if options is None else "irdro", options, seed)
            rec = {"config": cfg["name"], "digest": digest, "seed": seed, "arm": arm,
                   "seconds": round(time.time() - t0, 2),
                   **{k: v for k, v in res.items() if isinstance(v, float)}}
            done[(digest, seed, arm)] = rec
            with log.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.update(1)
    bar.close()
    wanted = {(config_digest(c), s, a) for c in configs for s in range(seeds) for a in arms_for(c, arms_run)}
    return [r for k, r in done.items() if k in wanted]


def completed_runs(configs: list[dict[str, Any]], seeds: int, out: Path,
                   arms_run: tuple[str, ...] = BASE_ARMS) -> list[dict[str, Any]]:
    """The runs in ``out/runs.jsonl`` of the configurations that have every (seed, arm) run."""
    log = out / "runs.jsonl"
    runs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    have = {(r["digest"], r["seed"], r["arm"]): r for r in runs}
    keep = []
    for c in configs:
        keys = [(config_digest(c), s, a) for s in range(seeds) for a in arms_for(c, arms_run)]
        if all(k in have for k in keys):
            keep += [have[k] for k in keys]
    return keep


# ---------------------------------------------------------------------------------------- analysis
def analyse(configs: list[dict[str, Any]], runs: list[dict[str, Any]], seeds: int,
            compared: tuple[str, ...] = COMPARED) -> dict[str, Any]:
    """Per configuration and arm (``compared``, which must include ``oracle``): paired deltas, spreads,
    harmed flags, oracle share, cut and draw shares; and the per-arm summary. Plain JSON types."""
    by = {(r["config"], r["arm"], r["seed"]): r for r in runs}
    rows = []
    for cfg in configs:
        name = cfg["name"]
        base = [by[(name, "uniform", s)] for s in range(seeds)]
        row: dict[str, Any] = {"config": name, "family": cfg["family"], "noise_kind": cfg["noise_kind"],
                               "noise": cfg["noise"], "uniform": {m: float(np.mean([b[m] for b in base]))
                                                                  for m in METRICS}, "arms": {}}
        for arm in compared:
            if (name, arm, 0) not in by:
                continue
            res = [by[(name, arm, s)] for s in range(seeds)]
            a: dict[str, Any] = {}
            for m in METRICS:
                d = np.array([r[m] - b[m] for r, b in zip(res, base, strict=True)])
                spread = max(float(np.std([b[m] for b in base], ddof=1)), float(d.std(ddof=1))) if seeds > 1 else 0.0
                a[m] = {"delta": float(d.mean()), "spread": spread, "worse": bool(d.mean() < -spread)}
            a["harmed"] = a["score"]["worse"] or a["rare"]["worse"]
            a["harmed_incl_worst"] = a["harmed"] or a["worst"]["worse"]
            a["better"] = bool(a["score"]["delta"] > a["score"]["spread"])
            for k in ("noise_draws", "noise_share", "rare_draws", "rare_share", "truncated_fraction"):
                if k in res[0]:
                    a[k] = float(np.mean([r[k] for r in res]))
            row["arms"][arm] = a
        oracle_gain = row["arms"]["oracle"]["score"]["delta"]
        row["oracle_gain"] = oracle_gain
        row["oracle_gain_significant"] = bool(oracle_gain > row["arms"]["oracle"]["score"]["spread"])
        for a in row["arms"].values():
            a["oracle_share"] = a["score"]["delta"] / oracle_gain if cfg["noise"] >= 0.1 and oracle_gain > 0 else None
        rows.append(row)
    summary = {}
    for arm in compared:
        have = [r for r in rows if arm in r["arms"]]
        clean = [r for r in have if r["noise"] == 0]
        noisy = [r for r in have if r["noise"] >= 0.1]
        shares = [r["arms"][arm]["oracle_share"] for r in noisy if r["arms"][arm]["oracle_share"] is not None]
        shares_sig = [r["arms"][arm]["oracle_share"] for r in noisy if r["oracle_gain_significant"]]
        cuts = [r["arms"][arm]["truncated_fraction"] for r in clean if "truncated_fraction" in r["arms"][arm]]
        summary[arm] = {
            "configs": len(have),
            "harmed": sum(r["arms"][arm]["harmed"] for r in have),
            "harmed_main": sum(r["arms"][arm]["score"]["worse"] for r in have),
            "harmed_rare": sum(r["arms"][arm]["rare"]["worse"] for r in have),
            "harmed_incl_worst": sum(r["arms"][arm]["harmed_incl_worst"] for r in have),
            "better_main": sum(r["arms"][arm]["better"] for r in have),
            "harmed_names": [r["config"] for r in have if r["arms"][arm]["harmed"]],
            "clean_configs": len(clean),
            "clean_harmed": sum(r["arms"][arm]["harmed"] for r in clean),
            "clean_cut_mean": float(np.mean(cuts)) if cuts else None,
            "clean_cut_max": float(np.max(cuts)) if cuts else None,
            "noisy_configs": len(noisy),
            "oracle_share_median": float(np.median(shares)) if shares else None,
            "oracle_share_n": len(shares),
            "oracle_share_median_significant": float(np.median(shares_sig)) if shares_sig else None,
            "oracle_share_n_significant": len(shares_sig),
        }
    return {"rows": rows, "summary": summary}


# ------------------------------------------------------------------------------------------ report
def oracle_share_by_family(analysis: dict[str, Any], arms: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Median oracle share (noise >= 10%, oracle gained) per family and arm, ``(median, n)``; and under
    ``"with groups' configurations"`` every arm on the configurations ``irdro`` runs on (regression has no
    labels, so the arms' medians over all configurations cover different families)."""
    rows = [r for r in analysis["rows"] if r["noise"] >= 0.1 and r["oracle_gain"] > 0]
    labelled = {r["config"] for r in rows if "irdro" in r["arms"]}
    subsets = {f: [r for r in rows if r["family"] == f] for f in FAMILY_COUNTS}
    subsets["with groups' configurations"] = [r for r in rows if r["config"] in labelled]
    out: dict[str, dict[str, Any]] = {}
    for name, subset in subsets.items():
        out[name] = {}
        for arm in arms:
            shares = [r["arms"][arm]["oracle_share"] for r in subset if arm in r["arms"]]
            out[name][arm] = (float(np.median(shares)), len(shares)) if shares else None
    return out


def _family_share_lines(analysis: dict[str, Any]) -> list[str]:
    arms = tuple(a for a in COMPARED if a != "oracle")
    table = oracle_share_by_family(analysis, arms)
    lines = ["Median oracle share at noise >= 10% per family (n configurations); the last row compares the arms "
             "on the same configurations:", "",
             "| configurations | " + " | ".join(f"`{a}`" for a in arms) + " |",
             "|---|" + "---|" * len(arms)]
    for name, cells in table.items():
        lines.append(f"| {name} | " + " | ".join("–" if c is None else f"{c[0]:.2f} ({c[1]})" for c in
                                                  (cells[a] for a in arms)) + " |")
    return lines


def _fmt(x: float, ref: float) -> str:
    """Three decimals for metrics below 10 in size (accuracy, nats), else three significant digits of ``ref``."""
    scale = max(abs(ref), 1e-12)
    digits = 3 if scale < 10 else max(0, 2 - int(math.floor(math.log10(scale))))
    return f"{x:+.{digits}f}"


def _delta_cell(arm: dict[str, Any] | None, ref: float, *, with_cut: bool = False) -> str:
    """``Δ main / Δ rare`` of one arm against uniform, ``*`` if harmed, the cut fraction in brackets if asked."""
    if arm is None:
        return "–"
    cut = f" ({arm['truncated_fraction']:.2f})" if with_cut and "truncated_fraction" in arm else ""
    return f"{_fmt(arm['score']['delta'], ref)} / {_fmt(arm['rare']['delta'], ref)}{'*' if arm['harmed'] else ''}{cut}"


def _spread_cell(arm: dict[str, Any], ref: float) -> str:
    """The seed spread of one arm's main and rare metric."""
    return f"{_fmt(arm['score']['spread'], ref).lstrip('+')} / {_fmt(arm['rare']['spread'], ref).lstrip('+')}"


def format_report(configs: list[dict[str, Any]], analysis: dict[str, Any], seeds: int, command: str,
                  elapsed: float, plots: list[str], notes: Path | None = None) -> str:
    s = analysis["summary"]
    pct = lambda a, b: f"{a}/{b} ({100 * a / b:.0f}%)" if b else "–"  # noqa: E731
    num = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    fams = ", ".join(f"{f} {sum(c['family'] == f for c in configs)}" for f in FAMILY_COUNTS)
    lines = [
        "## Randomised task suite (benchmarks/task_suite.py)",
        "",
        f"Command: `{command}`",
        "",
        f"{len(configs)} configurations ({fams}; list: `benchmarks/task_suite_configs.json`, drawn from seed "
        f"{SUITE_SEED}) x {seeds} seed(s), {elapsed / 60:.0f} min on a shared 2-core machine. Each arm of a "
        "(configuration, seed) starts from the same model with the same steps and batch size. Metrics are "
        "higher-is-better: accuracy on a balanced test set (rare = the 30% of classes with the fewest training "
        "samples), negated test RMSE in target units (rare = the under-sampled input region), negated held-out "
        "loss in nats/byte (LM; rare = the three rare domains). Δ = paired difference to uniform (mean over "
        "seeds); spread = the larger of uniform's std over seeds and the paired differences' std. "
        "**Harmed** = Δ < -spread on the main metric or on the rare group's. Oracle share = Δarm / Δoracle on "
        "the main metric, at noise >= 10% where the oracle gained. Cut = the samples the sampler's cut "
        "excludes at the end of training (`stats()['truncated_fraction']`). `irdro` passes groups (class labels; "
        "the LM's source domains, noise documents inside random sources) and is not run on regression.",
        "",
        "### Summary per arm",
        "",
        "| arm | harmed (main or rare) | harmed main | harmed rare | harmed incl. worst class | better than uniform (main, > spread) "
        "| 0% noise: harmed | 0% noise: cut mean / max | noise >= 10%: median oracle share (n) | same, oracle gain > spread (n) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in COMPARED:
        a = s[arm]
        lines.append(
            f"| `{arm}` | {pct(a['harmed'], a['configs'])} | {a['harmed_main']} | {a['harmed_rare']} | "
            f"{a['harmed_incl_worst']} | {a['better_main']} | {pct(a['clean_harmed'], a['clean_configs'])} | "
            f"{num(a['clean_cut_mean'])} / {num(a['clean_cut_max'])} | {num(a['oracle_share_median'])} "
            f"({a['oracle_share_n']}) | {num(a['oracle_share_median_significant'])} ({a['oracle_share_n_significant']}) |")
    lines += ["", "Harmed configurations:", ""]
    for arm in COMPARED:
        lines.append(f"- `{arm}`: " + (", ".join(f"`{n}`" for n in s[arm]["harmed_names"]) or "none"))
    lines += ["", *_family_share_lines(analysis)]
    lines += ["", "Targets of issue 18 for the defaults (`irdro`, `irdro-nogroups`):", ""]
    for arm in ("irdro", "irdro-nogroups"):
        a = s[arm]
        frac = a["harmed"] / a["configs"] if a["configs"] else float("nan")
        share = a["oracle_share_median"]
        lines.append(
            f"- `{arm}`: harmed {100 * frac:.0f}% (target <= 5%: {'PASS' if frac <= 0.05 else 'FAIL'}); 0% noise "
            f"harmed {a['clean_harmed']} (target 0: {'PASS' if a['clean_harmed'] == 0 else 'FAIL'}); cut at 0% noise "
            f"{num(a['clean_cut_mean'])} (target < 0.02: {'PASS' if (a['clean_cut_mean'] or 0) < 0.02 else 'FAIL'}); "
            f"median oracle share at noise >= 10% {num(share)} (target >= 0.5: "
            f"{'PASS' if share is not None and share >= 0.5 else 'FAIL'})")
    lines += ["", "### Per configuration", "",
              "Δ main / Δ rare; spread of the defaults-without-groups arm (the others' differ a little); `*` = harmed; cut = fraction cut at the end "
              "(defaults with / without groups); noise draws = share of draws on noisy samples (defaults "
              "without groups) against their share.", "",
              "| configuration | uniform main | spread main / rare | oracle | irdro | irdro-nogroups | reweight "
              "| cut g / no g | noise draws / share |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in analysis["rows"]:
        ref = row["uniform"]["score"]
        cells = [_delta_cell(row["arms"].get(arm), ref) for arm in COMPARED]
        spread = _spread_cell(row["arms"]["irdro-nogroups"], ref)
        cut = "/".join(num(row["arms"][a].get("truncated_fraction")) if a in row["arms"] else "–"
                       for a in ("irdro", "irdro-nogroups"))
        ng = row["arms"]["irdro-nogroups"]
        draws = f"{ng['noise_draws']:.3f} / {ng['noise_share']:.3f}" if row["noise"] > 0 else "–"
        lines.append(f"| `{row['config']}` | {_fmt(ref, ref).lstrip('+')} | {spread} | "
                     + " | ".join(cells) + f" | {cut} | {draws} |")
    lines += ["", "Plots: " + ", ".join(f"[{Path(p).name}]({Path(p).name})" for p in plots), ""]
    if notes is not None and notes.exists():  # hand-written reading of the figures, kept across re-reports
        lines += [notes.read_text().rstrip(), ""]
    return "\n".join(lines) + "\n"


def format_rules_report(configs: list[dict[str, Any]], analysis: dict[str, Any], seeds: int, command: str,
                        arms: tuple[str, ...]) -> str:
    """The cut rules compared on the suite (RESULTS_suite_rules.md): issue 18's targets per arm, the byte
    LM's rare/worst deltas, and per configuration the deltas and the cut of every compared arm."""
    s, rows = analysis["summary"], analysis["rows"]
    pct = lambda a, b: f"{a}/{b} ({100 * a / b:.0f}%)" if b else "–"  # noqa: E731
    num = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    ok = lambda c: "PASS" if c else "FAIL"  # noqa: E731
    lines = [
        "## Cut rules that need evidence of noise, on the randomised task suite (issue 18)",
        "",
        f"Command: `{command}`",
        "",
        f"{len(configs)} configurations x {seeds} seed(s), the suite of RESULTS_suite.md (same definitions: Δ paired "
        "to uniform, spread, harmed = Δ < -spread on main or rare; uniform/oracle/default runs reused from "
        "`task_suite_out/runs.jsonl`). Arms ending in `-nogroups` pass no groups; the others pass the class labels "
        "(LM: source domains) and are not run on regression. Cut = `truncated_fraction` at the end of training.",
        "",
        "| arm | harmed | harmed main / rare | better (main) | 0% noise: harmed | 0% noise: cut mean / max "
        "| noise >= 10%: median oracle share (n) | targets: harmed <= 5% / 0% harmed 0 / cut < 2% / share >= 0.5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        a = s[arm]
        frac = a["harmed"] / a["configs"] if a["configs"] else math.nan
        share = a["oracle_share_median"]
        targets = " / ".join([ok(frac <= 0.05), ok(a["clean_harmed"] == 0),
                              ok(a["clean_cut_mean"] is not None and a["clean_cut_mean"] < 0.02),
                              ok(share is not None and share >= 0.5)])
        lines.append(
            f"| `{arm}` | {pct(a['harmed'], a['configs'])} | {a['harmed_main']} / {a['harmed_rare']} | "
            f"{a['better_main']} | {pct(a['clean_harmed'], a['clean_configs'])} | {num(a['clean_cut_mean'])} / "
            f"{num(a['clean_cut_max'])} | {num(share)} ({a['oracle_share_n']}) | {targets} |")
    lines += ["", "Harmed configurations:", ""]
    for arm in arms:
        lines.append(f"- `{arm}`: " + (", ".join(f"`{n}`" for n in s[arm]["harmed_names"]) or "none"))
    lines += ["", "### Byte LM: Δ rare / Δ worst (nats/byte, higher is better; spread of each in brackets)", "",
              "| configuration | " + " | ".join(f"`{a}`" for a in arms) + " |",
              "|---|" + "---|" * len(arms)]
    for row in rows:
        if row["family"] != "lm":
            continue
        cells = []
        for arm in arms:
            a = row["arms"].get(arm)
            cells.append("–" if a is None else f"{a['rare']['delta']:+.3f} / {a['worst']['delta']:+.3f} "
                         f"({a['rare']['spread']:.3f} / {a['worst']['spread']:.3f})" + ("*" if a["harmed"] else ""))
        lines.append(f"| `{row['config']}` | " + " | ".join(cells) + " |")
    lines += ["", "### Per configuration: Δ main / Δ rare (`*` harmed), cut fraction in brackets", "",
              "| configuration | uniform main | spread main / rare | " + " | ".join(f"`{a}`" for a in arms) + " |",
              "|---|---|---|" + "---|" * len(arms)]
    for row in rows:
        ref = row["uniform"]["score"]
        o = row["arms"]["oracle"]
        cells = [_delta_cell(row["arms"].get(arm), ref, with_cut=True) for arm in arms]
        spread = _spread_cell(o, ref)
        lines.append(f"| `{row['config']}` | {_fmt(ref, ref).lstrip('+')} | {spread} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(analysis: dict[str, Any], prefix: Path) -> list[str]:
    """Distribution of the paired deltas (in seed spreads) per arm, and the oracle share against the noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = analysis["rows"]
    colors = {"gmm": "tab:blue", "digits": "tab:cyan", "regression": "tab:orange", "lm": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    rng = np.random.default_rng(0)
    for ax, metric, title in ((axes[0], "score", "main metric"), (axes[1], "rare", "rare group")):
        data = []
        for k, arm in enumerate(COMPARED):
            vals = [(r["arms"][arm][metric]["delta"] / max(r["arms"][arm][metric]["spread"], 1e-12), r["family"])
                    for r in rows if arm in r["arms"]]
            data.append([v for v, _ in vals])
            jitter = rng.uniform(-0.15, 0.15, len(vals))
            ax.scatter(k + jitter, np.clip([v for v, _ in vals], -8, 8), s=12,
                       c=[colors[f] for _, f in vals], alpha=0.8, zorder=3)
        ax.boxplot(data, positions=range(len(COMPARED)), widths=0.5, showfliers=False)
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(-1, color="red", lw=0.8, ls="--")
        ax.set_xticks(range(len(COMPARED)), COMPARED)
        ax.set_ylabel("paired Δ to uniform / seed spread (clipped to ±8)")
        ax.set_title(f"{title}: below the red line = harmed")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=f) for f, c in colors.items()]
    axes[1].legend(handles=handles, loc="lower right", fontsize=8)
    fig.tight_layout()
    p1 = f"{prefix}_deltas.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"irdro": "o", "irdro-nogroups": "s", "reweight": "^"}
    for arm, mk in markers.items():
        pts = [(r["noise"], r["arms"][arm]["oracle_share"]) for r in rows
               if arm in r["arms"] and r["arms"][arm]["oracle_share"] is not None]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.scatter(np.array(x) + rng.uniform(-0.004, 0.004, len(x)), np.clip(y, -2, 2), marker=mk, label=arm,
                       alpha=0.8)
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(1, color="gray", lw=0.8, ls=":")
    ax.axhline(0.5, color="red", lw=0.8, ls="--")
    ax.set_xlabel("noise share")
    ax.set_ylabel("share of the oracle's gain (main metric, clipped to ±2)")
    ax.set_title("noise >= 10%: share of the clean-data oracle's gain captured")
    ax.legend()
    fig.tight_layout()
    p2 = f"{prefix}_oracle_share.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


# -------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a handful of configurations, 1 seed (< 2 minutes)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 3; 1 with --quick)")
    ap.add_argument("--configs", default=str(CONFIGS_PATH), help="the committed configuration list")
    ap.add_argument("--only", default=None, help="comma-separated configuration names or families to run")
    ap.add_argument("--draw", action="store_true", help="(re)draw the configuration list into --configs and exit")
    ap.add_argument("--out", default=str(HERE / "task_suite_out"))
    ap.add_argument("--results", default=None, help="markdown file (default RESULTS_suite.md; quick: under --out)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--arms", default=None,
                    help="comma-separated arms to run and compare (with uniform and oracle; e.g. the cut rules' arms); "
                         "the report goes to --results (default RESULTS_suite_rules.md)")
    ap.add_argument("--report-only", action="store_true",
                    help="no training: report the configurations whose runs in --out are complete (a stated subset)")
    args = ap.parse_args(argv)
    command = "nice -n 10 python benchmarks/task_suite.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.draw:
        Path(args.configs).write_text(json.dumps({"seed": SUITE_SEED, "counts": FAMILY_COUNTS,
                                                  "configs": draw_configs(SUITE_SEED)}, indent=1) + "\n")
        return 0
    configs = load_configs(Path(args.configs))["configs"]
    if args.quick:
        configs = quick_configs(configs)
    if args.only:
        keep = set(args.only.split(","))
        configs = [c for c in configs if c["name"] in keep or c["family"] in keep]
    seeds = args.seeds or (1 if args.quick else 3)
    out = Path(args.out)
    t0 = time.time()
    planned = len(configs)
    if args.arms:
        compared = tuple(a for a in args.arms.split(",") if a not in ("uniform", "oracle"))
        unknown = [a for a in compared if a not in ARMS]
        if unknown:
            ap.error(f"unknown arms {unknown}; known: {list(ARMS)}")
        arms_run = ("uniform", "oracle", *compared)
    else:
        compared, arms_run = COMPARED, BASE_ARMS
    if args.report_only:  # the command that made the runs, then how this report was made from them
        rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
        command = (command.replace(" --report-only", "") + "` (runs); report written from its runs.jsonl by `"
                   + "python benchmarks/task_suite.py --report-only " + " ".join(shlex.quote(a) for a in rest)).rstrip()
        runs = completed_runs(configs, seeds, out, arms_run)
        names = {r["config"] for r in runs}
        configs = [c for c in configs if c["name"] in names]
    else:
        runs = run_suite(configs, seeds, out, progress=not args.no_progress, arms_run=arms_run)
    if args.arms:
        analysis = analyse(configs, runs, seeds, ("oracle", *compared))
        results = Path(args.results) if args.results else HERE / "RESULTS_suite_rules.md"
        text = format_rules_report(configs, analysis, seeds, command, compared)
        if len(configs) < planned:
            text = text.replace("`\n\n", f"`\n\n**Subset:** {len(configs)} of the {planned} configurations had "
                                "all their runs when this report was written.\n\n", 1)
        results.write_text(text)
        # One analysis per report (analysis_suite_<name>.json beside the runs), so one --arms run does not
        # overwrite another's.
        (out / f"analysis_{results.stem.removeprefix('RESULTS_')}.json").write_text(json.dumps(analysis, indent=1))
        print(text)
        return 0
    elapsed = sum(r["seconds"] for r in runs) or time.time() - t0
    analysis = analyse(configs, runs, seeds)
    results = Path(args.results) if args.results else (out / "RESULTS_suite.md" if args.quick
                                                        else HERE / "RESULTS_suite.md")
    prefix = results.parent / ("suite" if not args.quick else "suite_quick")
    plots = plot(analysis, prefix)
    (out / ("analysis_quick.json" if args.quick else "analysis.json")).write_text(json.dumps(analysis, indent=1))
    notes = None if args.quick or len(configs) < planned else NOTES_PATH
    text = format_report(configs, analysis, seeds, command, elapsed, plots, notes)
    if len(configs) < planned:
        text = text.replace("`\n\n", f"`\n\n**Subset:** {len(configs)} of the {planned} configurations had all their "
                            "runs when this report was written (the others did not finish in the time available).\n\n", 1)
    results.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
