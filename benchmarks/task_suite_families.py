"""The randomised task suite's families: a configuration (a dict from ``task_suite.draw_configs``) and a
seed in, a :class:`tasks.Task` out. Nothing is downloaded: the data are synthetic, scikit-learn's bundled
digits, or Python standard-library text.

* ``gmm``: synthetic classification, ``classes`` Gaussian-mixture classes (two components each) in
  ``dim`` dimensions, class sizes Zipf-distributed with exponent ``zipf`` (0 = flat).
* ``digits``: scikit-learn's bundled 8x8 digits restricted to ``classes`` (5-10) classes, training
  class sizes Zipf-distributed as above, 40% of each class held out (a balanced test set).
* ``regression``: a random teacher network on Gaussian inputs in arbitrary target units (``y_unit``),
  clean noise with light (Gaussian) or heavy (Student-t, 2.5 degrees of freedom) tails; a rare region
  (``x0 > 1``, 16% of the population) is kept at ``rare_keep`` of its share in training and has its
  own extra term, so it needs its own fit.
* ``lm``: the demo's byte-level corpus (``irdro_sampler.demo.data``: two common and three rare
  standard-library domains) and tiny GPT-2, trained from a shared uniformly pretrained checkpoint.

Noise kinds: ``symmetric`` (a label flipped to a random other class), ``pair`` (each class to one fixed
other class), ``outliers`` (target + 3 standard deviations of y times a Student-t(2) draw),
``random-bytes`` (documents of uniform random bytes, as a share of the training set).

Classifier metrics are the balanced test set's accuracy, the mean accuracy of the rare classes (the
30% of classes with the fewest training samples) and the worst class's accuracy; regression and LM
metrics are negated (RMSE, held-out loss) so that higher is better everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tasks import Task

#: The share of classes (fewest training samples first) whose mean accuracy is the "rare" metric.
RARE_CLASS_SHARE = 0.3


def zipf_sizes(classes: int, largest: int, exponent: float, smallest: int = 6) -> np.ndarray:
    """Class sizes ``largest * (rank + 1) ** -exponent`` (at least ``smallest``), largest first."""
    sizes = np.round(largest * (np.arange(classes) + 1.0) ** -exponent).astype(np.int64)
    return np.maximum(sizes, smallest)


def flip_labels(y: np.ndarray, noisy: np.ndarray, classes: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``y`` with the ``noisy`` samples' labels flipped (never to their own class)."""
    y = y.copy()
    if kind == "symmetric":
        shift = rng.integers(1, classes, size=y.size)
        y[noisy] = (y[noisy] + shift[noisy]) % classes
    elif kind == "pair":
        perm = rng.permutation(classes)  # class perm[k] is confused with perm[k + 1]: a derangement
        pair_of = np.empty(classes, dtype=np.int64)
        pair_of[perm] = np.roll(perm, -1)
        y[noisy] = pair_of[y[noisy]]
    elif kind != "none":
        raise ValueError(f"label noise must be none, symmetric or pair, got {kind!r}")
    return y


def _classification_task(cfg: dict[str, Any], seed: int, x_tr, y_tr, x_te, y_te) -> Task:
    k = cfg["classes"]
    counts = np.bincount(y_tr, minlength=k)
    n_rare = max(1, int(round(RARE_CLASS_SHARE * k)))
    rare_classes = np.lexsort((np.arange(k), counts))[:n_rare]  # fewest samples first, ties by class id
    rng = np.random.default_rng([seed, 101])
    noisy = rng.random(y_tr.size) < cfg["noise"] if cfg["noise_kind"] != "none" else np.zeros(y_tr.size, bool)
    y_noisy = flip_labels(y_tr, noisy, k, cfg["noise_kind"], rng)
    return Task(
        name=cfg["name"], x=torch.from_numpy(x_tr.astype(np.float32)), y=torch.from_numpy(y_noisy),
        rare=np.isin(y_tr, rare_classes), noisy=noisy, x_test=torch.from_numpy(x_te.astype(np.float32)),
        y_test=torch.from_numpy(y_te), rare_test=np.isin(y_te, rare_classes), kind="classification",
        num_outputs=k, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], width=cfg["width"],
        layers=cfg["layers"], steps=cfg["steps"],
    )


