"""The tilt fading with the cut's share (``DROWeighting(tilt_fade_cut=)``, issue 18; 0.2 by default): unchanged
where the cut removes nothing, flat where it removes ``tilt_fade_cut`` or more, in proportion between."""

from __future__ import annotations

import numpy as np
import pytest
from _core_helpers import iter_batches, loss_of, roundtrip

from irdro_sampler import DROWeighting, IRDROSampler, LossTable
from irdro_sampler.tilt_fade import DEFAULT_TILT_FADE_CUT, cut_fade_factor


def test_factor_is_one_minus_the_cut_share_over_the_fade_point():
    seen = np.ones(100, bool)
    kept = np.arange(100) >= 10  # 10% cut
    assert cut_fade_factor(seen, kept, 0.2) == pytest.approx(0.5)
    assert cut_fade_factor(seen, kept, 0.1) == 0.0
    assert cut_fade_factor(seen, kept, 0.05) == 0.0  # never negative
    assert cut_fade_factor(seen, np.ones(100, bool), 0.2) == 1.0
    # Only seen samples count: unseen ones are never cut and say nothing about the noise.
    seen[50:] = False
    assert cut_fade_factor(seen, kept, 0.4) == pytest.approx(1.0 - (10 / 50) / 0.4)
    assert cut_fade_factor(np.zeros(100, bool), kept, 0.2) == 1.0


def _table(noise_share: float, n: int = 4000) -> LossTable:
    """Uniform losses (no tail: the z-score cuts none of them) with ``noise_share`` of the samples far above
    them (what the cut removes: a tight block, which the default ``tilt_fade_skip_block=True`` does not count)."""
    rng = np.random.default_rng(3)
    loss = rng.uniform(0.5, 2.5, n)
    loss[: int(noise_share * n)] += 30.0
    table = LossTable(n)
    table.update(np.arange(n), loss, step=0)
    return table


def test_the_temperature_follows_the_factor():
    """On a clean table nothing is cut and the rule equals the one without the fade; with 10% cut and a fade point of 0.2
    the tilt has half its strength (the ESS target 1 - 0.1 * 0.5); at 0.1 it is flat (the hottest
    temperature the calibration gives)."""
    clean, noisy = _table(0.0), _table(0.1)
    default = DROWeighting(tilt_fade_cut=None)
    fading = DROWeighting(tilt_fade_cut=0.2, tilt_fade_skip_block=False)
    assert fading.fit(clean).temperature == default.fit(clean).temperature
    params = fading.fit(noisy)
    kept = noisy.losses[noisy.losses < params.threshold].astype(np.float64)
    assert kept.size == 3600  # the cut removed exactly the planted 10%
    assert params.temperature == DROWeighting(ess_fraction=0.95).temperature_for(kept)
    flat = DROWeighting(tilt_fade_cut=0.1, tilt_fade_skip_block=False).fit(noisy).temperature
    assert flat == DROWeighting().temperature_for(kept, 0.0) and flat > 100 * params.temperature
    fixed = DROWeighting(temperature=2.0, tilt_fade_cut=0.1)  # a fixed temperature is not calibrated: kept
    assert fixed.fit(noisy).temperature == 2.0


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, float("nan"), "0.2", True])
def test_bad_tilt_fade_cut_is_refused_by_name(value):
    with pytest.raises((ValueError, TypeError), match="tilt_fade_cut"):
        DROWeighting(tilt_fade_cut=value)
    with pytest.raises((ValueError, TypeError), match="tilt_fade_cut"):
        IRDROSampler(100, batch_size=4, tilt_fade_cut=value)


def test_on_by_default_and_old_configs_load_without_it():
    assert DROWeighting().tilt_fade_cut == DEFAULT_TILT_FADE_CUT == 0.2
    assert DROWeighting().config()["tilt_fade_cut"] == 0.2
    assert DROWeighting.from_config(DROWeighting().config()).tilt_fade_cut == 0.2
    old = {k: v for k, v in DROWeighting().config().items() if k != "tilt_fade_cut"}  # saved before it existed
    assert DROWeighting.from_config(old).tilt_fade_cut is None
    off = DROWeighting(tilt_fade_cut=None)
    assert "tilt_fade_cut" not in off.config() and DROWeighting.from_config(off.config()).tilt_fade_cut is None
    assert DROWeighting.from_config(DROWeighting(tilt_fade_cut=0.3).config()).tilt_fade_cut == 0.3


