"""The demo's experiment: uniform pretraining, then continual training under several arms, via Composer.

Every arm starts from the same uniformly pretrained checkpoint and trains for the same number of
steps with the same batch size, optimizer, learning-rate schedule and seed; only the data order (and,
for ``reweight``, the loss) differs. The arms are wired exactly as a user would wire them:

* ``uniform``: a plain ``streaming.StreamingDataset`` (shuffled), no algorithm.
* ``irdro``: :class:`~irdro_sampler.integrations.streaming.WeightedStreamingDataset` plus the
  :class:`~irdro_sampler.integrations.composer.IRDRO` algorithm with the library's recommended cut
  (adaptive robust z-score of the running loss) and uniform floor.
* ``irdro-quantile``: the same with a fixed quantile cut instead.
* ``irdro-nocut``: the same without any cut (shows why the cut matters when the data holds noise).
* ``reweight``: the paper's in-batch reweighting (``IRDRO(mode='reweight')``) on uniformly shuffled data.

Each training draw is counted per domain (the collate function keeps the ``domain`` column), and
held-out loss per domain is evaluated every ``eval_interval`` steps.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import shutil
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..saving import save_state
from .data import Corpus, CorpusConfig, build_corpus, create_streaming_dataset, load_user_data, read_mds
from .model import ModelConfig, build_composer_model, evaluate_domains, summarize, tokens_tensor
from .tempdirs import owned_tempdir, raise_if_signalled, signals_unwind

#: The options the demo's ``irdro`` arm uses: the library's defaults (chosen on benchmarks/quality.py;
#: see README "Defaults and why"), so the demo shows what a user gets without tuning.
RECOMMENDED: dict[str, Any] = {}

#: Arm name -> how it is wired. ``data``: 'uniform' (plain StreamingDataset) or 'weighted'.
ARMS: dict[str, dict[str, Any]] = {
    "uniform": {"data": "uniform", "algorithm": None},
    "irdro": {"data": "weighted", "algorithm": dict(RECOMMENDED)},
    # The fixed-quantile cut alone: the default z-score cut is switched off (both given, the lower wins).
    "irdro-quantile": {
        "data": "weighted",
        "algorithm": {**RECOMMENDED, "truncate_zscore": math.inf, "truncate_quantile": 0.95},
    },
    # truncate_zscore=inf (or None) disables the default adaptive cut.
    "irdro-nocut": {
        "data": "weighted",
        "algorithm": {**RECOMMENDED, "truncate_zscore": math.inf},
    },
    # The temperature rule's ablation: a stronger tilt (ESS 0.8 of the kept samples, about tau = 1 here).
    "irdro-ess0.8": {"data": "weighted", "algorithm": {**RECOMMENDED, "ess_fraction": 0.8}},
    # The defaults before the tilt faded with the cut's share (tilt_fade_cut, issue 18).
    "irdro-nofade": {"data": "weighted", "algorithm": {**RECOMMENDED, "tilt_fade_cut": None}},
    # The fade not counting a block of unlearnable documents the cut takes whole: the default since issue 18
    # (RESULTS_quality_fadeblock_lm8.md); the arm is kept for the commands of the reports that compared it.
    "irdro-fadeblock": {"data": "weighted", "algorithm": {**RECOMMENDED, "tilt_fade_skip_block": True}},
    # The defaults before it: the fade counts every cut sample, a block of random documents too.
    "irdro-fadecount": {"data": "weighted", "algorithm": {**RECOMMENDED, "tilt_fade_skip_block": False}},
    "reweight": {"data": "uniform", "algorithm": {"mode": "reweight", "temperature": 1.0}},
    # The first-visit screen narrowed to a block of unlearnable documents (IRDRO(screen="block")).
    "irdro-screen-block": {"data": "weighted", "algorithm": {**RECOMMENDED, "screen": "block"}},
}


class DemoInputError(ValueError):
    """Bad demo input (options, ``--data`` layout): the CLI reports it in one line, without a traceback."""


@dataclass
class DemoConfig:
    """Options of :func:`run_demo` (the CLI's ``demo`` flags)."""

    steps: int = 400
    pretrain_steps: int = 800
    seeds: int = 1
    batch_size: int = 32
    arms: list[str] = field(default_factory=lambda: ["uniform", "irdro", "irdro-nocut", "reweight"])
    noise_share: float = 0.05
    out: Path = Path("irdro-demo")
    cache: Path | None = None
    data: Path | None = None
    eval_interval: int = 50
    tiny: bool = False
    progress: bool = True
    threads: int | None = None
    lr_pretrain: float = 3e-3
    lr: float = 1e-3
    continual_schedule: str = "constant"  # continual-phase LR after warmup: "constant" or "cosine" (to 0.1 lr)
    round_batches: int = 10  # WeightedStreamingDataset round = this many batches (weights refresh per round)
    seq_len: int = 64
    arm_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # overrides (benchmarks)
    quiet: bool = False

    def corpus_config(self) -> CorpusConfig:
        if self.tiny:
            return CorpusConfig(seq_len=32, common_docs=240, rare_docs=40, heldout_docs=16,
                                noise_share=self.noise_share)
        return CorpusConfig(seq_len=self.seq_len, common_docs=3000, rare_docs=240, heldout_docs=96,
                            noise_share=self.noise_share)

    def model_config(self, seq_len: int) -> ModelConfig:
        if self.tiny:
            return ModelConfig(n_layer=1, n_embd=32, n_head=2, seq_len=seq_len)
        return ModelConfig(n_layer=2, n_embd=64, n_head=4, seq_len=seq_len)

    def arm_spec(self, arm: str) -> dict[str, Any]:
        spec = copy.deepcopy(ARMS[arm]) if arm in ARMS else {"data": "weighted", "algorithm": {}}
        if arm in self.arm_options:
            spec.update(copy.deepcopy(self.arm_options[arm]))
        return spec


# ============================================================================== callbacks
def _make_callbacks(val_ids, val_labels, val_domains, domain_names, shares, rare, eval_interval, total, bar_desc, progress):
    from composer.core import Callback

    class HeldOut(Callback):
        """Held-out loss per domain at step 0 and every ``eval_interval`` steps (and at the end)."""

        def __init__(self) -> None:
            self.curve: list[dict[str, float]] = []
            self.final: dict[str, float] = {}

        def _eval(self, state, step: int) -> None:
            per = evaluate_domains(state.model, val_ids, val_labels, val_domains, domain_names)
            row = {"step": step, **summarize(per, shares, rare)}
            self.curve.append(row)
            self.final = per

        def fit_start(self, state, logger) -> None:
            self._eval(state, 0)

        def batch_end(self, state, logger) -> None:
            step = int(state.timestamp.batch)
            if step % eval_interval == 0 or step == total:
                self._eval(state, step)

    class DrawCounter(Callback):
        """Training draws per domain (from the batch's ``domain`` column), plus a tqdm bar."""

        def __init__(self) -> None:
            self.counts = np.zeros(len(domain_names), dtype=np.int64)
            self.bar = None

        def fit_start(self, state, logger) -> None:
            if progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=bar_desc, leave=False, file=sys.stderr, dynamic_ncols=True)

        def after_dataloader(self, state, logger) -> None:
            dom = state.batch.get("domain") if isinstance(state.batch, dict) else None
            if dom is not None:
                self.counts += np.bincount(dom.numpy(), minlength=len(domain_names))[: len(domain_names)]

        def batch_end(self, state, logger) -> None:
            raise_if_signalled()  # a SIGTERM whose exception landed in a __del__ and was discarded
            if self.bar is not None:
                self.bar.update(1)
                if held.curve:
                    self.bar.set_postfix(heldout=f"{held.curve[-1]['mean']:.3f}", refresh=False)

        def fit_end(self, state, logger) -> None:
            if self.bar is not None:
                self.bar.close()

    held = HeldOut()
    return held, DrawCounter()