def gmm_task(cfg: dict[str, Any], seed: int) -> Task:
    """Data fixed by the configuration's ``data_seed``; the seed draws the label noise (and, in ``run_arm``,
    the model's initialisation and the order)."""
    rng = np.random.default_rng([cfg["data_seed"], 1])
    k, d = cfg["classes"], cfg["dim"]
    # Two mixture components per class; the centres' scale shrinks with the dimension so that
    # ``separation`` means about the same difficulty in 8 or 32 dimensions.
    centres = rng.normal(0.0, cfg["separation"] * (8.0 / d) ** 0.75, size=(k, 2, d))
    sizes = zipf_sizes(k, cfg["largest_class"], cfg["zipf"])
    sizes = sizes[rng.permutation(k)]  # which class is rare is random

    def sample(per_class: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(k), per_class)
        comp = rng.integers(0, 2, size=y.size)
        return centres[y, comp] + rng.normal(size=(y.size, d)), y

    x_tr, y_tr = sample(sizes)
    x_te, y_te = sample(np.full(k, cfg["test_per_class"]))
    return _classification_task(cfg, seed, x_tr, y_tr, x_te, y_te)


def digits_task(cfg: dict[str, Any], seed: int) -> Task:
    from sklearn.datasets import load_digits

    d = load_digits()
    x_all, y_all = d.data / 16.0, d.target
    rng = np.random.default_rng([cfg["data_seed"], 2])
    k = cfg["classes"]
    chosen = np.sort(rng.choice(10, size=k, replace=False))
    largest = cfg["largest_class"]
    sizes = zipf_sizes(k, largest, cfg["zipf"])[rng.permutation(k)]
    tr, te = [], []
    for new, c in enumerate(chosen):
        idx = rng.permutation(np.flatnonzero(y_all == c))
        n_test = int(round(0.4 * idx.size))
        te.append((idx[:n_test], new))
        tr.append((idx[n_test : n_test + min(sizes[new], idx.size - n_test)], new))
    x_tr = np.concatenate([x_all[i] for i, _ in tr])
    y_tr = np.concatenate([np.full(i.size, c) for i, c in tr]).astype(np.int64)
    x_te = np.concatenate([x_all[i] for i, _ in te])
    y_te = np.concatenate([np.full(i.size, c) for i, c in te]).astype(np.int64)
    return _classification_task(cfg, seed, x_tr, y_tr, x_te, y_te)


def regression_task(cfg: dict[str, Any], seed: int) -> Task:
    rng = np.random.default_rng([cfg["data_seed"], 3])
    d, h = cfg["dim"], 32
    w1 = rng.normal(size=(d, h)) / np.sqrt(d)
    w2 = rng.normal(size=h) / np.sqrt(h)
    bump = rng.normal(size=d) / np.sqrt(d)

    def teacher(x: np.ndarray) -> np.ndarray:
        f = np.tanh(x @ w1 * 1.5) @ w2
        return f + (x[:, 0] > 1.0) * 1.5 * np.sin(2.0 * x @ bump + 1.0)  # the rare region's own term

    def clean_noise(n: int) -> np.ndarray:
        if cfg["tails"] == "heavy":
            return 0.25 * rng.standard_t(2.5, size=n)
        return 0.25 * rng.normal(size=n)

    def population(n: int) -> np.ndarray:
        return rng.normal(size=(n, d))

    x = population(int(cfg["n_train"] / (0.84 + 0.16 * cfg["rare_keep"])))
    rare = x[:, 0] > 1.0
    x = x[~rare | (rng.random(len(x)) < cfg["rare_keep"])]
    x_te = population(cfg["n_test"])
    unit, offset = cfg["y_unit"], cfg["y_offset"]
    y = (teacher(x) + clean_noise(len(x))) * unit + offset
    y_te = (teacher(x_te) + clean_noise(len(x_te))) * unit + offset
    rng = np.random.default_rng([seed, 103])
    noisy = rng.random(len(x)) < cfg["noise"] if cfg["noise_kind"] != "none" else np.zeros(len(x), bool)
    y_noisy = y.copy()
    y_noisy[noisy] += 3.0 * y.std() * rng.standard_t(2, size=int(noisy.sum()))
    q75, q25 = np.percentile(y_noisy, [75, 25])
    return Task(
        name=cfg["name"], x=torch.from_numpy(x.astype(np.float32)), y=torch.from_numpy(y_noisy.astype(np.float32)),
        rare=x[:, 0] > 1.0, noisy=noisy, x_test=torch.from_numpy(x_te.astype(np.float32)),
        y_test=torch.from_numpy(y_te.astype(np.float32)), rare_test=x_te[:, 0] > 1.0, kind="regression",
        num_outputs=1, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], width=cfg["width"],
        layers=cfg["layers"], steps=cfg["steps"], y_scale=float((q75 - q25) / 1.349),
    )


