"""The randomised task suite (benchmarks/task_suite.py): the committed list reproduces, its families build
as documented, and the quick path runs and reports (about a minute: marked slow)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import task_suite  # noqa: E402
import task_suite_families  # noqa: E402


def test_committed_configurations_reproduce_from_their_seed():
    saved = task_suite.load_configs()
    assert saved["seed"] == task_suite.SUITE_SEED and saved["counts"] == task_suite.FAMILY_COUNTS
    assert saved["configs"] == task_suite.draw_configs(saved["seed"])
    configs = saved["configs"]
    assert len(configs) >= 40 and len({c["name"] for c in configs}) == len(configs)
    assert {c["family"] for c in configs} == {"gmm", "digits", "regression", "lm"}
    assert any(c["noise"] == 0 for c in configs) and sum(c["noise"] >= 0.1 for c in configs) >= 10
    assert all(0.0 <= c["noise"] <= 0.3 for c in configs)
    classes = [c["classes"] for c in configs if "classes" in c]
    assert min(classes) >= 5 and max(classes) <= 50
    assert task_suite.draw_configs(saved["seed"] + 1) != configs  # the seed matters


@pytest.mark.parametrize("family", ["gmm", "digits", "regression"])
def test_family_noise_is_the_configured_share_and_kind(family):
    cfg = next(c for c in task_suite.load_configs()["configs"] if c["family"] == family and c["noise"] >= 0.1)
    clean = task_suite_families.BUILDERS[family]({**cfg, "noise_kind": "none", "noise": 0.0}, 0)
    task = task_suite_families.BUILDERS[family](cfg, 0)
    n = task.noisy.size
    assert abs(task.noisy.mean() - cfg["noise"]) < 4 * np.sqrt(cfg["noise"] * (1 - cfg["noise"]) / n)
    assert np.array_equal(clean.x.numpy(), task.x.numpy())  # data fixed by the configuration, not the seed
    changed = (clean.y != task.y).numpy()
    assert np.array_equal(changed, task.noisy)  # exactly the noisy samples differ
    assert 0 < task.rare.mean() < 0.5 and task.rare_test.any()


def test_zipf_sizes_and_pair_flips():
    sizes = task_suite_families.zipf_sizes(10, 200, 1.0)
    assert sizes[0] == 200 and sizes[1] == 100 and sizes.min() >= 6
    assert np.all(task_suite_families.zipf_sizes(7, 50, 0.0) == 50)
    y = np.arange(12) % 6
    flipped = task_suite_families.flip_labels(y, np.ones(12, bool), 6, "pair", np.random.default_rng(0))
    assert np.all(flipped != y)
    assert len({(a, b) for a, b in zip(y, flipped, strict=True)}) == 6  # one fixed target per class


@pytest.mark.slow
def test_quick_suite_runs_and_reports(tmp_path):
    task_suite.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    text = (tmp_path / "RESULTS_suite.md").read_text()
    analysis = json.loads((tmp_path / "analysis_quick.json").read_text())
    quick = task_suite.quick_configs(task_suite.load_configs()["configs"])
    assert [r["config"] for r in analysis["rows"]] == [c["name"] for c in quick]
    assert "Command: `" in text and "### Summary per arm" in text and "### Per configuration" in text
    for png in ("suite_quick_deltas.png", "suite_quick_oracle_share.png"):
        assert (tmp_path / png).stat().st_size > 1000
    for row in analysis["rows"]:
        cfg = next(c for c in quick if c["name"] == row["config"])
        assert set(row["arms"]) == set(task_suite.arms_for(cfg)) - {"uniform"}
        if cfg["noise"] == 0:  # the oracle is uniform there
            assert row["arms"]["oracle"]["score"]["delta"] == 0.0
        for arm in ("irdro", "irdro-nogroups"):
            if arm in row["arms"]:
                assert 0.0 <= row["arms"][arm]["truncated_fraction"] <= 1.0
        assert row["arms"]["oracle"].get("noise_draws", 0.0) == 0.0
    # A real property at the fixed seed: on the classifier with >= 20% symmetric flips, training on the
    # clean samples only beats training on all of them, and the suite's summary counts its arms.
    noisy = next(r for r in analysis["rows"] if r["noise_kind"] == "symmetric" and r["noise"] >= 0.2)
    assert noisy["oracle_gain"] > 0.01
    assert noisy["arms"]["irdro-nogroups"]["noise_draws"] > 0
    assert analysis["summary"]["irdro-nogroups"]["configs"] == len(quick)
    assert analysis["summary"]["irdro"]["configs"] == sum(c["family"] != "regression" for c in quick)


def test_best_threshold_bound_is_the_fewest_errors_threshold():
    """The bound arm's threshold (benchmarks/threshold_bound.py) misclassifies no more samples than any other
    threshold on the same losses (brute force over every cut point), and cuts nothing without noise; the swapped
    rule keeps the sampler's options and cuts at it."""
    import threshold_bound

    from irdro_sampler import IRDROSampler

    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(5, 60))
        losses = np.round(rng.gamma(2.0, 1.0, n), 1)  # ties included
        noisy = rng.random(n) < 0.3
        t = threshold_bound.best_threshold(losses, noisy)
        errors = [int(((losses > cut) != noisy).sum()) for cut in [t, np.inf, *losses, -np.inf]]
        assert errors[0] == min(errors)
    assert threshold_bound.best_threshold(losses, np.zeros(n, bool)) == np.inf
    noisy = np.arange(200) % 5 == 0
    s = IRDROSampler(200, 10, seed=0, cut_learned_ratio=None, ess_fraction=0.8)
    threshold_bound.with_best_thresholds(s, noisy)
    assert s.rule.ess_fraction == 0.8 and s.rule.cut_learned_ratio is None
    s.prime(np.arange(200), np.where(noisy, 2.0, 1.0) + rng.uniform(0, 0.5, 200))
    assert s.stats()["truncated_fraction"] == pytest.approx(noisy.mean())