# ============================================================================== building blocks
def _dataloader(corpus: Corpus, spec: dict[str, Any], batch_size: int, seed: int, steps: int, local: Path, round_batches: int):
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader

    from .model import collate_bytes

    common = dict(remote=str(corpus.train_dir), local=str(local), batch_size=batch_size, shuffle=True,
                  shuffle_seed=seed, predownload=batch_size * 4)
    if spec["data"] == "weighted":
        from irdro_sampler.integrations.streaming import WeightedStreamingDataset

        # A round (one streaming epoch) per `round_batches` batches: the weights computed from the loss
        # table are pushed at each round boundary, so a short round keeps them fresh.
        def make():
            return WeightedStreamingDataset(round_size=batch_size * round_batches, seed=seed, **common)
    else:
        def make():
            return StreamingDataset(**common)
    ds = create_streaming_dataset(make)
    # drop_last: a plain streaming epoch is not a multiple of the batch; every arm trains full batches.
    return DataLoader(ds, batch_size=batch_size, num_workers=0, drop_last=True,
                      collate_fn=partial(collate_bytes, seq_len=corpus.seq_len)), ds


def _algorithms(spec: dict[str, Any]) -> list:
    if spec.get("algorithm") is None:
        return []
    from irdro_sampler.integrations.composer import IRDRO

    return [IRDRO(log_interval=0, **spec["algorithm"])]


