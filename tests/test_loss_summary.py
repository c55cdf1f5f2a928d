"""``cut_rules.LossSummary``: the rules give the same thresholds, bit for bit, from a summary as from the losses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from irdro_sampler.cut_rules import (
    CUT_RULES,
    LossSummary,
    cut_threshold,
    group_cut_thresholds,
    group_split_thresholds,
    loss_split,
    unlearnable_block_valley,
)


def _losses(kind: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.exp(0.5 * rng.standard_normal(n))
    if kind == "block":  # 22% unlearnable content at one loss: the block of "zscore-mode"
        x[rng.random(n) < 0.22] = 5.5
    elif kind == "split":  # flipped labels: a second mode that loss_split separates
        x = np.where(rng.random(n) < 0.2, x * 6, x * 0.3)
    return x, rng.integers(0, 7, n).astype(np.uint16)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("n", [300, 5000])  # below and above MIXTURE_POINTS
@pytest.mark.parametrize("kind", ["clean", "block", "split"])
def test_a_summary_gives_the_thresholds_of_its_losses(kind: str, n: int) -> None:
    x, g = _losses(kind, n)
    flat, grouped = LossSummary(x), LossSummary(x, g)
    for rule in CUT_RULES:
        assert _same(cut_threshold(flat, truncate_zscore=3.5, cut_rule=rule),
                     cut_threshold(x, truncate_zscore=3.5, cut_rule=rule)), rule
        got = group_cut_thresholds(grouped, g, num_groups=7, truncate_zscore=3.5, cut_rule=rule)
        want = group_cut_thresholds(x, g, num_groups=7, truncate_zscore=3.5, cut_rule=rule)
        assert got.tobytes() == want.tobytes(), rule
    assert _same(loss_split(flat), loss_split(x))
    assert group_split_thresholds(grouped, g, num_groups=7).tobytes() == group_split_thresholds(x, g, num_groups=7).tobytes()
    assert _same(unlearnable_block_valley(flat), unlearnable_block_valley(x))


def test_the_scenarios_reach_the_shared_paths() -> None:
    """The block and the split are found where the scenarios put them (else the test above compares infinities)."""
    block, _ = _losses("block", 5000)
    split, _ = _losses("split", 5000)
    assert math.isfinite(unlearnable_block_valley(LossSummary(block)))
    assert math.isfinite(loss_split(LossSummary(split)))


def test_a_refit_fits_the_block_and_orders_the_groups_once(monkeypatch) -> None:
    """The default rule with groups reads the block mixture (cut and fade) and the order by group (z-scores and
    split) twice each; the refit's summary computes each once."""
    from irdro_sampler import DROWeighting, cut_rules

    calls = {"mixture": 0, "groups": 0}
    mixture, groups_to_judge = cut_rules._mixture_valley, cut_rules._groups_to_judge

    def counted_mixture(*args, **kwargs):
        calls["mixture"] += 1
        return mixture(*args, **kwargs)

    def counted_groups(*args, **kwargs):
        calls["groups"] += 1
        return groups_to_judge(*args, **kwargs)

    monkeypatch.setattr(cut_rules, "_mixture_valley", counted_mixture)
    monkeypatch.setattr(cut_rules, "_groups_to_judge", counted_groups)
    x, g = _losses("block", 5000)
    first = (x * 1.5).astype(np.float32)
    DROWeighting().fit_calibration(x.astype(np.float32), g, num_groups=7, prior="mean", first=first)
    assert calls == {"mixture": 1, "groups": 1}
