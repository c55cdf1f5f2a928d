"""Tables and plots of the demo (matplotlib with the non-interactive Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

#: Metrics of the table, in order: key -> column title. Lower is better for all but the draw shares.
METRICS: dict[str, str] = {
    "mean": "held-out loss (train-weighted mean)",
    "worst": "worst domain",
    "rare": "rare domains",
    "macro": "domain average",
    "noise_draws": "draws on noise",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs ignored."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def aggregate(results: Mapping[str, Sequence[Mapping]]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{arm: {metric: (mean, std)}}`` over seeds, plus ``d_<metric>``: the paired difference to the
    ``uniform`` arm (same seed), which cancels the seed-to-seed variation the arms share."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    base = results.get("uniform")
    for arm, runs in results.items():
        agg = {m: mean_std([r["summary"].get(m, float("nan")) for r in runs]) for m in METRICS}
        if base is not None and arm != "uniform" and len(base) == len(runs):
            for m in ("mean", "worst", "rare", "macro"):
                agg["d_" + m] = mean_std([r["summary"][m] - b["summary"][m] for r, b in zip(runs, base, strict=True)])
        out[arm] = agg
    return out


def _fmt(ms: tuple[float, float], pct: bool = False, sign: bool = False) -> str:
    m, s = ms
    if math.isnan(m):
        return "n/a"
    if pct:
        return f"{100 * m:.1f}% ± {100 * s:.1f}"
    return f"{m:+.3f} ± {s:.3f}" if sign else f"{m:.3f} ± {s:.3f}"


def format_table(results: Mapping[str, Sequence[Mapping]], *, markdown: bool = True) -> str:
    """The demo's result table: one row per arm, mean ± std over seeds (nats per byte, held-out).

    Columns ``Δ`` are paired differences to the uniform arm (negative = better than uniform).
    """
    agg = aggregate(results)
    n_seeds = max(len(v) for v in results.values())
    head = [
        "arm",
        "mean",
        "Δmean",
        "worst domain",
        "Δworst",
        "rare domains",
        "Δrare",
        "draws on noise",
    ]
    rows = []
    for arm, a in agg.items():
        rows.append(
            [
                arm,
                _fmt(a["mean"]),
                _fmt(a["d_mean"], sign=True) if "d_mean" in a else "",
                _fmt(a["worst"]),
                _fmt(a["d_worst"], sign=True) if "d_worst" in a else "",
                _fmt(a["rare"]),
                _fmt(a["d_rare"], sign=True) if "d_rare" in a else "",
                _fmt(a["noise_draws"], pct=True),
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))

        lines = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    lines.append(
        f"(held-out loss in nats/byte, mean ± std over {n_seeds} seed(s); Δ = paired difference to uniform, "
        "negative is better; mean = weighted by each domain's share of the training data)"
    )
    return "\n".join(lines)


def plot_curves(results: Mapping[str, Sequence[Mapping]], path: str | Path) -> Path:
    """Held-out loss over continual-training steps per arm: train-weighted mean, worst domain, rare."""
    plt = _pyplot()
    keys = [("mean", "train-weighted mean"), ("worst", "worst domain"), ("rare", "rare domains")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), constrained_layout=True)
    for arm, runs in results.items():
        steps = np.asarray([c["step"] for c in runs[0]["curve"]])
        for ax, (k, title) in zip(axes, keys, strict=True):
            vals = np.asarray([[c[k] for c in r["curve"]] for r in runs if len(r["curve"]) == len(steps)])
            mu = vals.mean(0)
            (line,) = ax.plot(steps, mu, label=arm)
            if len(vals) > 1:
                sd = vals.std(0, ddof=1)
                ax.fill_between(steps, mu - sd, mu + sd, color=line.get_color(), alpha=0.15)
            ax.set_title(title)
            ax.set_xlabel("continual-training step")
    axes[0].set_ylabel("held-out loss (nats/byte)")
    axes[0].legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_probability_vs_loss(
    losses: np.ndarray,
    probs: np.ndarray,
    domains: np.ndarray | None,
    domain_names: Sequence[str],
    threshold: float,
    path: str | Path,
    title: str = "IR-DRO sampler at the end of training",
) -> Path:
    """Each sample's draw probability (x N, so 1 = uniform) against its running loss, by domain; the cut
    threshold as a vertical line. Unseen samples (NaN loss) are left out."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    seen = ~np.isnan(losses)
    n = probs.size
    dom = domains if domains is not None else np.zeros(n, dtype=np.int64)
    for d, name in enumerate(domain_names):
        m = seen & (dom == d)
        if m.any():
            ax.scatter(losses[m], probs[m] * n, s=4, alpha=0.5, label=f"{name} ({int(m.sum())})",
                       color="black" if name == "noise" else None)
    if math.isfinite(threshold):
        ax.axvline(threshold, color="red", ls="--", lw=1, label=f"cut at {threshold:.2f}")
    ax.axhline(1.0, color="gray", ls=":", lw=1, label="uniform")
    ax.set_yscale("symlog", linthresh=0.1)  # linear near 0, so cut samples (p = 0) show on the axis
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel("running loss of the sample (nats/byte)")
    ax.set_ylabel("draw probability x N")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, markerscale=3)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_draws_per_domain(
    draws: Mapping[str, Mapping[str, float]], shares: Mapping[str, float], path: str | Path
) -> Path:
    """Share of draws per domain per arm, next to each domain's share of the training data."""
    plt = _pyplot()
    names = list(shares)
    arms = list(draws)
    width = 0.8 / (len(arms) + 1)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names)), 4.0), constrained_layout=True)
    ax.bar(x, [shares[n] for n in names], width, label="share of data", color="lightgray", edgecolor="gray")
    for i, arm in enumerate(arms):
        tot = sum(draws[arm].values()) or 1.0
        ax.bar(x + (i + 1) * width, [draws[arm].get(n, 0.0) / tot for n in names], width, label=arm)
    ax.set_xticks(x + width * len(arms) / 2, names)
    ax.set_ylabel("fraction of draws")
    ax.set_yscale("log")
    ax.set_title("draws per domain during continual training vs the domain's share of data", fontsize=10)
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_histograms(losses: np.ndarray, probs: np.ndarray, threshold: float, path: str | Path) -> Path:
    """``inspect --plot``: histogram of the running losses (seen samples) and of N x probability."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.6, 3.6), constrained_layout=True)
    seen = losses[~np.isnan(losses)]
    if seen.size:
        a1.hist(seen, bins=60, color="tab:blue")
    if math.isfinite(threshold):
        a1.axvline(threshold, color="red", ls="--", label=f"cut {threshold:.3g}")
        a1.legend(fontsize=8)
    a1.set_xlabel("running loss (seen samples)")
    a1.set_ylabel("samples")
    a1.set_title(f"{seen.size} of {losses.size} samples seen", fontsize=10)
    scaled = probs * probs.size
    a2.hist(scaled, bins=60, color="tab:orange")
    a2.set_yscale("log")
    a2.set_xlabel("draw probability x N (1 = uniform)")
    a2.set_title(f"{int((probs == 0).sum())} samples cut (p = 0)", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