def test_block_screen_leaves_out_only_first_visits_above_the_block():
    """The probe's screen (benchmarks/block_screen.py): with a block of random-content losses in the table, a first
    visit above the block's valley is left out, one below it or already seen is kept; without a block nothing is."""
    import block_screen

    from irdro_sampler import IRDROSampler

    rng = np.random.default_rng(0)
    n = 2000
    block = np.arange(n) % 5 == 0  # 20%: a tight mode far above the bulk
    losses = np.where(block, 5.5 + 0.05 * rng.standard_normal(n), np.exp(0.3 * rng.standard_normal(n)))
    for with_block in (True, False):
        s = IRDROSampler(n, 10, seed=0)
        primed = np.arange(n) % 2 == 0
        s.prime(np.flatnonzero(primed), (losses if with_block else np.where(block, 1.0, losses))[primed])
        next(iter(s))  # the first refit, on the primed losses
        screen = block_screen.BlockScreen()
        unseen = np.flatnonzero(~primed)
        keep = screen.keep(s, unseen, losses[unseen])
        if with_block:
            assert np.isfinite(screen.valley)
            np.testing.assert_array_equal(keep, ~block[unseen])
            assert screen.keep(s, np.flatnonzero(primed & block), losses[primed & block]).all()  # seen: kept
        else:
            assert screen.valley == np.inf and keep.all()


def test_arms_run_before_a_default_changed_keep_their_options():
    """The runs in task_suite_out/ were made with the options of their day: an arm that names no cut_rule was run
    before the gated split became the default and keeps "zscore-mode"; only the defaults' arms follow the
    library's defaults (and the screen's, "screen*": the defaults with the loop's first-visit screen, run after), and
    "split-off" is the defaults before it."""
    import quality_tasks

    from irdro_sampler.cut_rules import DEFAULT_CUT_RULE

    for arms in (task_suite.ARMS, quality_tasks.TASK_ARMS):
        for name, opts in arms.items():
            if opts is None:
                continue
            if name in ("irdro", "irdro-nogroups", "screen", "screen-nogroups", "evidence", "evidence-nogroups",
                        "z30-groups", "z25-groups", "z25-screen", "z25-screen-l6", "z25-screen-l7", "z25-l7",
                        "z20-screen-l7", "z225-screen-l7", "screen-block", "screen-block-nogroups",
                        "screen-block100", "screen-block100-nogroups", "absloss-nogroups", "irdro-z20-screen-l7"):
                assert "cut_rule" not in opts, name
            else:
                assert opts["cut_rule"] != DEFAULT_CUT_RULE, name
    assert quality_tasks.TASK_ARMS["irdro-split-off"] == {"groups": "labels", "cut_rule": "zscore-mode"}
    assert task_suite.ARMS["split-off"] == {"groups": "labels", "cut_rule": "zscore-mode"}
    assert task_suite.ARMS["split-majority"]["cut_rule"] == "zscore-mode-split-majority"  # named: kept