def test_resume_is_bitwise_with_the_fade():
    """Every 7th sample reports a loss far above the rest (cut: a share of 1/7, the factor 0.29): a run saved
    after its first epoch and resumed draws what the uninterrupted run draws, with the faded temperature."""
    n, bs = 400, 16
    planted = np.arange(n) % 7 == 0

    def feedback(sampler, epochs, start_epoch=0, step0=0):
        out, step = [], step0
        for ep in range(start_epoch, start_epoch + epochs):
            sampler.set_epoch(ep)
            for batch in iter_batches(sampler):
                out.append(batch)
                sampler.update(batch, loss_of(batch, step) + 30.0 * planted[batch], step=step)
                step += 1
        return out

    def make(**options):
        return IRDROSampler(n, bs, seed=2, feedback_delay=2, refresh_interval=3, **options)

    full = make(tilt_fade_cut=0.2)
    want = feedback(full, 3)
    first = make(tilt_fade_cut=0.2)
    got = feedback(first, 1)
    state = roundtrip(first.state_dict())
    assert state["rule"]["tilt_fade_cut"] == 0.2
    again = make(tilt_fade_cut=0.2)
    again.load_state_dict(state)
    got += feedback(again, 2, start_epoch=1, step0=len(got))
    assert got == want
    plain = make(tilt_fade_cut=None)
    feedback(plain, 3)
    assert full.stats()["truncated_fraction"] == pytest.approx(planted.mean(), abs=0.01)
    assert full.stats()["temperature"] > 1.5 * plain.stats()["temperature"]  # the faded tilt is the milder one


def test_skip_block_exempts_a_tight_far_block_only():
    """``tilt_fade_skip_block=True``: a block of unlearnable samples (all at about one loss, far above the
    rest: random bytes in an LM's data) is cut whole, so the tilt does not fade for it; a broad tail of
    noise still fades it, and so does a block among too few seen losses to fit (500)."""
    block, fade, off = (DROWeighting(tilt_fade_cut=0.2, tilt_fade_skip_block=True),
                        DROWeighting(tilt_fade_cut=0.2, tilt_fade_skip_block=False), DROWeighting(tilt_fade_cut=None))
    noisy = _table(0.1)
    assert fade.fit(noisy).temperature > off.fit(noisy).temperature  # precondition: the fade acts (half strength)
    assert block.fit(noisy).temperature == off.fit(noisy).temperature

    rng = np.random.default_rng(5)
    n = 4000
    loss = rng.uniform(0.5, 2.5, n)
    loss[: n // 10] = rng.uniform(6.0, 30.0, n // 10)  # a broad tail, not a tight mode
    broad = LossTable(n)
    broad.update(np.arange(n), loss, step=0)
    assert block.fit(broad).temperature == fade.fit(broad).temperature != off.fit(broad).temperature

    few = _table(0.1, n=400)
    assert block.fit(few).temperature == fade.fit(few).temperature != off.fit(few).temperature


def test_skip_block_is_on_by_default_saved_and_checked():
    """On by default and in the default config; a config without it (saved before it was the default, or with it
    off) loads with it off, so such states resume with the rule they were saved with."""
    assert DROWeighting().tilt_fade_skip_block is True and DROWeighting().config()["tilt_fade_skip_block"] is True
    off = DROWeighting(tilt_fade_skip_block=False)
    assert "tilt_fade_skip_block" not in off.config()
    assert DROWeighting.from_config(off.config()).tilt_fade_skip_block is False
    assert DROWeighting.from_config(DROWeighting().config()).tilt_fade_skip_block is True
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="tilt_fade_skip_block"):
            DROWeighting(tilt_fade_skip_block=bad)
        with pytest.raises(ValueError, match="tilt_fade_skip_block"):
            IRDROSampler(100, batch_size=4, tilt_fade_skip_block=bad)