def _train(
    *,
    corpus: Corpus,
    mcfg: ModelConfig,
    spec: dict[str, Any],
    steps: int,
    lr: float,
    warmup: int,
    seed: int,
    batch_size: int,
    load_path: str | None,
    save_path: str | None,
    val,
    eval_interval: int,
    desc: str,
    progress: bool,
    workdir: Path,
    round_batches: int,
    schedule: str,
) -> dict[str, Any]:
    """One Composer run; returns the held-out curve, final per-domain losses, draws per domain and,
    for IR-DRO arms, the final loss table and probabilities (:func:`_outcome`). (Its length is its
    keyword-only signature: every knob of a run is passed explicitly, none read from globals.)"""
    from composer.optim import ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler

    val_ids, val_labels, val_dom = val
    shares = corpus.train_shares()
    held, counter = _make_callbacks(val_ids, val_labels, val_dom, corpus.domain_names, shares,
                                    corpus.rare_domains, eval_interval, steps, desc, progress)
    model = build_composer_model(mcfg, seed)
    local = workdir / f"local-{uuid.uuid4().hex[:8]}"
    loader, ds = _dataloader(corpus, spec, batch_size, seed, steps, local, round_batches)
    algorithms = _algorithms(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if schedule == "cosine":
        sched = CosineAnnealingWithWarmupScheduler(t_warmup=f"{warmup}ba", alpha_f=0.1)
    else:
        sched = ConstantWithWarmupScheduler(t_warmup=f"{warmup}ba")
    try:
        return _fit(model=model, loader=loader, steps=steps, opt=opt, sched=sched, algorithms=algorithms, held=held,
                    counter=counter, seed=seed, load_path=load_path, save_path=save_path, corpus=corpus)
    finally:
        # Streaming's prepare/ready threads copy shards into `local` until the epoch is over, also after the
        # run stopped mid-epoch or a SIGTERM unwound the trainer: stop them first, or a shard written after
        # the removal leaves the folder behind.
        _stop_streaming_threads(ds)
        del loader, ds, model, opt
        gc.collect()  # the dataset's shared memory is released before the next run creates its own
        shutil.rmtree(local, ignore_errors=True)


def _stop_streaming_threads(ds: Any) -> None:
    from irdro_sampler.integrations._streaming_compat import current_iteration, stop_iteration

    iteration = current_iteration(ds)
    if iteration is not None:
        stop_iteration(iteration)


def _fit(*, model, loader, steps, opt, sched, algorithms, held, counter, seed, load_path, save_path, corpus):
    """Train with Composer, save the checkpoint if asked, and return :func:`_outcome`. A function of its own
    so that the trainer (and what it holds of the dataset) is gone when :func:`_train` collects garbage."""
    from composer import Trainer

    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=f"{steps}ba",
        optimizers=opt,
        schedulers=sched,
        algorithms=algorithms,
        callbacks=[held, counter],
        device="cpu",
        seed=seed,
        progress_bar=False,
        log_to_console=False,
        loggers=[],
        load_path=load_path,
        load_weights_only=load_path is not None,
        python_log_level=None,
    )
    try:
        trainer.fit()
        if save_path is not None:
            trainer.save_checkpoint(save_path)
        return _outcome(corpus, held, counter, algorithms)
    finally:
        trainer.close()


def _outcome(corpus: Corpus, held: Any, counter: Any, algorithms: list[Any]) -> dict[str, Any]:
    """What a run reports: the held-out curve and final losses, draws per domain, the share of draws on
    noise and, for IR-DRO arms, the final loss table, probabilities, cut threshold and state."""
    shares = corpus.train_shares()
    out: dict[str, Any] = {
        "curve": held.curve,
        "final": held.final,
        "summary": summarize(held.final, shares, corpus.rare_domains),
        "draws": {n: int(c) for n, c in zip(corpus.domain_names, counter.counts, strict=True)},
    }
    total = max(1, int(counter.counts.sum()))
    out["summary"]["noise_draws"] = (
        float(counter.counts[corpus.noise_domain]) / total if corpus.noise_domain is not None else 0.0
    )
    if algorithms and getattr(algorithms[0], "table", None) is not None:
        from irdro_sampler import DROWeighting

        alg = algorithms[0]
        rule = DROWeighting(**alg.rule_options)
        params = rule.fit(alg.table)
        out["table_losses"] = alg.table.losses.copy()
        out["probs"] = rule.probabilities(alg.table, params)
        out["threshold"] = params.threshold
        out["state_dict"] = alg.state_dict()
    return out


