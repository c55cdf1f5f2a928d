"""How losses become cut thresholds: the adaptive cut rules (``cut_rule=``), over all samples or per group.

A rule maps the seen running losses (of a group, or of all samples) to a threshold; samples above it are
cut (tilted mass 0). :class:`~irdro_sampler.DROWeighting` calls :func:`cut_threshold` or
:func:`group_cut_thresholds` on its calibration sample at every refresh. A new rule is a function
``(losses, z) -> threshold`` registered in ``_ADAPTIVE_CUTS`` and named in :data:`CUT_RULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

import numpy as np

from ._validation import check_fraction, check_positive

# The default adaptive cut: median + 3.5 robust standard deviations (the Iglewicz-Hoaglin outlier
# rule). Tuned on benchmarks/quality.py: it cuts all random-byte noise at 0-10% noise shares while
# cutting only 3-5% of the hardest rare-domain documents.
DEFAULT_ZSCORE = 3.5
# The default rule (issue 18): the z-score, with the mixture's valley where a block of unlearnable content
# holds so large a share that it widens the MAD past itself (on the task suite that changes nothing but the byte
# LM with 13-25% random documents, where it cuts them: benchmarks/RESULTS_suite_defaults.md); with groups, also
# the gated split ("zscore-mode-split-gated" below: on the suite's labelled tasks the median oracle share 0.24 ->
# 0.29 with nothing harmed, and the quality benchmark's clean rare digits keep their gain:
# benchmarks/RESULTS_suite_split_gated.md). Without groups the two are the same rule.
DEFAULT_CUT_RULE = "zscore-mode-split-gated"
# The default gate on the cut (issue 18, ``DROWeighting(cut_learned_ratio=)``): a sample whose running loss has
# fallen to at most half of its first loss is being learned and is not cut. A clean classifier's hard samples
# fall so (87-100% of those the z-score cut on clean digits and Gaussian mixtures), wrong labels mostly do
# not (0-36%). On the task suite it takes the cut on clean data from 0.08 to 0.01 with groups and the harmed
# configurations without groups from 5/42 to 2/42 (benchmarks/RESULTS_suite_learned.md).
DEFAULT_CUT_LEARNED_RATIO = 0.5
# How the adaptive cut is computed from the seen losses (per group when groups are known).
CUT_RULES = ("zscore", "log-zscore", "mixture", "tail-exp", "tail-normal", "mixture-valley", "tail-exp-agree",
             "tail-normal-agree", "mixture-valley-agree", "tail-normal-wide", "zscore-mode", "zscore-agree",
             "zscore-shrunk", "zscore-evidence", "zscore-root", "zscore-mode-root", "zscore-mode-split",
             "zscore-mode-split-majority", "zscore-mode-split-gated")
# "zscore-shrunk": a group's median and MAD are pulled toward those of all samples with weight
# SHRINK_SAMPLES / (n_g + SHRINK_SAMPLES), so a small group (whose own statistics a few wrong labels can
# swing) is judged mostly against the whole set and a large one mostly against itself.
SHRINK_SAMPLES = 100
# "zscore-mode": a separate high mode counts as a block of unlearnable samples when its spread (log scale) is
# at most MODE_SPREAD_RATIO of the bulk's and its centre at least MODE_LOSS_RATIO times the bulk's. A sequence's
# mean loss over random content is tight (its tokens' losses average out: 0.025 of the bulk's spread on the
# suite's byte LM); a whole class a classifier gets wrong is not (0.125 on a digits task).
MODE_SPREAD_RATIO = 0.1
MODE_LOSS_RATIO = 2.0
# "zscore-mode-split" (issue 18, opt-in; benchmarks/RESULTS_suite_split.md): also cut where two modes of the
# log-losses over all samples cross (loss_split), if Otsu's split separates them (between-side variance at least
# SPLIT_SEPARABILITY of the total, the upper side under SPLIT_MAX_UPPER); per group never below the group's
# SPLIT_GROUP_QUANTILE quantile, so a group whose losses are all high (a rare class) loses at most its top 30%.
SPLIT_SEPARABILITY = 0.6
SPLIT_MAX_UPPER = 0.5
SPLIT_GROUP_QUANTILE = 0.7
# "zscore-mode-split-majority" (opt-in; benchmarks/RESULTS_suite_split_majority.md): the split of
# "zscore-mode-split" only in a group whose own majority lies below it, so its losses above the split are a
# minority of that group (wrong labels among a class's clean ones), not the whole group sitting high (a rare
# class the model has not learned yet). Without groups there is no such second opinion: "zscore-mode".
# "zscore-mode-split-gated": the split of "zscore-mode-split-majority" as a second threshold per group
# (WeightParams.group_split) with its own gate: a sample above it is cut only while its running loss has not
# fallen below SPLIT_LEARNED_RATIO of its first loss. A wrong label's loss does not fall (the model learns its
# class, not its label); a clean rare sample's does, slowly (0.5-0.7 of its first where the split would cut it
# on the quality benchmark's clean digits, above the 0.5 of the default gate). Without groups: "zscore-mode".
SPLIT_LEARNED_RATIO = 1.0
GATED_SPLIT_RULE = "zscore-mode-split-gated"
# The evidence rules (issue 18): cut only the part of the upper tail that a model of the bulk does not
# predict. The bulk is fitted on log-losses below TAIL_FIT_QUANTILE; a sample's upper tail (the samples at
# or above it, k of n) is excess when k >= TAIL_MIN_COUNT, k >= TAIL_EXCESS_FACTOR times the count the
# model predicts (lam) and the Poisson Chernoff bound exp(-(k log(k/lam) - k + lam)) is below
# TAIL_ALPHA. Measured false-alarm rate (any cut) on clean draws: tests/test_cut_rules.py.
TAIL_FIT_QUANTILE = 0.6
TAIL_EXCESS_FACTOR = 4.0
TAIL_ALPHA = 1e-4
TAIL_MIN_COUNT = 3
# "tail-normal-wide": once the tail is excess (the test above), the cut starts at the lowest loss whose upper
# tail is at least this many times the model's count (half of it excess), not at the first excess point.
TAIL_PLACE_FACTOR = 2.0
# Evidence rules scan at most this many candidate cut points (evenly spaced ranks of the upper tail).
_TAIL_CANDIDATES = 2048
# The mixture rules fit their EM (60 passes) to at most this many points: above it, to the losses' evenly spaced
# quantiles, so a refresh costs one sort of the calibration sample, not 60 passes over it (13.8 s at 1e6).
MIXTURE_POINTS = 1024
# A group with fewer seen samples than this is never cut: its median and MAD are not yet evidence.
MIN_GROUP_SEEN = 8
# 1.4826 * MAD estimates the standard deviation of a normal distribution.
_MAD_TO_SIGMA = 1.4826
#: A z-score cut: (losses, z) -> the loss above which samples are cut.
ZCut = Callable[[np.ndarray, float], float]


class LossSummary:
    """One refit's seen losses (float64) and their groups, with what several rules read of them computed once.

    A refit with the default rule and groups reads the log-losses' quantiles twice (the block's mixture and
    the split), fits the block's mixture twice (the cut and the tilt's fade) and sorts the losses by group twice
    (the per-group z-scores and the split's per-group floors). Each is a lazily computed, cached attribute;
    the functions below take a summary wherever they take the losses, and give the same thresholds bit for
    bit. Read-only: the arrays must not change while the summary is in use."""

    def __init__(self, losses: np.ndarray, groups: np.ndarray | None = None) -> None:
        self.losses = losses
        self.groups = groups

    @property
    def size(self) -> int:
        return self.losses.size

    @cached_property
    def log_losses(self) -> np.ndarray:
        return _log_losses(self.losses)

    @cached_property
    def log_quantiles(self) -> np.ndarray:
        """The log-losses' :data:`MIXTURE_POINTS` evenly spaced quantiles (sorted; the fits' points above that many)."""
        return np.quantile(self.log_losses, (np.arange(MIXTURE_POINTS) + 0.5) / MIXTURE_POINTS)

    @cached_property
    def block(self) -> tuple[float, float]:
        """:func:`_mixture_valley` with ``block=True`` (60 EM passes)."""
        return _mixture_valley(self, 60, block=True)

    @cached_property
    def by_group(self) -> list[tuple[int, np.ndarray]]:
        """:func:`_groups_to_judge` of the losses by their groups."""
        if self.groups is None:
            raise ValueError("this summary has no groups")
        return list(_groups_to_judge(self.losses, np.asarray(self.groups)))


def _summary(x: np.ndarray | LossSummary) -> LossSummary:
    return x if isinstance(x, LossSummary) else LossSummary(x)


def _values(x: np.ndarray | LossSummary) -> np.ndarray:
    return x.losses if isinstance(x, LossSummary) else x


# --------------------------------------------------------------------------------------------- cut
def cut_threshold(
    losses: Any,
    *,
    truncate_quantile: float | None = None,
    truncate_zscore: float | None = None,
    cut_rule: str = "zscore",
) -> float:
    """Loss above which samples are cut (tilted weight 0); ``inf`` when no cut is configured.

    * ``truncate_quantile=q`` keeps losses ``<= quantile(losses, q)`` (numpy's linear rule).
    * ``truncate_zscore=z`` switches on the adaptive cut, computed by ``cut_rule``:

      - ``"zscore-mode-split-gated"`` (:data:`DEFAULT_CUT_RULE`, :class:`~irdro_sampler.DROWeighting`'s default;
        this function's own default stays ``"zscore"``): over all samples, and per group here, ``"zscore-mode"``;
        with groups :class:`~irdro_sampler.DROWeighting` adds the split of ``"-majority"`` below as a second
        threshold that cuts only samples whose loss has not fallen below their first loss
        (:func:`group_split_thresholds`, ``WeightParams.group_split``).
      - ``"zscore-mode"``: ``"zscore"``, and where a tight block of unlearnable
        content far above the bulk widens the MAD past itself, the z-score of the samples below the block
        (:func:`_zscore_mode_threshold`).
      - ``"zscore"``: keeps losses ``<= median + z * 1.4826 * MAD``. It follows the noise
        share instead of assuming one (a fixed quantile must exceed the unknown share of corrupt data).
        With MAD = 0 (most losses equal) it cuts nothing.
      - ``"log-zscore"``: the same on ``log(loss)`` (losses <= 0 count as 1e-12): scale-free, and
        lenient where the losses are right-skewed.
      - ``"mixture"``: a two-component Gaussian mixture fitted to ``log(loss)`` (as DivideMix does for
        noisy labels); cuts where the upper component becomes the likelier one, only if the two are
        well separated (Ashman's D >= 2) and the upper one holds less than half the samples. ``z`` is
        not used beyond switching the cut on.
      - ``"zscore-evidence"``: ``"zscore-mode"``, only where the losses show evidence of noise: the
        ``"tail-normal"`` test below finds an upper tail heavier than a log-normal bulk predicts (over all
        samples, also when cutting per group); ``inf`` otherwise. The squared errors of a clean regression
        (normal or Student-t residuals) pass the test and are not cut, where the z-score alone cuts 10-17%.
      - ``"zscore-mode-split"`` (opt-in): ``"zscore-mode"``, and also above :func:`loss_split` of the losses
        where it separates two sides (per group: over all samples, never below the group's 0.7 quantile).
      - ``"zscore-mode-split-majority"`` (opt-in): per group, the split only in a group whose median lies below
        it; without groups ``"zscore-mode"``.
      - ``"zscore-root"`` / ``"zscore-mode-root"``: ``"zscore"`` / ``"zscore-mode"`` with the z-score taken on
        ``sqrt(loss)`` (losses < 0 count as 0) and squared back: for a squared error that is the residual's
        own scale, where a normal residual's z-score of 3.5 cuts 0.6% (on the squared errors themselves, 10%).
      - evidence rules (issue 18; they cut only where the losses show noise, compared on the task suite in
        benchmarks/RESULTS_suite_rules.md): ``"tail-normal"``, ``"tail-normal-wide"``, ``"tail-exp"``
        (:func:`_tail_threshold`: the excess of the upper tail over a model of the bulk) and
        ``"mixture-valley"`` (:func:`_mixture_valley_threshold`: a separate high mode with a density
        valley); their ``"-agree"`` forms cut per group only where the rule over all samples agrees
        (:func:`group_cut_thresholds`).

    Both may be given; the lower threshold wins. ``losses`` (an array or a :class:`LossSummary` of it) should be
    the *seen* losses only:
    filling unseen samples with a prior and including them would pull the quantile towards the prior.
    """
    q = check_fraction(truncate_quantile, "truncate_quantile", low_open=True, high_open=False, allow_none=True)
    z = _check_zscore(truncate_zscore)
    _check_cut_rule(cut_rule)
    if q is None and z is None:
        return math.inf
    summary = losses if isinstance(losses, LossSummary) else None
    arr = summary.losses if summary is not None else np.asarray(losses, dtype=np.float64)
    if arr.size == 0:
        return math.inf
    threshold = math.inf
    if q is not None and q < 1.0:
        threshold = float(np.quantile(arr, q))
    if z is not None:
        reads_summary = summary is not None and cut_rule in _READS_SUMMARY
        threshold = min(threshold, _ADAPTIVE_CUTS[cut_rule](summary if reads_summary else arr, z))
    return threshold


def _robust_z_threshold(x: np.ndarray, z: float) -> float:
    median = float(np.median(x))
    mad = float(np.median(np.abs(x - median)))
    return median + z * _MAD_TO_SIGMA * mad if mad > 0 else math.inf


def _root_z_threshold(x: np.ndarray, z: float) -> float:
    """``"zscore-root"``: the z-score of ``sqrt(loss)``, as a loss (squared back)."""
    root = _robust_z_threshold(np.sqrt(np.maximum(x, 0.0)), z)
    return root * root


def _log_losses(x: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(x, 1e-12))


def _log_z_threshold(x: np.ndarray, z: float) -> float:
    return float(np.exp(min(_robust_z_threshold(_log_losses(x), z), 700.0)))


def _log_mixture(x: np.ndarray | LossSummary, iterations: int) -> tuple | None:
    """Two-component 1-D Gaussian mixture on log-losses by EM from a quantile start (deterministic):
    ``(weight, mu, var, lo, hi, separation)`` with ``lo`` / ``hi`` the lower / upper component and
    ``separation`` Ashman's D; ``None`` when there are too few or identical losses."""
    summary = _summary(x)
    lx = summary.log_losses
    if lx.size < MIN_GROUP_SEEN or float(lx.max() - lx.min()) == 0.0:
        return None
    if lx.size > MIXTURE_POINTS:  # the fit needs the shape, not every point: its evenly spaced quantiles
        lx = summary.log_quantiles
    mu = np.quantile(lx, [0.25, 0.95])
    var = np.full(2, max(float(lx.var()) / 4.0, 1e-12))
    weight = np.array([0.8, 0.2])
    for _ in range(iterations):
        log_r = -0.5 * (lx[:, None] - mu) ** 2 / var - 0.5 * np.log(var) + np.log(weight)
        log_r -= log_r.max(axis=1, keepdims=True)
        r = np.exp(log_r)
        r /= r.sum(axis=1, keepdims=True)
        nk = r.sum(axis=0) + 1e-300
        weight = np.maximum(nk / lx.size, 1e-12)
        mu = (r * lx[:, None]).sum(axis=0) / nk
        var = np.maximum((r * (lx[:, None] - mu) ** 2).sum(axis=0) / nk, 1e-12)
    lo, hi = (0, 1) if mu[0] <= mu[1] else (1, 0)
    separation = (mu[hi] - mu[lo]) / math.sqrt(0.5 * (var[lo] + var[hi]))
    return weight, mu, var, lo, hi, separation


def _mixture_threshold(x: np.ndarray, z: float, iterations: int = 60) -> float:
    """Two-component 1-D Gaussian mixture on log-losses by EM from a quantile start (deterministic)."""
    fit = _log_mixture(x, iterations)
    if fit is None:
        return math.inf
    weight, mu, var, lo, hi, separation = fit
    if separation < 2.0 or weight[hi] >= 0.5:
        return math.inf
    # Where the upper component's log-density overtakes the lower one's, between the two means.
    grid = np.linspace(mu[lo], mu[hi], 1025)
    dens = [-0.5 * (grid - mu[k]) ** 2 / var[k] - 0.5 * math.log(var[k]) + math.log(weight[k]) for k in (lo, hi)]
    above = np.flatnonzero(dens[1] > dens[0])
    return float(np.exp(grid[above[0]])) if above.size else math.inf


def _tail_threshold(x: np.ndarray, z: float, reference: str = "exp", place: float | None = None) -> float:
    """Cut only the excess of the upper tail over a model of the bulk, fitted on the log-losses below
    their :data:`TAIL_FIT_QUANTILE` quantile.

    ``reference="exp"``: the log-losses' survival decays exponentially beyond the median at the rate
    fitted between the median and the fit quantile (a Pareto tail of the losses; lenient: the right-skewed
    cross-entropy of a clean classifier fits it). ``"normal"``: a normal on log-losses with centre the
    median and scale from the lower quartile (``(q50 - q25) / 0.6745``; tighter: squared errors of a
    regression fit it, a clean classifier's long tail does not). The threshold is just below the lowest
    loss whose upper tail is excess (see :data:`TAIL_EXCESS_FACTOR`); ``inf`` without evidence. With
    ``place``, once there is evidence the cut starts lower: at the lowest candidate whose upper tail holds
    ``place`` times the model's count. ``z`` is not used beyond switching the cut on.
    """
    lx = np.sort(_log_losses(x))
    n = lx.size
    if n < MIN_GROUP_SEEN or lx[-1] == lx[0]:
        return math.inf
    q25, q50, qf = np.quantile(lx, [0.25, 0.5, TAIL_FIT_QUANTILE])
    start = int(np.searchsorted(lx, qf, side="right"))
    if start >= n:
        return math.inf
    idx = np.unique(np.linspace(start, n - 1, min(n - start, _TAIL_CANDIDATES)).round().astype(np.int64))
    v = lx[idx]
    k = (n - np.searchsorted(lx, v, side="left")).astype(np.float64)  # samples at or above each candidate
    if reference == "exp":
        width = float(qf - q50)
        if width <= 0:
            return math.inf
        rate = math.log(0.5 / (1.0 - TAIL_FIT_QUANTILE)) / width
        lam = n * (1.0 - TAIL_FIT_QUANTILE) * np.exp(-rate * (v - qf))
    else:
        scale = float(q50 - q25) / 0.6745
        if scale <= 0:
            return math.inf
        lam = n * 0.5 * np.array([math.erfc((t - q50) / (scale * math.sqrt(2.0))) for t in v])
    lam = np.maximum(lam, 1e-300)
    chernoff = k * np.log(k / lam) - k + lam  # -log of the Poisson upper-tail bound (k > lam)
    excess = (k >= TAIL_MIN_COUNT) & (k >= TAIL_EXCESS_FACTOR * lam) & (chernoff >= math.log(1.0 / TAIL_ALPHA))
    hits = np.flatnonzero(excess)
    if hits.size == 0:
        return math.inf
    if place is not None:
        hits = np.flatnonzero((k >= TAIL_MIN_COUNT) & (k >= place * lam))
    i = int(np.searchsorted(lx, v[hits[0]], side="left"))
    below = lx[i - 1] if i > 0 else v[hits[0]] - 1.0
    return float(np.exp(min(0.5 * (below + v[hits[0]]), 700.0)))


def _mixture_valley_threshold(x: np.ndarray, z: float, iterations: int = 60) -> float:
    """The two-component mixture of ``"mixture"`` (same EM), accepted only as evidence of a separate
    high mode: Ashman's D >= 2, the upper component holding 0.5%-45% of the samples, and the fitted
    mixture density having a valley between the two means at most half the height of the lower of its
    two peaks. Cuts at the valley."""
    return _mixture_valley(x, iterations)[0]


def _split_stats(lx: np.ndarray) -> tuple[np.ndarray, ...]:
    """For every cut point of the sorted ``lx`` (``k`` below it): the two sides' weights, means and variances."""
    n = lx.size
    c, c2 = np.cumsum(lx), np.cumsum(lx * lx)
    k = np.arange(1, n)
    w_lo = k / n
    m_lo, m_hi = c[:-1] / k, (c[-1] - c[:-1]) / (n - k)
    v_lo = np.maximum(c2[:-1] / k - m_lo**2, 1e-12)
    v_hi = np.maximum((c2[-1] - c2[:-1]) / (n - k) - m_hi**2, 1e-12)
    return w_lo, m_lo, m_hi, v_lo, v_hi


def loss_split(x: np.ndarray | LossSummary) -> float:
    """Where two modes of the log-losses of ``x`` (losses, or their :class:`LossSummary`) cross, as a loss; inf
    unless they separate.

    Evidence: Otsu's split (the cut point maximising the variance between the two sides) holds at least
    :data:`SPLIT_SEPARABILITY` of the total variance with the upper side under :data:`SPLIT_MAX_UPPER`; a
    unimodal skewed sample (squared normal or Student-t residuals, exponential, log-normal losses) does not.
    Placement: the minimum-error threshold (Kittler and Illingworth: two normals of their own weight and
    variance) among cut points leaving at least 5% on each side and under half above; Otsu's split places the
    cut too far into a wide lower mode. Above :data:`MIXTURE_POINTS` losses both use their evenly spaced
    quantiles (one sort)."""
    summary = _summary(x)
    lx = summary.log_losses
    if lx.size < MIN_GROUP_SEEN or lx.min() == lx.max():
        return math.inf
    # The quantiles come out sorted and do not depend on the input's order: no sort of every loss above them.
    lx = summary.log_quantiles if lx.size > MIXTURE_POINTS else np.sort(lx)
    w_lo, m_lo, m_hi, v_lo, v_hi = _split_stats(lx)
    w_hi = 1.0 - w_lo
    between = w_lo * w_hi * (m_lo - m_hi) ** 2
    i = int(np.argmax(between))
    if between[i] < SPLIT_SEPARABILITY * float(lx.var()) or w_hi[i] > SPLIT_MAX_UPPER:
        return math.inf
    error = w_lo * np.log(v_lo) / 2 + w_hi * np.log(v_hi) / 2 - w_lo * np.log(w_lo) - w_hi * np.log(w_hi)
    allowed = (w_lo >= 0.05) & (w_hi >= 0.05) & (w_hi <= SPLIT_MAX_UPPER)
    j = int(np.argmin(np.where(allowed, error, np.inf))) if allowed.any() else i
    return float(np.exp(min(0.5 * (lx[j] + lx[j + 1]), 700.0)))


def _split_threshold(x: np.ndarray | LossSummary, z: float) -> float:
    """``"zscore-mode-split"`` over all samples: the lower of ``"zscore-mode"`` and :func:`loss_split`."""
    return min(_zscore_mode_threshold(x, z), loss_split(x))


def _zscore_mode_threshold(x: np.ndarray | LossSummary, z: float, z_cut: ZCut = _robust_z_threshold) -> float:
    """The ``"zscore"`` cut, unless a *block* of unlearnable samples inflates the MAD past itself.

    Content the model cannot learn (random bytes or tokens) keeps a loss near its entropy, the same for
    every such sample: a tight separate mode. Holding a large share (20-30%), it widens the MAD until the
    robust threshold lies inside or above it, and the z-score keeps most of it. So: when
    ``"mixture-valley"`` finds a separate high mode that is tight (log-scale spread at most
    :data:`MODE_SPREAD_RATIO` of the bulk's) and far (centre at least :data:`MODE_LOSS_RATIO` times the
    bulk's), the z-score keeps most of it (threshold above the mode's lower quartile), and the z-score of
    the samples *below* the valley alone would cut most of it, the mode is what kept it: the cut is then
    the lower of that z-score and the valley. A mode within the bulk's own reach (a clean class the model
    gets wrong) keeps the plain z-score, and so does early training (all samples near the uniform
    prediction's loss, in tight modes close together)."""
    threshold = z_cut(_values(x), z)
    block = _unlearnable_block(x, z, z_cut)
    return block[0] if block is not None and block[1] < threshold else threshold


def _unlearnable_block(
    x: np.ndarray | LossSummary, z: float, z_cut: ZCut = _robust_z_threshold
) -> tuple[float, float] | None:
    """``(where to cut, the block's lower quartile)`` of a block of unlearnable samples the z-score
    (``z_cut``) of the samples below it would cut (see :func:`_zscore_mode_threshold`); None without one."""
    valley, lower_quartile = _summary(x).block
    if valley == math.inf:
        return None
    values = _values(x)
    without_mode = z_cut(values[values < valley], z)
    return (min(without_mode, valley), lower_quartile) if without_mode < lower_quartile else None


#: Fewest losses :func:`unlearnable_block_valley` fits a mixture to: on the task suite a clean digits
#: classifier's first refit (180 seen samples) showed a tight far mode that later fits did not.
BLOCK_MIN_COUNT = 500
#: Fewest seen losses the block screen (``screen(..., block_only=True)``) places a block on: the screen matters
#: most early, while most draws are first visits; at 100 it screened no draw of the task suite's classifiers and
#: regressions (``benchmarks/RESULTS_suite_block_screen.md``).
SCREEN_BLOCK_MIN_COUNT = 100


def unlearnable_block_valley(x: np.ndarray | LossSummary, min_count: int = BLOCK_MIN_COUNT) -> float:
    """Where a block of unlearnable samples begins in the losses ``x`` (or their :class:`LossSummary`): the
    valley below a tight, far high mode (the test of ``"zscore-mode"``, see :func:`_zscore_mode_threshold`);
    inf without one or with fewer than ``min_count`` losses."""
    if x.size < min_count:
        return math.inf
    return _summary(x).block[0]


def _mixture_valley(x: np.ndarray | LossSummary, iterations: int, block: bool = False) -> tuple[float, float]:
    """``(valley, lower quartile of the upper mode)`` of ``"mixture-valley"`` (losses, not log-losses);
    ``(inf, inf)`` without a separate mode. With ``block``, the upper mode must also be tight and far (see
    :func:`_zscore_mode_threshold`)."""
    fit = _log_mixture(x, iterations)
    if fit is None:
        return math.inf, math.inf
    weight, mu, var, lo, hi, separation = fit
    if separation < 2.0 or not 0.005 <= weight[hi] <= 0.45:
        return math.inf, math.inf
    sd = np.sqrt(var)
    if block and (sd[hi] > MODE_SPREAD_RATIO * sd[lo] or mu[hi] - mu[lo] < math.log(MODE_LOSS_RATIO)):
        return math.inf, math.inf
    grid = np.linspace(mu[lo], mu[hi], 1025)
    dens = sum(weight[k] / sd[k] * np.exp(-0.5 * ((grid - mu[k]) / sd[k]) ** 2) for k in (lo, hi))
    valley = int(np.argmin(dens))
    if valley in (0, grid.size - 1):
        return math.inf, math.inf
    peak = min(float(dens[: valley + 1].max()), float(dens[valley:].max()))
    if dens[valley] > 0.5 * peak:
        return math.inf, math.inf
    return float(np.exp(grid[valley])), float(np.exp(min(float(mu[hi] - 0.6745 * sd[hi]), 700.0)))


_ADAPTIVE_CUTS = {
    "zscore": _robust_z_threshold, "log-zscore": _log_z_threshold, "mixture": _mixture_threshold,
    "tail-exp": lambda x, z: _tail_threshold(x, z, "exp"), "tail-normal": lambda x, z: _tail_threshold(x, z, "normal"),
    "mixture-valley": _mixture_valley_threshold,
    "tail-exp-agree": lambda x, z: _tail_threshold(x, z, "exp"),
    "tail-normal-agree": lambda x, z: _tail_threshold(x, z, "normal"),
    "mixture-valley-agree": _mixture_valley_threshold,
    "tail-normal-wide": lambda x, z: _tail_threshold(x, z, "normal", TAIL_PLACE_FACTOR),
    "zscore-mode": _zscore_mode_threshold,
    "zscore-agree": _robust_z_threshold,
    "zscore-shrunk": _robust_z_threshold,  # without groups; per group see _shrunk_z_thresholds
    "zscore-evidence": lambda x, z: _zscore_mode_threshold(x, z) if _excess_tail(x) else math.inf,
    "zscore-root": _root_z_threshold,
    "zscore-mode-root": lambda x, z: _zscore_mode_threshold(x, z, _root_z_threshold),
    "zscore-mode-split": _split_threshold,
    "zscore-mode-split-majority": _zscore_mode_threshold,  # the split per group only: group_cut_thresholds
    "zscore-mode-split-gated": _zscore_mode_threshold,  # the split per group only: group_split_thresholds
}
# The rules whose functions read a LossSummary (the others are given its losses).
_READS_SUMMARY = frozenset({"zscore-mode", "zscore-mode-split", "zscore-mode-split-majority", "zscore-mode-split-gated"})
# Per group, the "zscore-mode" rules cut each group by their plain z-score rule (and a block found over all samples).
_MODE_GROUP_RULE = {"zscore-mode": "zscore", "zscore-mode-root": "zscore-root"}


def _excess_tail(x: np.ndarray) -> bool:
    """Whether the losses' upper tail is heavier than a log-normal bulk predicts (``"tail-normal"`` fires)."""
    return math.isfinite(_tail_threshold(x, 0.0, "normal"))


def _check_cut_rule(rule: Any) -> str:
    if rule not in CUT_RULES:
        raise ValueError(f"cut_rule must be one of {CUT_RULES}, got {rule!r}")
    return rule


def group_cut_thresholds(
    losses: np.ndarray | LossSummary, groups: np.ndarray, *, num_groups: int, truncate_quantile: float | None = None,
    truncate_zscore: float | None = None, cut_rule: str = "zscore",
) -> np.ndarray:
    """:func:`cut_threshold` of each group's ``losses`` (seen ones, or a :class:`LossSummary` of them and
    ``groups``); index the result by group id.

    Groups with fewer than :data:`MIN_GROUP_SEEN` samples get ``inf`` (not enough evidence to cut).
    The ``"*-agree"`` rules cut a sample only where its group's rule and the same rule over all the
    samples agree: each group's threshold is the larger of the two.
    """
    groups = np.asarray(groups)
    out = np.full(num_groups, math.inf)
    if groups.size == 0:
        return out
    if cut_rule.endswith("-agree"):
        overall = cut_threshold(losses, truncate_quantile=truncate_quantile, truncate_zscore=truncate_zscore,
                                cut_rule=cut_rule)
        own = group_cut_thresholds(losses, groups, num_groups=num_groups, truncate_quantile=truncate_quantile,
                                   truncate_zscore=truncate_zscore, cut_rule=cut_rule[: -len("-agree")])
        return np.maximum(own, overall)
    if cut_rule == "zscore-evidence" and _check_zscore(truncate_zscore) is not None:
        # The evidence is taken over all samples: one small group's own tail is too few samples to test.
        if not _excess_tail(_values(losses)):
            return out
        cut_rule = "zscore-mode"
    if cut_rule.startswith("zscore-mode-split") and _check_zscore(truncate_zscore) is not None:
        # Each group by "zscore-mode", and lower where the split of all samples says so ("-gated": the split
        # is a second threshold with its own gate, group_split_thresholds, not folded in here).
        own = group_cut_thresholds(losses, groups, num_groups=num_groups, truncate_quantile=truncate_quantile,
                                   truncate_zscore=truncate_zscore, cut_rule="zscore-mode")
        if cut_rule.endswith("-gated"):
            return own
        return np.minimum(own, group_split_thresholds(losses, groups, num_groups=num_groups,
                                                      majority=cut_rule.endswith("-majority")))
    if cut_rule in _MODE_GROUP_RULE and _check_zscore(truncate_zscore) is not None:
        # A block of unlearnable content sits at the loss of its entropy, whatever its group: found once over
        # all samples (one mixture fit per refresh, not one per group), then cut in every group whose own
        # z-score keeps most of it.
        own_rule = _MODE_GROUP_RULE[cut_rule]
        own = group_cut_thresholds(losses, groups, num_groups=num_groups, truncate_quantile=truncate_quantile,
                                   truncate_zscore=truncate_zscore, cut_rule=own_rule)
        z_cut = _ADAPTIVE_CUTS[own_rule]
        block = _unlearnable_block(losses, float(truncate_zscore), z_cut) if losses.size >= MIN_GROUP_SEEN else None
        return own if block is None else np.where(own > block[1], np.minimum(own, block[0]), own)
    shrunk = cut_rule == "zscore-shrunk" and _check_zscore(truncate_zscore) is not None
    if shrunk:
        values = _values(losses)
        median = float(np.median(values))
        mad = float(np.median(np.abs(values - median)))
    for g, part in _by_group(losses, groups):
        out[g] = cut_threshold(part, truncate_quantile=truncate_quantile,
                               truncate_zscore=None if shrunk else truncate_zscore, cut_rule=cut_rule)
        if shrunk:
            out[g] = min(out[g], _shrunk_z_threshold(part, median, mad, float(truncate_zscore)))
    return out


def group_split_thresholds(
    losses: np.ndarray | LossSummary, groups: np.ndarray, *, num_groups: int, majority: bool = True
) -> np.ndarray:
    """Per group id, where the split cut starts: :func:`loss_split` of all the (seen) ``losses``, found once (a
    small group is too few to split), never below the group's :data:`SPLIT_GROUP_QUANTILE` quantile (a group whose
    losses all sit high loses at most its top 30%); ``inf`` where the losses do not split, in a group with fewer
    than :data:`MIN_GROUP_SEEN` losses and, with ``majority``, in a group whose median is not below the split (the
    whole group sits high: a rare class not learned yet, not wrong labels among clean ones)."""
    out = np.full(num_groups, math.inf)
    split = loss_split(losses)
    if split == math.inf:
        return out
    for g, part in _by_group(losses, np.asarray(groups)):
        if majority and not np.median(part) < split:
            continue
        out[g] = max(split, float(np.quantile(part, SPLIT_GROUP_QUANTILE)))
    return out


def _by_group(losses: np.ndarray | LossSummary, groups: np.ndarray) -> list[tuple[int, np.ndarray]] | Iterator:
    """:func:`_groups_to_judge`, from the summary's cache when ``losses`` is a :class:`LossSummary` with groups
    (which must then be ``groups``)."""
    if isinstance(losses, LossSummary) and losses.groups is not None:
        return losses.by_group
    return _groups_to_judge(_values(losses), groups)


def _groups_to_judge(losses: np.ndarray, groups: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(group id, its losses)`` of every group with at least :data:`MIN_GROUP_SEEN` of them (a smaller one
    is not evidence), in id order; one stable sort, not a mask per group."""
    order = np.argsort(groups, kind="stable")
    ids, starts = np.unique(groups[order], return_index=True)
    for g, part in zip(ids, np.split(losses[order], starts[1:]), strict=True):
        if part.size >= MIN_GROUP_SEEN:
            yield int(g), part


def _shrunk_z_threshold(part: np.ndarray, median: float, mad: float, z: float) -> float:
    """``"zscore-shrunk"`` for one group: its median and MAD pulled toward the whole set's (``median``,
    ``mad``) with weight ``SHRINK_SAMPLES / (n + SHRINK_SAMPLES)``."""
    w = part.size / (part.size + SHRINK_SAMPLES)
    own_median = float(np.median(part))
    own_mad = float(np.median(np.abs(part - own_median)))
    centre = w * own_median + (1.0 - w) * median
    scale = w * own_mad + (1.0 - w) * mad
    return centre + z * _MAD_TO_SIGMA * scale if scale > 0 else math.inf


def _check_zscore(z: Any) -> float | None:
    """``None`` or a number > 0; ``inf`` is allowed and, like ``None``, cuts nothing."""
    if z is None or (isinstance(z, (int, float)) and not isinstance(z, bool) and z == math.inf):
        return None
    return check_positive(z, "truncate_zscore")
