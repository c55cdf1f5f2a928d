"""The demo's built-in corpus: Python standard-library source as bytes, in domains, plus noise.

Nothing is downloaded. The text comes from the running interpreter's standard library
(``sysconfig.get_paths()['stdlib']``), is cut into fixed-length byte documents, and is grouped into
domains by top-level package: two common ones (``asyncio`` code and ``pydoc_data`` prose) and three
rare ones (``email``, ``xml``, ``json``). A share of documents made of uniformly random bytes stands
for the corrupt data real corpora contain: their loss stays near ln(256) = 5.55 nats whatever the model
learns, so a loss-seeking sampler that does not cut them would waste its budget on them.

The corpus is written once, with streaming's ``MDSWriter``, into a cache folder keyed by every
option that changes its content::

    <cache>/<key>/train/   MDS shards, columns tokens (bytes, seq_len long) and domain (int)
    <cache>/<key>/val/     held-out documents of every clean domain, same columns
    <cache>/<key>/meta.json  domain names, counts, options

``--data DIR`` in the CLI takes a user's own MDS text dataset instead (see :func:`load_user_data`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .tempdirs import owned_tempdir

#: Format version of the cache; bump when the layout or content rules change.
CACHE_VERSION = 2

#: Default domains: name -> stdlib sub-directory. The first two are the common ones.
DEFAULT_DOMAINS: dict[str, str] = {
    "code": "asyncio",
    "prose": "pydoc_data",
    "email": "email",
    "xml": "xml",
    "json": "json",
}

NOISE = "noise"


def default_cache_dir() -> Path:
    """``$IRDRO_SAMPLER_CACHE`` or ``~/.cache/irdro-sampler``."""
    env = os.environ.get("IRDRO_SAMPLER_CACHE")
    if env:
        return Path(env)
    return Path(os.path.expanduser("~")) / ".cache" / "irdro-sampler"


@dataclass
class CorpusConfig:
    """What goes into the demo corpus.

    ``common_docs``/``rare_docs`` are training documents per common/rare domain (a rare domain that
    has fewer documents in the stdlib gets what there is, after its held-out share). ``noise_share``
    is the fraction of the *training* set made of random-byte documents (0 <= share < 1).
    """

    seq_len: int = 128
    common_docs: int = 3000
    rare_docs: int = 240
    heldout_docs: int = 96
    noise_share: float = 0.05
    seed: int = 0
    domains: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_DOMAINS))
    num_common: int = 2

    def validate(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 8:
            raise ValueError(f"seq_len must be an int >= 8, got {self.seq_len!r}")
        for name in ("common_docs", "rare_docs", "heldout_docs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (0.0 <= float(self.noise_share) < 1.0):
            raise ValueError(f"noise_share must be in [0, 1), got {self.noise_share!r}")
        if not (0 < self.num_common <= len(self.domains)):
            raise ValueError(f"num_common must be in [1, {len(self.domains)}], got {self.num_common!r}")

    def key(self) -> str:
        """Cache key: every option that changes the content, plus the interpreter version."""
        blob = json.dumps(
            {"v": CACHE_VERSION, "py": sys.version_info[:2], **asdict(self)}, sort_keys=True
        ).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


@dataclass
class Corpus:
    """A built corpus on disk (paths) plus the facts the demo needs about it."""

    root: Path
    train_dir: Path
    val_dir: Path
    seq_len: int
    domain_names: list[str]  # index = domain id; the noise domain (if any) is last
    rare_domains: list[str]
    train_counts: dict[str, int]
    val_counts: dict[str, int]
    noise_domain: int | None  # domain id of noise documents, None if there are none

    @property
    def num_train(self) -> int:
        return int(sum(self.train_counts.values()))

    def train_shares(self) -> dict[str, float]:
        """Each clean domain's share of the clean training documents (weights of the overall mean)."""
        clean = {d: c for d, c in self.train_counts.items() if d != NOISE}
        tot = sum(clean.values())
        return {d: c / tot for d, c in clean.items()}

    def to_json(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "domain_names": self.domain_names,
            "rare_domains": self.rare_domains,
            "train_counts": self.train_counts,
            "val_counts": self.val_counts,
            "noise_domain": self.noise_domain,
        }

    @classmethod
    def from_root(cls, root: str | os.PathLike) -> Corpus:
        root = Path(root)
        meta = json.loads((root / "meta.json").read_text())
        return cls(
            root=root,
            train_dir=root / "train",
            val_dir=root / "val",
            seq_len=int(meta["seq_len"]),
            domain_names=list(meta["domain_names"]),
            rare_domains=list(meta["rare_domains"]),
            train_counts={k: int(v) for k, v in meta["train_counts"].items()},
            val_counts={k: int(v) for k, v in meta["val_counts"].items()},
            noise_domain=meta["noise_domain"],
        )