# ============================================================================== the demo
def _quiet_libraries() -> None:
    import logging

    warnings.filterwarnings("ignore", message=".*smallest subnormal.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="composer")
    warnings.filterwarnings("ignore", message=".*loss_type=None.*")
    warnings.filterwarnings("ignore", message=".*round_size.*")
    for name in ("composer", "streaming", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every arm for every seed, write ``results.json``, ``table.md`` and the PNG plots into
    ``cfg.out``, print the table, and return the results.

    Killed with SIGINT or SIGTERM, it removes its temporary folders before exiting; after a SIGKILL
    the next run removes them (see :mod:`irdro_sampler.demo.tempdirs`).
    """
    with signals_unwind():
        return _run_demo(cfg)


def _run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from . import report

    t_start = time.time()
    cfg, corpus, val = _prepare(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results, pretrain = _run_arms(cfg, corpus, val)
    elapsed = time.time() - t_start
    table = report.format_table(results)
    prob_arm = _write_plots(cfg, out, corpus, results)
    serial = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "corpus": corpus.to_json(),
        "elapsed_seconds": elapsed,
        "pretrain": pretrain,
        "arms": {arm: [{k: v for k, v in r.items() if k in ("curve", "final", "summary", "draws")} for r in runs]
                 for arm, runs in results.items()},
        "aggregate": {arm: {m: list(v) for m, v in a.items()} for arm, a in report.aggregate(results).items()},
    }
    (out / "results.json").write_text(json.dumps(serial, indent=1, default=_json_default))
    header = (f"# irdro-sampler demo\n\n{cfg.seeds} seed(s), {cfg.pretrain_steps} uniform pretraining steps, then "
              f"{cfg.steps} continual steps per arm, batch {cfg.batch_size}; corpus: "
              + ", ".join(f"{d} {c}" for d, c in corpus.train_counts.items())
              + f" training documents of {corpus.seq_len} bytes; rare domains: {', '.join(corpus.rare_domains)}."
              f" Took {elapsed:.0f} s.\n\n")
    (out / "table.md").write_text(header + table + "\n")
    if not cfg.quiet:
        print()
        print(report.format_table(results, markdown=False))
        print(f"\nwrote {out}/table.md, results.json, heldout_loss.png, draws_per_domain.png"
              + (", probability_vs_loss.png" if prob_arm else "") + f" ({elapsed:.0f} s)")
    return {"results": results, "table": table, "elapsed": elapsed, "corpus": corpus}


def _prepare(cfg: DemoConfig) -> tuple[DemoConfig, Corpus, tuple]:
    """Check the options, set up torch for tiny CPU models, build (or load) the corpus and the held-out set."""
    for arm in cfg.arms:
        if arm not in ARMS and arm not in cfg.arm_options:
            raise DemoInputError(f"arms: unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    if cfg.continual_schedule not in ("constant", "cosine"):
        raise DemoInputError(f"continual_schedule: expected 'constant' or 'cosine', got {cfg.continual_schedule!r}")
    _quiet_libraries()
    # Tiny models on CPU hit denormal floats late in training; flushing them is 5-10x faster. (numpy's
    # float limits are cached first: computed after the flush they warn that the subnormal is zero.)
    np.finfo(np.float32).smallest_subnormal, np.finfo(np.float64).smallest_subnormal  # noqa: B018
    torch.set_flush_denormal(True)
    # One thread: the model is too small for intra-op parallelism to pay, and on a shared machine two
    # spinning OpenMP threads were measured 14x slower per step (70 ms of CPU per step with one thread).
    torch.set_num_threads(cfg.threads or 1)
    try:
        if cfg.data is not None:
            corpus = load_user_data(cfg.data, cfg.seq_len)
        else:
            corpus = build_corpus(cfg.corpus_config(), cfg.cache, quiet=cfg.quiet)
    except ValueError as e:  # bad options or data layout; errors of training itself keep their traceback
        raise DemoInputError(str(e)) from e
    va = read_mds(corpus.val_dir)
    val_ids, val_labels = tokens_tensor(va["tokens"], corpus.seq_len)
    if cfg.tiny:
        cfg = copy.copy(cfg)
        cfg.round_batches = min(cfg.round_batches, 5)  # a few rounds even in a 20-step run
    return cfg, corpus, (val_ids, val_labels, va["domain"])


def _run_arms(cfg: DemoConfig, corpus: Corpus, val: tuple) -> tuple[dict[str, list[dict[str, Any]]], list]:
    """Per seed: uniform pretraining, then every arm continues from its checkpoint."""
    mcfg = cfg.model_config(corpus.seq_len)
    workdir = owned_tempdir("irdro-demo-")
    results: dict[str, list[dict[str, Any]]] = {a: [] for a in cfg.arms}
    pretrain: list[dict[str, Any]] = []
    warm_pre = max(1, min(50, cfg.pretrain_steps // 10))
    try:
        for seed in range(cfg.seeds):
            ckpt = workdir / f"pretrain-seed{seed}.pt"
            pre = _train(corpus=corpus, mcfg=mcfg, spec=ARMS["uniform"], steps=cfg.pretrain_steps, lr=cfg.lr_pretrain,
                         warmup=warm_pre, seed=seed, batch_size=cfg.batch_size, load_path=None, save_path=str(ckpt),
                         val=val, eval_interval=max(1, cfg.pretrain_steps // 4), desc=f"pretrain seed {seed}",
                         progress=cfg.progress, workdir=workdir, round_batches=cfg.round_batches, schedule="cosine")
            pretrain.append({"summary": pre["summary"], "final": pre["final"]})
            if not cfg.quiet:
                print(f"seed {seed}: pretrained {cfg.pretrain_steps} steps, held-out mean "
                      f"{pre['summary']['mean']:.3f}, worst {pre['summary']['worst']:.3f}", file=sys.stderr)
            for arm in cfg.arms:
                spec = cfg.arm_spec(arm)
                r = _train(corpus=corpus, mcfg=mcfg, spec=spec, steps=cfg.steps, lr=cfg.lr, warmup=max(1, cfg.steps // 20),
                           seed=seed, batch_size=cfg.batch_size, load_path=str(ckpt), save_path=None, val=val,
                           eval_interval=cfg.eval_interval, desc=f"{arm} seed {seed}", progress=cfg.progress,
                           workdir=workdir, round_batches=cfg.round_batches, schedule=cfg.continual_schedule)
                results[arm].append(r)
                if not cfg.quiet:
                    s = r["summary"]
                    print(f"seed {seed} {arm:<14} mean {s['mean']:.3f}  worst {s['worst']:.3f}  rare {s['rare']:.3f}"
                          f"  noise draws {100 * s['noise_draws']:.1f}%", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results, pretrain


def _write_plots(cfg: DemoConfig, out: Path, corpus: Corpus, results: dict[str, list[dict[str, Any]]]) -> str | None:
    """The held-out curves, draws per domain and (first IR-DRO arm, seed 0) probability vs loss plots,
    and that arm's saved state; returns the arm plotted, if any."""
    from . import report

    report.plot_curves(results, out / "heldout_loss.png")
    shares = {**corpus.train_shares()}
    if corpus.noise_domain is not None:
        tot = sum(corpus.train_counts.values())
        shares = {d: c / tot for d, c in corpus.train_counts.items()}
    draws = {arm: {d: float(np.mean([r["draws"][d] for r in runs])) for d in corpus.domain_names}
             for arm, runs in results.items()}
    report.plot_draws_per_domain(draws, shares, out / "draws_per_domain.png")
    prob_arm = next((a for a in cfg.arms if "probs" in results[a][0]), None)
    if prob_arm is not None:
        r0 = results[prob_arm][0]
        train_domains = read_mds(corpus.train_dir)["domain"]
        report.plot_probability_vs_loss(r0["table_losses"], r0["probs"], train_domains, corpus.domain_names,
                                        r0["threshold"], out / "probability_vs_loss.png",
                                        title=f"arm {prob_arm}, seed 0: probability vs running loss at the end")
        save_state(r0["state_dict"], out / f"irdro_state_{prob_arm}.pt")
    return prob_arm


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer | np.floating):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)
