"""Closed-form KL-DRO weights and the rules that calibrate them.

The inner maximisation of ``min_theta max_{w in simplex} sum_i w_i l_i - tau * KL(w || uniform)``
has the closed form ``w_i = exp(l_i / tau) / sum_j exp(l_j / tau)``. Everything here works in the
log domain (subtract the largest kept loss before ``exp``), so temperatures down to 1e-3 with
losses of 1e3 neither overflow nor return NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ._validation import as_loss_vector, check_fraction, check_positive
from .cut_rules import (
    DEFAULT_CUT_LEARNED_RATIO,
    DEFAULT_CUT_RULE,
    DEFAULT_ZSCORE,
    GATED_SPLIT_RULE,
    SCREEN_BLOCK_MIN_COUNT,
    SPLIT_LEARNED_RATIO,
    LossSummary,
    _check_cut_rule,
    _check_zscore,
    cut_threshold,
    group_cut_thresholds,
    group_split_thresholds,
    unlearnable_block_valley,
)
from .group_share import DEFAULT_GROUP_TILT_SHARE, group_explained_share, tilt_factor
from .loss_table import prior_value
from .tilt_fade import DEFAULT_TILT_FADE_CUT, cut_fade_factor

if TYPE_CHECKING:
    from .loss_table import LossTable

# How the tilt may be capped (``DROWeighting.tilt_cap``): ``"zscore"`` tilts a loss above the robust z-score
# threshold (the ``"zscore"`` rule's cut, per group with groups) as if it were at that threshold.
TILT_CAPS = ("zscore",)
# The default temperature rule: tau such that the tilted weights of the kept samples have an effective
# sample size of 90% of them. Scale-free (losses in nats, squared target units or anything else give the
# same distribution). Chosen on benchmarks/quality.py over three task families: 0.9 beat 0.8 on every
# classification metric and kept noise draws under the noise share; on the byte-level LM 0.8 is where
# the hand-tuned tau = 1 was (ESS 0.81). See README "Defaults and why".
DEFAULT_ESS_FRACTION = 0.9
# Options added after the first saved states, and their "off" value: a config leaves an option out when it
# is off, and a config without it loads with it off (DROWeighting.config / from_config).
_LATE_OPTIONS_OFF: dict[str, Any] = {
    "tilt_cap": None, "cut_floor": None, "cut_learned_ratio": None, "cut_remeasured_only": False,
    "group_tilt_share": None, "tilt_fade_cut": None, "tilt_fade_skip_block": False,
}
# The temperature of the paper's in-batch reweighting and of ``temperature_for`` on a single loss.
DEFAULT_TEMPERATURE = 1.0
# Temperature searches run over [range / _TAU_LO_DIV, range * _TAU_HI_MUL] in log space. Below
# range/700 the weights are one-hot in float64; above range*1e6 they are uniform to 1e-6.
_TAU_LO_DIV = 700.0
_TAU_HI_MUL = 1e6
# Bisection steps are bounded (the default rtol needs about 18); and the answer stays a positive finite float.
_MAX_BISECTIONS = 200
_TINY = math.ulp(0.0)
_HUGE = float(np.finfo(np.float64).max)


# ------------------------------------------------------------------------------------ pure weights
def _tilted(losses: np.ndarray, temperature: float, kept: np.ndarray) -> np.ndarray:
    """softmax(losses / temperature) over ``kept``, 0 elsewhere (log domain).

    The largest kept loss is subtracted *before* dividing, so ``l / tau`` never overflows: every
    exponent is <= 0 and one is exactly 0 (a gap too large for float64 becomes -inf, weight 0).
    """
    with np.errstate(over="ignore"):
        z = np.where(kept, (losses - losses[kept].max()) / temperature, -np.inf)
    w = np.exp(z)
    return w / w.sum()


def _mix_uniform(p: np.ndarray, uniform_mix: float) -> np.ndarray:
    if uniform_mix == 0.0:
        return p
    return (1.0 - uniform_mix) * p + uniform_mix / p.size


def kl_dro_weights(
    losses: Any,
    temperature: float,
    *,
    truncate_quantile: float | None = None,
    uniform_mix: float = 0.0,
) -> np.ndarray:
    """Closed-form KL-DRO probabilities of ``losses``.

    ``p_i ∝ exp(l_i / temperature)`` over the kept samples (losses ``<=`` the ``truncate_quantile``
    quantile; all when ``None``), then ``p = (1 - uniform_mix) * p + uniform_mix / n`` over *all*
    samples (the floor also reaches cut samples, so no cut is permanent). Returns float64 summing to 1.
    Equal losses give the uniform distribution.

    Raises ``ValueError`` for empty or non-finite losses, a temperature that is not a finite
    positive number, or fractions outside their ranges.
    """
    arr = as_loss_vector(losses)
    tau = check_positive(temperature, "temperature")
    mix = check_fraction(uniform_mix, "uniform_mix", low_open=False, high_open=False)
    with np.errstate(over="ignore"):
        wide = not math.isfinite(float(arr.max()) - float(arr.min()))
    # The cut is scale-free; on losses spanning more than float64's range, its interpolation would overflow.
    ref = arr / float(np.abs(arr).max()) if wide else arr
    kept = ref <= cut_threshold(ref, truncate_quantile=truncate_quantile)
    return _mix_uniform(_tilted(arr, tau, kept), mix)


def midrank_weights(losses: Any, *, skip_top: float, keep: float) -> np.ndarray:
    """The paper's MidRanking rule as a distribution.

    Sort by loss (descending; ties broken by index so the result is deterministic), skip the top
    ``floor(skip_top * n)`` samples, and put uniform weight on the next ``max(1, round(keep * n))``
    (clipped at n); 0 elsewhere.
    """
    arr = as_loss_vector(losses)
    skip = check_fraction(skip_top, "skip_top", low_open=False, high_open=True)
    kf = check_fraction(keep, "keep", low_open=True, high_open=False)
    if skip + kf > 1.0 + 1e-12:
        raise ValueError(f"skip_top + keep must be <= 1, got {skip} + {kf}")
    n = arr.size
    start = int(math.floor(skip * n))
    stop = min(n, start + max(1, int(round(kf * n))))
    order = np.lexsort((np.arange(n), -arr))  # by loss descending, then index ascending
    p = np.zeros(n)
    p[order[start:stop]] = 1.0 / (stop - start)
    return p


def kl_to_uniform(p: np.ndarray) -> float:
    """KL(p || uniform) = sum p_i log(n p_i), in nats."""
    p = np.asarray(p, dtype=np.float64)
    nz = p[p > 0]
    return float(np.sum(nz * np.log(nz * p.size)))


def effective_sample_size(p: np.ndarray) -> float:
    """1 / sum p_i^2 (equals n for the uniform distribution)."""
    p = np.asarray(p, dtype=np.float64)
    return float(1.0 / np.dot(p, p))


def distribution_stats(p: np.ndarray) -> dict[str, float]:
    """Diagnostics of a probability vector: ESS fraction, KL to uniform, entropy, largest probability."""
    p = np.asarray(p, dtype=np.float64)
    nz = p[p > 0]
    return {
        "ess_fraction": effective_sample_size(p) / p.size,
        "kl_to_uniform": kl_to_uniform(p),
        "entropy": float(-np.sum(nz * np.log(nz))),
        "max_prob": float(p.max()),
        "max_prob_ratio": float(p.max() * p.size),
    }


def _kl_and_ess(losses: np.ndarray, tau: float) -> tuple[float, float]:
    z = (losses - losses.max()) / tau
    w = np.exp(z)
    s = w.sum()
    kl = math.log(losses.size) + float(np.dot(w, z)) / s - math.log(s)
    ess_fraction = s * s / float(np.dot(w, w)) / losses.size
    return kl, ess_fraction


def _bisect_log_tau(losses: np.ndarray, too_hot, rtol: float) -> float:
    """Find tau with ``too_hot(losses, tau)`` switching from True (small tau) to False, in log space.

    Works on ``losses / max|losses|`` (weights depend on ``l / tau`` only, so the answer scales back
    exactly): any finite input, spreads from subnormal to 1e308, stays finite. At most
    :data:`_MAX_BISECTIONS` steps; the answer is clamped into the positive finite floats.
    """
    rtol = check_positive(rtol, "rtol")
    scale = float(np.abs(losses).max())
    if scale == 0.0:
        return 1.0
    x = losses / scale
    spread = float(x.max() - x.min())
    if spread == 0.0:
        return 1.0  # every temperature gives the uniform distribution
    lo, hi = math.log(spread / _TAU_LO_DIV), math.log(spread * _TAU_HI_MUL)
    if not too_hot(x, math.exp(lo)):
        return _rescale(lo, scale)
    if too_hot(x, math.exp(hi)):
        return _rescale(hi, scale)
    step_tol = math.log1p(rtol)
    for _ in range(_MAX_BISECTIONS):
        if hi - lo <= step_tol:
            break
        mid = 0.5 * (lo + hi)
        if too_hot(x, math.exp(mid)):
            lo = mid
        else:
            hi = mid
    return _rescale(0.5 * (lo + hi), scale)


def _rescale(log_tau: float, scale: float) -> float:
    """``exp(log_tau) * scale`` clamped into ``[smallest subnormal, largest float]``."""
    return min(max(math.exp(log_tau) * scale, _TINY), _HUGE)


def temperature_for_kl(losses: Any, kl_radius: float, *, rtol: float = 1e-4) -> float:
    """Temperature at which KL(softmax(l / tau) || uniform) equals ``kl_radius``.

    KL falls monotonically from ``log(n / #argmax)`` (tau -> 0) to 0 (tau -> inf), so the answer is
    found by bisection on log(tau) to relative tolerance ``rtol`` on tau (default 1e-4, about 18
    iterations of one O(n) pass each, never more than 200). Out-of-reach radii return the end of the
    search range (``spread / 700`` for too large a radius, ``spread * 1e6`` for a radius below 1e-12);
    equal losses return 1.0 (any temperature gives uniform weights). For any finite losses (spreads
    up to 1e308 or down to subnormal) the answer is a finite float > 0.
    """
    arr = as_loss_vector(losses)
    radius = check_positive(kl_radius, "kl_radius")
    return _bisect_log_tau(arr, lambda x, t: _kl_and_ess(x, t)[0] > radius, rtol)


def temperature_for_ess(losses: Any, ess_fraction: float, *, rtol: float = 1e-4) -> float:
    """Temperature at which the effective sample size ``1 / sum w_i^2`` equals ``ess_fraction * n``.

    The ESS rises monotonically from ``#argmax`` to ``n`` as tau grows; bisection on log(tau) to
    relative tolerance ``rtol`` as in :func:`temperature_for_kl`.
    """
    arr = as_loss_vector(losses)
    frac = check_fraction(ess_fraction, "ess_fraction", low_open=True, high_open=False)
    return _bisect_log_tau(arr, lambda x, t: _kl_and_ess(x, t)[1] < frac, rtol)


# ------------------------------------------------------------------------- the rule on a loss table
class WeightParams(NamedTuple):
    """The quantities a rule fixes at a refresh; per-sample masses are a pure function of these."""

    temperature: float
    threshold: float  # seen samples with running loss above it are cut (inf when cut per group)
    prior: float  # running loss assumed for unseen samples
    shift: float  # subtracted before exp; the largest kept loss at the refresh
    group_threshold: np.ndarray | None = None  # per-group thresholds, indexed by group id
    cap: float | None = None  # the tilt's cap (``tilt_cap``): a loss above it tilts as if at it; None: uncapped
    group_cap: np.ndarray | None = None  # per-group caps, indexed by group id (then ``cap`` is None)
    # ``cut_learned_ratio``: a sample whose running loss is at most this fraction of its first loss is kept
    # whatever its threshold; None: no such gate.
    learned_ratio: float | None = None
    # ``cut_remeasured_only``: a sample whose running loss is still its first loss (measured once) is kept.
    remeasured_only: bool = False
    # ``cut_rule="zscore-mode-split-gated"``: per-group thresholds of the split, a second cut that takes a seen
    # sample above its group's only while its running loss has not fallen below SPLIT_LEARNED_RATIO of its first
    # loss; None: no such cut.
    group_split: np.ndarray | None = None
    # Where a block of unlearnable samples begins in the seen losses of the refit (pooled; inf without one,
    # :func:`~irdro_sampler.cut_rules.unlearnable_block_valley`): what ``screen(..., block_only=True)`` judges by.
    block_valley: float = math.inf

    @property
    def reads_first(self) -> bool:
        """Whether the kept flags read the samples' first losses (a gate on the cut is on)."""
        return self.learned_ratio is not None or self.remeasured_only or self.group_split is not None

    def thresholds(self, groups: np.ndarray | None) -> float | np.ndarray:
        """The cut threshold of each sample of ``groups`` (the global one when there are no groups)."""
        if self.group_threshold is None:
            return self.threshold
        if groups is None:
            raise ValueError("these parameters cut per group: pass the samples' groups")
        return self.group_threshold[groups]

    def caps(self, groups: np.ndarray | None) -> float | np.ndarray | None:
        """The tilt cap of each sample of ``groups`` (the global one without group caps); None: uncapped."""
        if self.group_cap is None:
            return self.cap
        if groups is None:
            raise ValueError("these parameters cap the tilt per group: pass the samples' groups")
        return self.group_cap[groups]


@dataclass(frozen=True)
class DROWeighting:
    """How a :class:`LossTable` becomes sampling probabilities.

    ``p_i = (1 - uniform_mix) * kept_i * exp((l_i - shift) / tau) / S + uniform_mix / N``

    where ``l_i`` is the running loss (the prior for unseen samples), ``kept_i`` is false for seen
    samples whose loss exceeds the cut threshold, and ``S`` sums the tilted masses of kept samples.
    Unseen samples are never cut: there is no evidence against them. The floor covers cut samples
    too, so a cut sample is re-measured now and then and re-admitted when its loss has come down.

    The temperature is ``temperature`` if given, or calibrated at every refresh from ``kl_radius`` (the
    constrained DRO form: KL(tilted || uniform) = radius over the kept samples) or ``ess_fraction``
    (effective sample size of the tilted weights as a fraction of the kept samples; default
    :data:`DEFAULT_ESS_FRACTION` = 0.9 when none of the three is given, which makes the rule
    scale-free). At most one of the three may be given. With groups, a calibrated tilt's strength
    (``1 - ess_fraction``, or ``kl_radius``) is scaled by the share of the kept losses' variance the groups
    explain over ``group_tilt_share`` (default 1.0: by the share itself; the factor capped at 1; None: not
    scaled; :mod:`irdro_sampler.group_share`): strong where the groups differ, flat where the high losses
    sit inside every group. ``tilt_fade_cut`` (default :data:`DEFAULT_TILT_FADE_CUT` = 0.2, chosen on the
    task suite: ``benchmarks/RESULTS_suite_tilt_fade.md``; None: off) scales it further by
    ``max(0, 1 - c / tilt_fade_cut)``, ``c`` the share of the seen calibration samples the cut removes: where the cut finds much noise, the noise it
    missed sits just below its threshold, where the tilt would put the most weight; on clean data (``c``
    about 0) nothing changes. ``tilt_fade_skip_block`` (default True, chosen on the quality benchmark's byte
    LM: ``benchmarks/RESULTS_quality_fadeblock_lm8.md``) does not count the cut samples of a block of
    unlearnable ones (a tight, far high mode, as ``cut_rule="zscore-mode"`` tests for, fitted on at least
    500 seen losses): the cut takes such a block whole, so none of it waits below the threshold, and the
    tilt need not fade for it.
    Both apply with or without groups, to a calibrated tilt only.

    The cut (``truncate_zscore`` with ``cut_rule``, and/or ``truncate_quantile``; see
    :func:`cut_threshold`) is computed over the seen samples, per group when the table has groups
    (:class:`LossTable` ``groups``, e.g. class labels): a sample is then judged against its own
    group, so a rare class whose losses are all high is not mistaken for noise. ``cut_floor`` (default
    None) keeps every sample whose running loss is at or below it, whatever the rule says: with
    cross-entropy, ``math.log(2)`` never cuts a sample the model already gives more than half its
    probability to (a sample the model classifies right is no evidence of a wrong label).

    Two gates read each sample's first loss (:attr:`LossTable.first_losses`) and keep what the cut
    would remove: ``cut_learned_ratio`` (default :data:`DEFAULT_CUT_LEARNED_RATIO` = 0.5) keeps a sample
    whose running loss has fallen to at most that fraction of a positive first loss (the model is
    learning it), and ``cut_remeasured_only`` (default False) keeps a sample whose running loss is still
    its first (measured once, before any step trained on it: no evidence yet that it cannot be learned).

    This class is the one place where the rule's options, their defaults and their checks live;
    ``IRDROSampler``, the Composer ``IRDRO`` algorithm and the streaming path take the same keywords
    and pass them here.

    Calibration statistics (prior, cut threshold, temperature) are computed on a fixed strided
    subsample of at most ``calibration_size`` samples (exact below that size); the standard error of
    a quantile estimated from 2**20 samples is about 3e-4 in probability.
    """

    temperature: float | None = None
    kl_radius: float | None = None
    ess_fraction: float | None = None
    truncate_quantile: float | None = None
    truncate_zscore: float | None = DEFAULT_ZSCORE
    cut_rule: str = DEFAULT_CUT_RULE
    uniform_mix: float = 0.1
    calibration_size: int = 2**20
    tilt_cap: str | None = None
    cut_floor: float | None = None
    cut_learned_ratio: float | None = DEFAULT_CUT_LEARNED_RATIO
    cut_remeasured_only: bool = False
    group_tilt_share: float | None = DEFAULT_GROUP_TILT_SHARE
    tilt_fade_cut: float | None = DEFAULT_TILT_FADE_CUT
    tilt_fade_skip_block: bool = True

    def __post_init__(self) -> None:
        given = [n for n in ("temperature", "kl_radius", "ess_fraction") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of temperature, kl_radius, ess_fraction; got {', '.join(given)}")
        check_positive(self.temperature, "temperature", allow_none=True)
        check_positive(self.kl_radius, "kl_radius", allow_none=True)
        check_fraction(self.ess_fraction, "ess_fraction", low_open=True, high_open=False, allow_none=True)
        check_fraction(self.truncate_quantile, "truncate_quantile", low_open=True, high_open=False, allow_none=True)
        _check_zscore(self.truncate_zscore)
        _check_cut_rule(self.cut_rule)
        check_positive(self.cut_floor, "cut_floor", allow_none=True)
        check_fraction(self.cut_learned_ratio, "cut_learned_ratio", low_open=True, high_open=True, allow_none=True)
        check_fraction(self.group_tilt_share, "group_tilt_share", low_open=True, high_open=False, allow_none=True)
        check_fraction(self.tilt_fade_cut, "tilt_fade_cut", low_open=True, high_open=False, allow_none=True)
        if not isinstance(self.cut_remeasured_only, bool):
            raise ValueError(f"cut_remeasured_only must be True or False, got {self.cut_remeasured_only!r}")
        if not isinstance(self.tilt_fade_skip_block, bool):
            raise ValueError(f"tilt_fade_skip_block must be True or False, got {self.tilt_fade_skip_block!r}")
        if self.tilt_cap is not None and self.tilt_cap not in TILT_CAPS:
            raise ValueError(f"tilt_cap must be None or one of {TILT_CAPS}, got {self.tilt_cap!r}")
        check_fraction(self.uniform_mix, "uniform_mix", low_open=False, high_open=False)
        if isinstance(self.calibration_size, bool) or not isinstance(self.calibration_size, int) or self.calibration_size < 1:
            raise ValueError(f"calibration_size must be an int >= 1, got {self.calibration_size!r}")

    def config(self) -> dict[str, Any]:
        """The options as a dict; the options added after the first saved states (:data:`_LATE_OPTIONS_OFF`)
        only when on, so the configs (and the fingerprints and saved states built from them) of rules with
        them off are those of versions that did not have them."""
        out = asdict(self)
        for name, off in _LATE_OPTIONS_OFF.items():
            if out[name] is off:
                del out[name]
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DROWeighting:
        """The rule a saved :meth:`config` describes. A config without one of :data:`_LATE_OPTIONS_OFF` was
        saved with that option off, by a version before it existed or with it set off: it loads with it off
        (whatever the option's default is now)."""
        return cls(**{**_LATE_OPTIONS_OFF, **config})

    # -- calibration ------------------------------------------------------------------------------
    def fit(self, table: LossTable) -> WeightParams:
        """Compute prior, cut threshold, temperature and shift from the table. O(N) for the shift.

        The calibration (:meth:`fit_calibration`) sees every ``calibration_stride``-th sample; only the
        shift (the largest kept loss) looks at all of them. A table sharded over ranks fits the same way
        from the gathered strided sample and a max-reduced shift (:mod:`irdro_sampler.distributed_fit`).
        """
        self.check_table(table)
        stride = self.calibration_stride(table.dataset_size)
        groups = None if table.groups is None else table.groups[::stride]
        params = self.fit_calibration(table.losses[::stride], groups, num_groups=table.num_groups, prior=table.prior,
                                      first=None if table.first_losses is None else table.first_losses[::stride])
        return params._replace(shift=max_kept_loss(table.losses, params, table.groups, first=table.first_losses))

    @property
    def reads_first_losses(self) -> bool:
        """Whether the rule gates its cut on the samples' first losses (the table must keep them)."""
        return self.cut_learned_ratio is not None or self.cut_remeasured_only or self.gates_split

    @property
    def gates_split(self) -> bool:
        """Whether the rule places the split as a second cut gated on first losses (with groups)."""
        return self.cut_rule == GATED_SPLIT_RULE and _check_zscore(self.truncate_zscore) is not None

    def gated(self, params: WeightParams) -> WeightParams:
        """``params`` with this rule's gates on the cut (options of the rule, not fitted: saved states
        hold the fitted part and take the gates from the rule they are restored with)."""
        return params._replace(learned_ratio=self.cut_learned_ratio, remeasured_only=self.cut_remeasured_only)

    def check_table(self, table: LossTable) -> None:
        """``ValueError`` if the rule needs what ``table`` does not keep (first losses, for the gates)."""
        if self.reads_first_losses and table.first_losses is None:
            gate = (f"cut_learned_ratio={self.cut_learned_ratio!r}" if self.cut_learned_ratio is not None
                    else f"cut_remeasured_only={self.cut_remeasured_only!r}" if self.cut_remeasured_only
                    else f"cut_rule={self.cut_rule!r}")
            raise ValueError(f"{gate} needs a LossTable that keeps first losses: "
                             "LossTable(..., track_first_losses=True) or table.track_first_losses()")

    def calibration_stride(self, dataset_size: int) -> int:
        """The calibration statistics see samples ``0, stride, 2 stride, ...`` (at most ``calibration_size``)."""
        return max(1, -(-dataset_size // self.calibration_size))

    def fit_calibration(
        self, losses: np.ndarray, groups: np.ndarray | None, *, num_groups: int, prior: float | str,
        first: np.ndarray | None = None,
    ) -> WeightParams:
        """Prior, cut thresholds and temperature (shift 0) from the calibration sample: the strided table
        ``losses`` (float32, NaN unseen), their ``groups`` (None without groups; ids below ``num_groups``),
        their ``first`` losses (needed with a gate on the cut) and the table's ``prior`` option."""
        view = losses.astype(np.float64)
        seen = ~np.isnan(view)
        seen_losses = view[seen]
        # The cut and the fade read the same seen losses: their quantiles, block and groups' order computed once.
        summary = LossSummary(seen_losses, None if groups is None else groups[seen])
        prior = prior_value(prior, seen_losses)
        params = self.fit_cut(view, seen, groups, num_groups=num_groups, prior=prior, summary=summary)
        if self.tilt_cap is not None:
            params = self._with_cap(params, seen_losses, None if groups is None else groups[seen], num_groups)
        params = self.gated(params)
        kept = _kept64(view, params, groups, first)
        eff = np.where(seen, view, prior)
        cap = params.caps(groups)
        if cap is not None:  # the temperature of the capped tilt is calibrated on the capped losses
            eff = np.minimum(eff, cap)
        factor = 1.0
        if groups is not None and self.group_tilt_share is not None:
            scored = kept & seen  # group means of measured losses: the prior says nothing about a group
            factor = tilt_factor(group_explained_share(view[scored], groups[scored], num_groups), self.group_tilt_share)
        if self.tilt_fade_cut is not None:
            exempt = view >= unlearnable_block_valley(summary) if self.tilt_fade_skip_block else None
            factor *= cut_fade_factor(seen, kept, self.tilt_fade_cut, exempt)
        tau = float(self.temperature_for(eff[kept], factor))
        block = unlearnable_block_valley(summary, SCREEN_BLOCK_MIN_COUNT)  # for screen(..., block_only=True)
        return params._replace(temperature=tau, block_valley=block)

    def fit_cut(
        self, view: np.ndarray, seen: np.ndarray, groups: np.ndarray | None, *, num_groups: int, prior: float,
        summary: LossSummary | None = None,
    ) -> WeightParams:
        """The cut of :meth:`fit_calibration`: params with the threshold (or per-group thresholds) and ``prior``
        set, temperature 1 and shift 0, from the calibration sample's losses ``view`` (float64), ``seen``
        (its mask of measured ones) and ``groups``; ``summary``, if given, is the :class:`LossSummary` of
        ``view[seen]`` and ``groups[seen]`` (made here otherwise). The one place the cut is placed: a subclass
        that places it otherwise overrides this and keeps the gate, the tilt's strength and the temperature as
        they are (``benchmarks/threshold_bound.py``)."""
        if summary is None:
            summary = LossSummary(view[seen], None if groups is None else groups[seen])
        cut = dict(truncate_quantile=self.truncate_quantile, truncate_zscore=self.truncate_zscore, cut_rule=self.cut_rule)
        floor = -math.inf if self.cut_floor is None else self.cut_floor
        if groups is None:
            return WeightParams(1.0, max(cut_threshold(summary, **cut), floor), prior, 0.0)
        seen_groups = summary.groups
        per_group = group_cut_thresholds(summary, seen_groups, num_groups=num_groups, **cut)
        params = WeightParams(1.0, math.inf, prior, 0.0, np.maximum(per_group, floor))
        if not self.gates_split:
            return params
        split = group_split_thresholds(summary, seen_groups, num_groups=num_groups)
        return params._replace(group_split=np.maximum(split, floor))

    def _with_cap(
        self, params: WeightParams, seen_losses: np.ndarray, seen_groups: np.ndarray | None, num_groups: int
    ) -> WeightParams:
        """``params`` with the tilt cap of :attr:`tilt_cap` (``"zscore"``) from the seen calibration losses."""
        z = dict(truncate_zscore=_check_zscore(self.truncate_zscore) or DEFAULT_ZSCORE, cut_rule="zscore")
        if seen_groups is None:
            return params._replace(cap=cut_threshold(seen_losses, **z))
        return params._replace(group_cap=group_cut_thresholds(seen_losses, seen_groups, num_groups=num_groups, **z))

    def temperature_for(self, kept_losses: np.ndarray, strength: float = 1.0) -> float:
        """The temperature this rule uses for these (kept) losses: the fixed one, or calibrated to the
        ESS or KL target with the tilt's strength (``1 - ess_fraction``, or ``kl_radius``) times
        ``strength`` in [0, 1] (0: flat; see ``group_tilt_share``). A fixed temperature ignores it."""
        if self.temperature is not None:
            return float(self.temperature)
        if kept_losses.size <= 1:
            return DEFAULT_TEMPERATURE  # one or no loss: every temperature gives the same weights
        if strength <= 0.0:
            return temperature_for_ess(kept_losses, 1.0)  # the hot end of the search: flat to 1e-6
        if self.kl_radius is not None:
            return temperature_for_kl(kept_losses, self.kl_radius * strength)
        ess = self.ess_fraction or DEFAULT_ESS_FRACTION
        return temperature_for_ess(kept_losses, ess if strength >= 1.0 else 1.0 - (1.0 - ess) * strength)

    # -- masses and probabilities -------------------------------------------------------------------
    def masses_at(
        self, table: LossTable, selection: Any, params: WeightParams, gathered: tuple | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`masses` of the table's samples at ``selection`` (indices or a slice) and their kept mask.
        ``gathered``: their ``(losses, groups, first losses)`` when the caller holds them already (what
        this would read from the table: the same result without a second round of random reads)."""
        if gathered is None:
            groups = None if table.groups is None else table.groups[selection]
            gathered = (table.losses[selection], groups, first_losses_for(table, params, selection))
        losses, groups, first = gathered
        return masses(losses, params, groups, first=first)

    def rebased(self, table: LossTable, params: WeightParams) -> WeightParams:
        """``params`` with the shift re-chosen (the largest kept loss) after the masses' total left range."""
        return params._replace(shift=max_kept_loss(table.losses, params, table.groups, first=table.first_losses))

    def identity(self) -> list[tuple[str, Any]]:
        """What the sampler's fingerprint records of the rule: every option."""
        return sorted(self.config().items())

    def probabilities(self, table: LossTable, params: WeightParams | None = None) -> np.ndarray:
        """Probabilities over all N samples (float64, sums to 1); ``params`` default to ``fit(table)``."""
        params = self.fit(table) if params is None else params
        mass = masses(table.losses, params, table.groups, first=table.first_losses)[0]
        return mixture_probabilities(mass, mass.sum(), mass.size, self.uniform_mix)


def first_losses_for(table: LossTable, params: WeightParams, selection: Any) -> np.ndarray | None:
    """The table's first losses at ``selection`` when ``params`` gate the cut on them (else None: not read)."""
    return table.first_losses[selection] if params.reads_first else None


def masses(
    losses: np.ndarray, params: WeightParams, groups: np.ndarray | None = None, first: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Tilted mass ``exp((l - shift) / tau)`` (0 if cut) and the kept mask, for raw table losses;
    ``exp((min(l, cap) - shift) / tau)`` when the params cap the tilt (``tilt_cap``).

    ``losses`` are the table's float32 running losses with NaN for unseen samples, ``groups`` the
    same samples' group ids (needed when ``params`` cut per group) and ``first`` their first losses
    (needed when ``params`` gate the cut on them). This is the one
    place where a loss becomes a mass: the sampler's tree and :meth:`DROWeighting.probabilities`
    both call it, so they agree bit for bit.
    """
    loss = losses.astype(np.float64)
    kept = _kept64(loss, params, groups, first)
    loss[np.isnan(loss)] = params.prior
    cap = params.caps(groups)
    if cap is not None:
        np.minimum(loss, cap, out=loss)
    with np.errstate(over="ignore"):
        mass = np.exp((loss - params.shift) / params.temperature)
    mass[~kept] = 0.0
    return mass, kept


def kept_mask(
    losses: np.ndarray, params: WeightParams, groups: np.ndarray | None = None, first: np.ndarray | None = None
) -> np.ndarray:
    """The kept flags of :func:`masses` without computing the masses."""
    return _kept64(losses.astype(np.float64), params, groups, first)


def _kept64(
    loss: np.ndarray, params: WeightParams, groups: np.ndarray | None, first: np.ndarray | None = None
) -> np.ndarray:
    """Unseen samples (NaN) are never cut; seen ones are kept up to their threshold (float64 compare), and
    with a ``learned_ratio`` also where the loss has fallen to that fraction of a positive first loss (the
    model is learning the sample), and with ``remeasured_only`` where the loss is still the first loss
    (measured once): in both cases there is no evidence that the sample cannot be learned. With a
    ``group_split`` a seen sample above its group's split is cut too, unless its loss has fallen below
    ``SPLIT_LEARNED_RATIO`` of its first."""
    unseen = np.isnan(loss)
    kept = unseen | (loss <= params.thresholds(groups))
    if params.reads_first:
        if first is None:
            raise ValueError("these parameters gate the cut on the first losses: pass the samples' first losses")
        start = first.astype(np.float64)
        if params.learned_ratio is not None:
            kept |= (start > 0) & (loss <= params.learned_ratio * start)
        if params.remeasured_only:
            kept |= loss == start  # (both float32 values: equal exactly until a second measurement moves it)
        if params.group_split is not None:  # the split's cut, which spares a sample whose loss is falling
            if groups is None:
                raise ValueError("these parameters cut per group: pass the samples' groups")
            kept &= (unseen | (loss <= params.group_split[groups])
                     | ((start > 0) & (loss < SPLIT_LEARNED_RATIO * start)))
    return kept


def cut_transitions(
    old: np.ndarray, new: np.ndarray, params: WeightParams, groups: np.ndarray | None = None,
    first: np.ndarray | None = None,
) -> tuple[int, int]:
    """``(re-measured, re-admitted)``: of the samples whose running loss went from ``old`` to ``new``,
    how many were cut before the update, and how many of those are kept after it."""
    was_cut = ~kept_mask(old, params, groups, first)
    return int(np.count_nonzero(was_cut)), int(np.count_nonzero(was_cut & kept_mask(new, params, groups, first)))


def max_kept_loss(
    losses: np.ndarray, params: WeightParams, groups: np.ndarray | None = None, chunk: int = 1 << 22,
    first: np.ndarray | None = None,
) -> float:
    """Largest effective loss among kept samples (capped when the params cap the tilt; chunked to bound
    temporaries at large N)."""
    best, has_unseen = max_kept_parts(losses, params, groups, chunk, first=first)
    return finish_max_kept(best, has_unseen, params.prior)


def max_kept_parts(
    losses: np.ndarray, params: WeightParams, groups: np.ndarray | None = None, chunk: int = 1 << 22,
    first: np.ndarray | None = None,
) -> tuple[float, bool]:
    """``(largest kept seen loss or -inf, whether any sample is unseen)``: what :func:`max_kept_loss`
    combines, and what ranks holding parts of a table max-reduce before combining.

    When the params cap the tilt, losses count capped, and so do unseen samples (their prior capped by
    their group's cap): they are then in the first number and the second is False."""
    best = -math.inf
    has_unseen = False
    capped = params.cap is not None or params.group_cap is not None
    for start in range(0, losses.size, chunk):
        part = losses[start : start + chunk].astype(np.float64)
        nan = np.isnan(part)
        part_groups = None if groups is None else groups[start : start + chunk]
        part_first = None if first is None else first[start : start + chunk]
        if capped:
            keep = _kept64(part, params, part_groups, part_first)
            part[nan] = params.prior
            kept = np.minimum(part, params.caps(part_groups))[keep]
        else:
            has_unseen = has_unseen or bool(nan.any())
            kept = part[_kept64(part, params, part_groups, part_first) & ~nan]
        if kept.size:
            best = max(best, float(kept.max()))
    return best, has_unseen


def finish_max_kept(best: float, has_unseen: bool, prior: float) -> float:
    """The shift from :func:`max_kept_parts`: unseen samples count with the prior; 0 when nothing is kept."""
    if has_unseen:
        best = max(best, prior)
    return best if math.isfinite(best) else 0.0


def mixture_probabilities(mass: np.ndarray, mass_total: float, num_samples: int, uniform_mix: float) -> np.ndarray:
    """``(1 - u) * mass / mass_total + u / num_samples``, the sampler's draw distribution.

    The floor ``u`` is spread over *all* samples, cut or not: a cut sample keeps probability
    ``u / N``, so it is measured again now and then and comes back when its loss has become ordinary
    (a cut is never permanent). With no tilted mass at all the floor takes everything.
    """
    if mass_total <= 0:
        return np.full(mass.shape, 1.0 / num_samples)
    p = mass * ((1.0 - uniform_mix) / mass_total)
    if uniform_mix > 0.0:
        p += uniform_mix / num_samples
    return p


#: The weighting rule's option names: :class:`DROWeighting`'s fields, the keywords that ``IRDROSampler``,
#: the integrations and ``inspect`` take and pass on.
RULE_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(DROWeighting))