def _domain_bytes(subdir: Path) -> bytes:
    """All ``.py`` files under ``subdir`` (sorted, so the corpus is reproducible), concatenated."""
    parts = []
    for dirpath, dirnames, filenames in os.walk(subdir):
        dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "tests", "test"))
        for f in sorted(filenames):
            if f.endswith(".py"):
                parts.append(Path(dirpath, f).read_bytes())
    return b"\n".join(parts)


def _chunks(data: bytes, seq_len: int) -> np.ndarray:
    n = len(data) // seq_len
    return np.frombuffer(data[: n * seq_len], dtype=np.uint8).reshape(n, seq_len)


def _write_mds(out: Path, tokens: np.ndarray, domains: np.ndarray) -> None:
    from streaming import MDSWriter

    # About 8 shards whatever the size, so that even the tiny test corpus has several (streaming's
    # partitioning and shard-locality paths get exercised as they would be on real data).
    size_limit = max(1 << 12, min(1 << 20, tokens.nbytes // 8))
    with MDSWriter(out=str(out), columns={"tokens": "bytes", "domain": "int"}, size_limit=size_limit) as w:
        for t, d in zip(tokens, domains, strict=True):
            w.write({"tokens": t.tobytes(), "domain": int(d)})


def build_corpus(
    config: CorpusConfig | None = None, cache: str | os.PathLike | None = None, *, quiet: bool = False
) -> Corpus:
    """Build the default corpus into ``cache`` (once; later calls return the cached copy).

    Deterministic for a given config and Python version. Written into a temporary folder and renamed,
    so an interrupted build never leaves a half-written cache behind.
    """
    config = config or CorpusConfig()
    config.validate()
    cache = Path(cache) if cache is not None else default_cache_dir()
    root = cache / f"corpus-{config.key()}"
    if (root / "meta.json").exists():
        return Corpus.from_root(root)

    rng = np.random.default_rng(config.seed)
    names = list(config.domains)
    train_tok, train_dom, val_tok, val_dom, train_counts, val_counts = _domain_documents(config, rng)

    n_clean = sum(train_counts.values())
    n_noise = int(round(config.noise_share / (1.0 - config.noise_share) * n_clean))
    noise_domain = None
    if n_noise > 0:
        noise_domain = len(names)
        names.append(NOISE)
        train_tok.append(rng.integers(0, 256, size=(n_noise, config.seq_len), dtype=np.uint8))
        train_dom.append(np.full(n_noise, noise_domain))
        train_counts[NOISE] = n_noise

    tok = np.concatenate(train_tok)
    dom = np.concatenate(train_dom)
    order = rng.permutation(len(tok))  # mix domains over shards, as a shuffled corpus would be
    tok, dom = tok[order], dom[order]
    corpus_meta = {
        "seq_len": config.seq_len,
        "domain_names": names,
        "rare_domains": list(config.domains)[config.num_common :],
        "train_counts": train_counts,
        "val_counts": val_counts,
        "noise_domain": noise_domain,
        "config": asdict(config),
        "python": sys.version,
    }
    _write_corpus(cache, root, (tok, dom), (np.concatenate(val_tok), np.concatenate(val_dom)), corpus_meta)
    if not quiet:
        print(f"built corpus {root} ({len(tok)} training documents)", file=sys.stderr)
    return Corpus.from_root(root)


def _domain_documents(config: CorpusConfig, rng: np.random.Generator) -> tuple[list, list, list, list, dict, dict]:
    """Each domain's standard-library text in documents, split into held-out and training ones."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_tok, train_dom, val_tok, val_dom = [], [], [], []
    train_counts: dict[str, int] = {}
    val_counts: dict[str, int] = {}
    for d, name in enumerate(config.domains):
        sub = stdlib / config.domains[name]
        if not sub.is_dir():
            raise ValueError(f"domain {name!r}: {sub} is not a directory of the standard library")
        docs = _chunks(_domain_bytes(sub), config.seq_len)
        docs = docs[rng.permutation(len(docs))]
        n_val = min(config.heldout_docs, len(docs) // 3)
        want = config.common_docs if d < config.num_common else config.rare_docs
        n_tr = min(want, len(docs) - n_val)
        if n_val < 1 or n_tr < 1:
            raise ValueError(f"domain {name!r} has too little text for seq_len={config.seq_len}")
        val_tok.append(docs[:n_val])
        val_dom.append(np.full(n_val, d))
        train_tok.append(docs[n_val : n_val + n_tr])
        train_dom.append(np.full(n_tr, d))
        train_counts[name] = int(n_tr)
        val_counts[name] = int(n_val)
    return train_tok, train_dom, val_tok, val_dom, train_counts, val_counts


def _write_corpus(cache: Path, root: Path, train: tuple, val: tuple, meta: dict[str, Any]) -> None:
    """Write the MDS splits and ``meta.json`` into a temporary folder, then rename it to ``root``."""
    cache.mkdir(parents=True, exist_ok=True)
    tmp = owned_tempdir(".build-", cache)  # removed below, or by the next build if this one is SIGKILLed
    try:
        _write_mds(tmp / "train", *train)
        _write_mds(tmp / "val", *val)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process built the same corpus concurrently; theirs is identical.
            if not (root / "meta.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def create_streaming_dataset(make: Callable[[], Any], attempts: int = 8) -> Any:
    """``make()`` (a StreamingDataset constructor call), retried when it loses the shared-memory race.

    Streaming picks a shared-memory prefix by scanning /dev/shm; two processes creating datasets at the
    same moment (parallel benchmark runs) can pick the same one, and one of them gets FileExistsError.
    Empty blocks a killed run left there are removed first, and SIGINT/SIGTERM wait until the dataset
    exists: raised while streaming creates a block, they would leave another one (see
    :func:`~irdro_sampler.integrations._streaming_compat.remove_stale_empty_blocks`).
    """
    from ..integrations._streaming_compat import remove_stale_empty_blocks
    from .tempdirs import signals_deferred

    remove_stale_empty_blocks()
    for attempt in range(attempts):
        try:
            with signals_deferred():
                return make()
        except FileExistsError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def read_mds(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a whole local MDS folder into memory (``tokens`` as an (n, seq_len) uint8 array or a list
    of byte strings if lengths differ, ``domain`` as int64 if present, ``text`` kept as given).

    Used for the held-out set and for tests; training data goes through streaming.
    """
    from streaming import StreamingDataset

    ds = create_streaming_dataset(lambda: StreamingDataset(local=str(folder), shuffle=False, batch_size=1))
    toks, doms = [], []
    for i in range(ds.num_samples):
        s = ds.get_item(i)
        if "tokens" in s:
            t = s["tokens"]
        elif "text" in s:
            t = s["text"].encode("utf-8")
        else:
            raise ValueError(f"{folder}: samples need a 'tokens' (bytes) or 'text' (str) column, got {list(s)}")
        toks.append(np.frombuffer(t, dtype=np.uint8) if isinstance(t, bytes) else np.asarray(t, np.uint8))
        doms.append(int(s.get("domain", 0)))
    return {"tokens": toks, "domain": np.asarray(doms, dtype=np.int64)}


def load_user_data(data_dir: str | os.PathLike, seq_len: int) -> Corpus:
    """Describe a user's MDS dataset for the demo.

    Expected layout: ``DIR/train`` and ``DIR/val`` MDS folders (each with an ``index.json``; the held-out
    set is needed for the evaluation). Columns: ``tokens`` (bytes) or ``text`` (str), optional
    ``domain`` (int; domains under half the average share count as rare). Documents are cut or zero-padded to ``seq_len`` bytes by the collate function.
    """
    root = Path(data_dir)
    train, val = root / "train", root / "val"
    if not (train / "index.json").exists() or not (val / "index.json").exists():
        raise ValueError(
            f"--data {data_dir!s}: expected MDS folders {train}/ and {val}/ (each with an index.json)"
        )
    tr = read_mds(train)
    va = read_mds(val)
    ids = sorted(set(tr["domain"].tolist()) | set(va["domain"].tolist()))
    names = [f"domain{d}" for d in range(max(ids) + 1)]
    train_counts = {names[d]: int((tr["domain"] == d).sum()) for d in ids}
    val_counts = {names[d]: int((va["domain"] == d).sum()) for d in ids}
    shares = {k: v / max(1, sum(train_counts.values())) for k, v in train_counts.items()}
    rare = [k for k, s in shares.items() if s < 0.5 / max(1, len(ids))]
    return Corpus(
        root=root,
        train_dir=train,
        val_dir=val,
        seq_len=seq_len,
        domain_names=names,
        rare_domains=rare,
        train_counts=train_counts,
        val_counts=val_counts,
        noise_domain=None,
    )
