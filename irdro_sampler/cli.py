"""The ``irdro-sampler`` console script: ``demo`` and ``inspect``.

``irdro-sampler demo``     continual-train a tiny byte-level LM on built-in data under several arms
                          (uniform, IR-DRO resampling with and without the cut, in-batch reweighting)
                          and report held-out losses, draws on noise documents and plots.
``irdro-sampler inspect``  print what a sampler state (a Composer checkpoint with the IRDRO algorithm,
                          or ``save_state(sampler.state_dict(), path)``) is focusing on.

Errors the user can fix (bad paths, files without a sampler state, bad option values) print one line
on stderr and exit with status 2, without a traceback.

``inspect`` runs no code from the file: it loads with ``torch.load(weights_only=True)`` and allows
only the few extra types a Composer checkpoint holds (:func:`_inspect_safe_globals`); a file that needs
anything else is refused, naming the type.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import math
import os
import re
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .diagnostics import weighting_diagnostics
from .sampler_state import is_sampler_state
from .weights import RULE_OPTIONS

EXIT_USAGE = 2


class UserError(Exception):
    """An error caused by the command line or the input files: reported in one line, exit status 2."""


# =================================================================================== inspect


def _inspect_safe_globals() -> list[Any]:
    """What ``torch.load(weights_only=True)`` must also accept to read a Composer 0.32 checkpoint.

    Composer stores the run's wall-clock times (``datetime.timedelta``), the torch version
    (``TorchVersion``, a ``str`` subclass) and numpy RNG states (plain numeric arrays and their dtypes).
    None of these runs code when rebuilt; ``numpy``'s ``_reconstruct`` only allocates an array whose
    contents go through the same restricted unpickler.
    """
    import numpy.dtypes as nd
    import torch.torch_version

    multiarray = getattr(np, "_core", None) or np.core
    numeric = [nd.BoolDType, nd.Float16DType, nd.Float32DType, nd.Float64DType,
               *(getattr(nd, f"{s}Int{b}DType") for s in ("", "U") for b in (8, 16, 32, 64))]  # fmt: skip
    return [
        datetime.timedelta,
        torch.torch_version.TorchVersion,
        multiarray.multiarray._reconstruct,
        (multiarray.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),  # files written by numpy 1.x
        np.ndarray,
        np.dtype,
        *numeric,
    ]


def _safe_torch_load(p: Path) -> Any:
    """``torch.load`` that never runs code from the file; :class:`UserError` naming a refused type."""
    import torch

    try:
        with torch.serialization.safe_globals(_inspect_safe_globals()):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip/EOF errors of all kinds
        text = str(e)
        needed = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"but got (<class '[^']+'>)", text)
        if needed:
            raise UserError(
                f"{p}: refused: loading it needs {needed.group(1)}, which inspect does not allow (it runs no code "
                "from files: only tensors, numbers, strings, containers, timedelta, torch versions and numpy arrays)"
            ) from None
        first = next((ln for ln in text.splitlines() if "WeightsUnpickler error" in ln), text.splitlines()[0] if text else "")
        first = first.split("WeightsUnpickler error:")[-1].strip()
        raise UserError(f"{p}: not a readable torch file ({type(e).__name__}: {first[:160]}); nothing in it was run") from None


def _find_states(obj: Any, depth: int = 0) -> tuple[dict | None, dict | None]:
    """Search a loaded object for (a sampler state, an IRDRO algorithm state with a bare loss table).

    A Composer checkpoint stores algorithms as ``state['algorithms'] = [(class name, state_dict), ...]``;
    rather than depending on that layout, any nested dict/list/tuple is searched (depth-limited).
    """
    if depth > 8:
        return None, None
    if isinstance(obj, Mapping):
        if is_sampler_state(obj):
            return dict(obj), None
        if "sampler" in obj and is_sampler_state(obj["sampler"]):
            return dict(obj["sampler"]), None
        table_holder = None
        if isinstance(obj.get("table"), Mapping) and "losses" in obj["table"] and "num_samples" in obj["table"]:
            table_holder = dict(obj)
        children = obj.values()
    elif isinstance(obj, list | tuple):
        table_holder = None
        children = obj
    else:
        return None, None
    found_table = table_holder
    for child in children:
        s, t = _find_states(child, depth + 1)
        if s is not None:
            return s, None
        if found_table is None and t is not None:
            found_table = t
    return None, found_table


def _rule_from_repr(text: str) -> dict[str, Any]:
    """Rule options from an ``IRDRO(...)`` repr (keyword arguments with literal values only)."""
    opts: dict[str, Any] = {}
    try:
        call = ast.parse(text, mode="eval").body
    except SyntaxError:
        return opts
    if isinstance(call, ast.Call):
        for kw in call.keywords:
            if kw.arg in RULE_OPTIONS:
                try:
                    opts[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:
                    pass
    return opts


class Inspection:
    """What ``inspect`` reports about a sampler state: the running losses, probabilities and stats."""

    def __init__(self, losses: np.ndarray, probs: np.ndarray, stats: dict[str, float], source: str) -> None:
        self.losses = losses
        self.probs = probs
        self.stats = stats
        self.source = source


def load_inspection(path: str | os.PathLike) -> Inspection:
    """Load ``path`` and rebuild the sampler (or the streaming path's table and rule) it holds.

    Raises :class:`UserError` with a one-line message for a missing/unreadable file or one without
    a sampler state.
    """
    from irdro_sampler import DROWeighting, IRDROSampler, LossTable

    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{path}: is a directory; give a checkpoint file or a saved sampler state")
    if not stat.S_ISREG(mode):
        # Reading a named pipe or a device would block or never end.
        raise UserError(f"{path}: not a regular file (a pipe, socket or device); give a checkpoint file")
    obj = _safe_torch_load(p)
    sd, holder = _find_states(obj)
    if sd is not None:
        try:
            # Checked in full before anything is allocated: a small file cannot claim a huge data set.
            sampler = IRDROSampler.from_state_dict(sd)
            pending = int(sampler.stats()["pending_feedback"])
            # Feedback still buffered (the sampler's delay) is part of what the run has learned: apply it,
            # so the report shows the distribution the next refreshed draws will come from.
            sampler.flush()
        except (KeyError, ValueError, TypeError, MemoryError) as e:
            raise UserError(f"{path}: sampler state is malformed ({type(e).__name__}: {_one_line(e)})") from None
        stats = sampler.stats()
        source = "IRDROSampler state" + (f" ({pending} buffered updates applied)" if pending else "")
        return Inspection(sampler.table.losses.astype(np.float64), sampler.probabilities(), stats, source)
    if holder is not None:
        # The streaming path: the IRDRO algorithm keeps a loss table; its rule options are in the repr.
        try:
            table = LossTable.from_state_dict(holder["table"])
            opts = holder.get("rule") or _rule_from_repr(str(holder.get("repr", "")))
            if not isinstance(opts, Mapping):
                raise ValueError(f"'rule' must be a dict of options, got {type(opts).__name__}")
            rule = DROWeighting.from_config(opts)  # a config without cut_learned_ratio predates the gate: off
            if rule.reads_first_losses:
                table.track_first_losses()  # saved with them since the gate; otherwise from the running losses
        except (KeyError, ValueError, TypeError, MemoryError) as e:
            raise UserError(f"{path}: loss-table state is malformed ({type(e).__name__}: {_one_line(e)})") from None
        params = rule.fit(table)
        probs = rule.probabilities(table, params)
        stats = weighting_diagnostics(probs, table, params)
        return Inspection(table.losses.astype(np.float64), probs, stats, "IRDRO loss table (weighted streaming)")
    raise UserError(f"{path}: no IR-DRO sampler state found (expected an IRDROSampler state_dict or a Composer "
                    "checkpoint trained with the IRDRO algorithm)")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300]


def format_inspection(ins: Inspection, top: int = 10) -> str:
    """Human-readable diagnostics of an :class:`Inspection`."""
    s = ins.stats
    n = ins.probs.size
    seen = ins.losses[~np.isnan(ins.losses)]
    lines = [f"source: {ins.source}, {n} samples"]

    def row(name: str, value: str, note: str = "") -> None:
        lines.append(f"  {name:<22}{value:<14}{note}")

    row("ESS fraction", f"{s['ess_fraction']:.4f}", "effective sample size / N (1 = uniform)")
    row("KL to uniform", f"{s['kl_to_uniform']:.4f}", "nats")
    row("temperature", f"{s['temperature']:.4g}")
    thr = s.get("threshold", math.inf)
    row("cut threshold", "none (or per group)" if not math.isfinite(thr) else f"{thr:.4f}",
        "seen samples above it get only the uniform floor")
    row("truncated fraction", f"{s['truncated_fraction']:.4f}")
    row("seen fraction", f"{s['seen_fraction']:.4f}")
    row("max prob x N", f"{s['max_prob'] * n:.3f}")
    if "late_feedback" in s:
        row("late feedback", f"{int(s['late_feedback'])}", "updates that arrived after their batch was drawn")
    if seen.size:
        qs = [0.0, 0.1, 0.5, 0.9, 0.99, 1.0]
        lines.append("  loss quantiles (seen): " + ", ".join(f"q{q:g}={np.quantile(seen, q):.3f}" for q in qs))
    k = min(top, n)
    order = np.argsort(-ins.probs, kind="stable")[:k]
    lines.append(f"  top {k} probabilities:")
    lines.append(f"    {'sample':>10}  {'p':>10}  {'p x N':>8}  {'loss':>8}")
    for i in order:
        loss = ins.losses[i]
        lines.append(
            f"    {int(i):>10}  {ins.probs[i]:>10.3e}  {ins.probs[i] * n:>8.2f}  "
            f"{'unseen' if np.isnan(loss) else f'{loss:.3f}':>8}"
        )
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    ins = load_inspection(args.path)
    print(format_inspection(ins, top=args.top))
    if args.plot:
        from irdro_sampler.demo.report import plot_histograms

        out = Path(args.plot)
        if out.parent and not out.parent.exists():
            raise UserError(f"--plot {args.plot}: folder {out.parent} does not exist")
        plot_histograms(ins.losses, ins.probs, ins.stats.get("threshold", math.inf), out)
        print(f"wrote {out}")
    return 0


# =================================================================================== demo
def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return parse


def _fraction(name: str):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not 0.0 <= v < 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 1), got {v}")
        return v

    return parse


def cmd_demo(args: argparse.Namespace) -> int:
    from irdro_sampler.demo.run import ARMS, DemoConfig, DemoInputError, run_demo

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise UserError(f"--arms: unknown arm(s) {bad or arms!r}; choose from {', '.join(ARMS)}")
    if args.data is not None and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: not a directory")
    cfg = DemoConfig(
        steps=args.steps,
        pretrain_steps=args.pretrain_steps,
        seeds=args.seeds,
        batch_size=args.batch_size,
        arms=arms,
        noise_share=args.noise,
        out=Path(args.out),
        cache=Path(args.cache) if args.cache else None,
        data=Path(args.data) if args.data else None,
        eval_interval=args.eval_interval,
        tiny=args.tiny,
        progress=not args.no_progress,
        threads=args.threads,
    )
    try:
        run_demo(cfg)
    except DemoInputError as e:  # bad options or data layout (training errors keep their traceback)
        raise UserError(str(e).splitlines()[0]) from None
    return 0


# =================================================================================== main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irdro-sampler",
        description="IR-DRO loss-feedback sampling: a demo and a state inspector.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo",
        help="continual-train a tiny LM on built-in data under uniform / IR-DRO / reweighting and compare",
        description="Builds a corpus from this Python's standard library (with random-byte noise "
        "documents), pretrains a tiny byte-level GPT-2 uniformly, then continual-trains it under each arm "
        "with Composer and the IRDRO algorithm, and writes a table and plots into --out.",
    )
    d.add_argument("--steps", type=_positive_int("--steps"), default=400, help="continual-training steps per arm (400)")
    d.add_argument("--pretrain-steps", type=_positive_int("--pretrain-steps"), default=800,
                   help="uniform pretraining steps before the arms (800)")
    d.add_argument("--seeds", type=_positive_int("--seeds"), default=1, help="seeds per arm (1)")
    d.add_argument("--batch-size", type=_positive_int("--batch-size"), default=32, help="batch size (32)")
    d.add_argument("--arms", default="uniform,irdro,irdro-nocut,reweight",
                   help="comma-separated arms (uniform, irdro, irdro-nocut, irdro-quantile, reweight)")
    d.add_argument("--noise", type=_fraction("--noise"), default=0.05,
                   help="share of random-byte noise documents in the built-in training data (0.05)")
    d.add_argument("--out", default="irdro-demo", help="output folder for the table and plots (./irdro-demo)")
    d.add_argument("--cache", default=None, help="where the built-in corpus is written (~/.cache/irdro-sampler)")
    d.add_argument("--data", default=None,
                   help="your own MDS dataset instead: DIR/train and DIR/val with a 'tokens' (bytes) or "
                   "'text' column and an optional int 'domain' column")
    d.add_argument("--eval-interval", type=_positive_int("--eval-interval"), default=50,
                   help="held-out evaluation every this many steps (50)")
    d.add_argument("--threads", type=_positive_int("--threads"), default=None,
                   help="torch threads (default 1: fastest for this tiny model)")
    d.add_argument("--tiny", action="store_true", help="a tiny corpus and model (for tests; seconds)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("inspect", help="diagnostics of a sampler state or a Composer checkpoint with IRDRO",
                       description="Prints ESS fraction, KL to uniform, temperature, cut threshold, seen "
                       "fraction, the largest probabilities with their sample ids, and loss quantiles.")
    i.add_argument("path", help="a Composer checkpoint (trained with IRDRO) or save_state(sampler.state_dict(), path); "
                   "loaded without running code from it")
    i.add_argument("--top", type=int, default=10, help="how many of the largest probabilities to list (10)")
    i.add_argument("--plot", default=None, metavar="PNG", help="write loss and probability histograms here")
    i.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``irdro-sampler`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"irdro-sampler {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("irdro-sampler: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