def lm_task(cfg: dict[str, Any], seed: int) -> Task:
    """The demo corpus in memory; the seed draws the noise documents and which domain each claims to be.

    The "groups" a user would pass are the documents' source domains: a noise document carries the
    domain of a random source (junk sits inside every source). ``steps`` is the continual phase; every
    arm starts from one checkpoint pretrained uniformly for ``pretrain_steps`` on the same (noisy) data.
    """
    from irdro_sampler.demo.data import CorpusConfig, _domain_documents

    cc = CorpusConfig(seq_len=cfg["seq_len"], common_docs=cfg["common_docs"], rare_docs=cfg["rare_docs"],
                      heldout_docs=cfg["heldout_docs"], noise_share=0.0, seed=cfg["data_seed"])
    tr_tok, tr_dom, va_tok, va_dom, counts, _ = _domain_documents(cc, np.random.default_rng(cfg["data_seed"]))
    tok, dom = np.concatenate(tr_tok), np.concatenate(tr_dom)
    names = list(cc.domains)
    rng = np.random.default_rng([seed, 104])
    n_noise = int(round(cfg["noise"] / (1.0 - cfg["noise"]) * len(tok))) if cfg["noise_kind"] != "none" else 0
    tok = np.concatenate([tok, rng.integers(0, 256, size=(n_noise, cfg["seq_len"]), dtype=np.uint8)])
    noisy = np.arange(len(tok)) >= len(dom)
    claimed = np.concatenate([dom, rng.integers(0, len(names), size=n_noise)])
    clean_total = sum(counts.values())
    x = torch.from_numpy(tok.astype(np.int64))
    return Task(
        name=cfg["name"], x=x, y=x, rare=np.isin(claimed, np.arange(cc.num_common, len(names))) & ~noisy,
        noisy=noisy, x_test=torch.from_numpy(np.concatenate(va_tok).astype(np.int64)),
        y_test=torch.from_numpy(np.concatenate(va_dom)), rare_test=np.concatenate(va_dom) >= cc.num_common,
        kind="lm", num_outputs=256, epochs=1, batch_size=cfg["batch_size"], lr=cfg["lr"], width=cfg["width"],
        layers=cfg["layers"], steps=cfg["steps"], group_labels=claimed.astype(np.int64),
        meta={"domains": names, "rare_domains": names[cc.num_common :],
              "train_shares": {d: c / clean_total for d, c in counts.items()}},
    )


def pretrained(task: Task, cfg: dict[str, Any], seed: int) -> Task:
    """``task`` with ``init_state`` set: ``pretrain_steps`` of uniform shuffled epochs from the seed's init."""
    import dataclasses

    from tasks import run_arm

    warm = dataclasses.replace(task, steps=cfg["pretrain_steps"], lr=cfg["pretrain_lr"])
    state = run_arm(warm, "uniform", None, seed=10_000 + seed, return_state=True)["state"]
    return dataclasses.replace(task, init_state=state)


BUILDERS = {"gmm": gmm_task, "digits": digits_task, "regression": regression_task, "lm": lm_task}


def make_task(cfg: dict[str, Any], seed: int) -> Task:
    """The configuration's task at ``seed`` (LM tasks come pretrained)."""
    task = BUILDERS[cfg["family"]](cfg, seed)
    if cfg["family"] == "lm":
        task = pretrained(task, cfg, seed)
    return task
