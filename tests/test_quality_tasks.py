"""The quality benchmark's map-style families: data as documented, and one tiny run of each arm kind."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import tasks  # noqa: E402


@pytest.mark.parametrize("family", ["digits-symmetric", "digits-pair", "diabetes"])
def test_family_data_has_its_rare_group_and_noise_share(family):
    clean = tasks.make_task(family, 0.0, 0)
    noisy = tasks.make_task(family, 0.2, 3)
    # The split and the rare group are fixed; only the noise depends on the seed.
    assert np.array_equal(clean.x.numpy(), noisy.x.numpy()) and np.array_equal(clean.rare, noisy.rare)
    assert not clean.noisy.any()
    n = noisy.noisy.size
    assert abs(noisy.noisy.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / n)  # binomial share, 4 s.e.
    changed = (clean.y != noisy.y).numpy()
    assert np.array_equal(changed, noisy.noisy)  # exactly the noisy samples differ (flips never keep the label)
    assert 0.05 < noisy.rare.mean() < 0.2
    if family == "digits-pair":  # each class goes to one fixed other class
        pairs = {(int(a), int(b)) for a, b in zip(clean.y[noisy.noisy], noisy.y[noisy.noisy], strict=True)}
        assert len({a for a, _ in pairs}) == len(pairs)


@pytest.mark.parametrize("arm, options", [("uniform", None), ("oracle", None), ("reweight", None),
                                          ("irdro", {"groups": "labels"})])
def test_each_arm_kind_runs(arm, options):
    task = tasks.make_task("digits-symmetric", 0.1, 0)
    task.epochs = 1
    out = tasks.run_arm(task, arm, options, seed=0)
    assert 0.0 <= out["score"] <= 1.0 and 0.0 <= out["noise_draws"] <= 1.0
    if arm == "oracle":
        assert out["noise_draws"] == 0.0
    if arm == "irdro":
        assert out["temperature"] > 0 and "readmitted" in out
