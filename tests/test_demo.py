"""The demo: corpus build (real MDS shards), model/eval helpers, and the CLI end to end in a tiny configuration."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from irdro_sampler.demo.data import NOISE, CorpusConfig, build_corpus, read_mds
from irdro_sampler.demo.model import ModelConfig, build_hf_model, collate_bytes, per_sequence_loss, summarize

TINY = CorpusConfig(seq_len=32, common_docs=120, rare_docs=20, heldout_docs=8, noise_share=0.1)


def test_corpus_build_layout_and_counts(tmp_path):
    c = build_corpus(TINY, tmp_path, quiet=True)
    assert c.domain_names == ["code", "prose", "email", "xml", "json", NOISE]
    assert c.rare_domains == ["email", "xml", "json"]
    assert c.train_counts["code"] == 120 and c.train_counts["email"] == 20
    n_clean = 2 * 120 + 3 * 20
    assert c.train_counts[NOISE] == round(0.1 / 0.9 * n_clean)
    tr, va = read_mds(c.train_dir), read_mds(c.val_dir)
    assert len(tr["tokens"]) == c.num_train
    assert all(len(t) == 32 for t in tr["tokens"])
    assert np.bincount(tr["domain"]).tolist() == [c.train_counts[d] for d in c.domain_names]
    assert set(va["domain"].tolist()) == set(range(5))  # held-out: every clean domain, no noise
    # Held-out documents are not training documents.
    train_set = {bytes(t) for t in tr["tokens"]}
    assert sum(bytes(t) in train_set for t in va["tokens"]) <= 1
    # Noise documents are random bytes; clean ones are mostly printable text.
    noise = np.stack([t for t, d in zip(tr["tokens"], tr["domain"], strict=True) if d == c.noise_domain])
    clean = np.stack([t for t, d in zip(tr["tokens"], tr["domain"], strict=True) if d != c.noise_domain])
    assert (noise >= 128).mean() > 0.4 and (clean >= 128).mean() < 0.01
    # Several shards, so streaming's shard handling is exercised.
    assert len(json.loads((c.train_dir / "index.json").read_text())["shards"]) >= 2


def test_corpus_is_cached_and_deterministic(tmp_path):
    a = build_corpus(TINY, tmp_path / "a", quiet=True)
    stamp = (a.root / "meta.json").stat().st_mtime_ns
    time.sleep(0.01)
    again = build_corpus(TINY, tmp_path / "a", quiet=True)
    assert again.root == a.root and (a.root / "meta.json").stat().st_mtime_ns == stamp
    b = build_corpus(TINY, tmp_path / "b", quiet=True)
    ta, tb = read_mds(a.train_dir), read_mds(b.train_dir)
    assert all(np.array_equal(x, y) for x, y in zip(ta["tokens"], tb["tokens"], strict=True))
    # A different noise share is a different corpus.
    other = build_corpus(CorpusConfig(**{**TINY.__dict__, "noise_share": 0.0}), tmp_path / "a", quiet=True)
    assert other.root != a.root and other.noise_domain is None and NOISE not in other.train_counts
    assert not [p for p in os.listdir(tmp_path / "a") if p.startswith(".build-")]


@pytest.mark.parametrize(
    "field,value",
    [("seq_len", 4), ("common_docs", 0), ("noise_share", 1.0), ("noise_share", -0.1), ("num_common", 9)],
)
def test_corpus_config_rejects_bad_values(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        build_corpus(CorpusConfig(**{**TINY.__dict__, field: value}), tmp_path, quiet=True)
    assert not any(tmp_path.iterdir())


def test_collate_pads_with_ignored_labels_and_loss_matches_model():
    batch = collate_bytes([{"tokens": b"abcdef", "sample_idx": 3, "domain": 1}, {"text": "xy", "sample_idx": 9}], 8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][0, :6].tolist() == list(b"abcdef") and batch["labels"][0, 6:].tolist() == [-100, -100]
    assert batch["labels"][1, 2:].eq(-100).all()
    assert batch["sample_idx"].tolist() == [3, 9] and "domain" not in batch  # not every sample has a domain
    model = build_hf_model(ModelConfig(n_layer=1, n_embd=16, n_head=2, seq_len=8), seed=0)
    ids = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    per = per_sequence_loss(model, ids, ids)
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss
    assert torch.allclose(per.mean(), ref, atol=1e-5)  # equal lengths: mean of means = token mean


def test_summarize_weights_domains_by_training_share():
    per = {"a": 1.0, "b": 2.0, "r": 4.0}
    s = summarize(per, {"a": 0.5, "b": 0.25, "r": 0.25}, ["r"])
    assert s["mean"] == pytest.approx(0.5 + 0.5 + 1.0)
    assert s["worst"] == 4.0 and s["rare"] == 4.0 and s["macro"] == pytest.approx(7 / 3)


def _run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "irdro_sampler.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_demo_tiny_end_to_end(tmp_path):
    """The whole demo through Composer + IRDRO + WeightedStreamingDataset, in a tiny configuration."""
    out = tmp_path / "out"
    t0 = time.time()
    proc = _run_cli("demo", "--tiny", "--steps", "30", "--pretrain-steps", "20", "--eval-interval", "10",
                    "--noise", "0.1", "--out", str(out), "--cache", str(tmp_path / "cache"), "--no-progress",
                    "--threads", "1")
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "table.md").read_text()
    for arm in ("uniform", "irdro", "irdro-nocut", "reweight"):
        assert f"| {arm} |" in table
    for png in ("heldout_loss.png", "draws_per_domain.png", "probability_vs_loss.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    res = json.loads((out / "results.json").read_text())
    arms = res["arms"]
    pre = res["pretrain"][0]["summary"]["mean"]
    for arm, runs in arms.items():
        s = runs[0]["summary"]
        assert all(math.isfinite(s[k]) for k in ("mean", "worst", "rare", "macro")), arm
        # Sane magnitudes: bytes are at most ln(256) = 5.55 nats; training keeps improving on pretraining.
        assert 0.5 < s["mean"] < 5.6 and s["worst"] >= s["mean"] - 1e-9
        assert s["mean"] < pre, (arm, s["mean"], pre)
        assert sum(runs[0]["draws"].values()) == 30 * 32
        curve = runs[0]["curve"]
        assert [c["step"] for c in curve] == [0, 10, 20, 30]
    # 960 draws per arm at 10% noise: without a cut IR-DRO chases the noise (its loss stays at ~5.5
    # nats, the highest), the cut keeps it out once the noise has been seen. Two-proportion z-test,
    # one-sided at z > 3 (a false failure has probability ~1e-3 even if the true gap were 0... and it
    # is not: the tilt multiplies the noise's mass by ~e^2).
    p_nocut = arms["irdro-nocut"][0]["summary"]["noise_draws"]
    p_cut = arms["irdro"][0]["summary"]["noise_draws"]
    pooled = (p_nocut + p_cut) / 2
    z = (p_nocut - p_cut) / math.sqrt(2 * pooled * (1 - pooled) / (30 * 32))
    assert z > 3, (p_nocut, p_cut, z)
    # The saved IR-DRO state: every noise document seen is cut (only the floor reaches it), and inspect reads it.
    from irdro_sampler.cli import load_inspection

    ins = load_inspection(out / "irdro_state_irdro.pt")
    dom = read_mds(tmp_path / "cache" / os.listdir(tmp_path / "cache")[0] / "train")["domain"]
    noise_id = res["corpus"]["noise_domain"]
    seen_noise = (dom == noise_id) & ~np.isnan(ins.losses)
    assert seen_noise.sum() > 0 and np.all(ins.probs[seen_noise] <= 0.1 / ins.probs.size * (1 + 1e-9))
    assert elapsed < 120, f"tiny demo took {elapsed:.0f} s"


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--arms", "uniform,bogus"], "--arms"),
        (["--data", "/nonexistent/dir"], "--data"),
        (["--noise", "1.5"], "--noise"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_demo_bad_arguments(tmp_path, capsys, args, msg):
    from irdro_sampler.cli import main

    try:
        code = main(["demo", "--out", str(tmp_path / "o"), *args])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and msg in err
    assert not (tmp_path / "o").exists()


def test_demo_user_data_layout_error_no_traceback(tmp_path):
    (tmp_path / "d").mkdir()
    proc = _run_cli("demo", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "expected MDS folders" in proc.stderr


@pytest.mark.slow
def test_demo_on_user_mds_data(tmp_path):
    """``--data DIR``: the user's own MDS folders (here: a corpus built elsewhere, with a 'text' column)."""
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("val", 32)):
        with MDSWriter(out=str(tmp_path / "d" / split), columns={"text": "str", "domain": "int"}) as w:
            for i in range(n):
                d = int(i % 8 == 0)  # domain 1 is rare
                word = "alpha beta gamma " if d == 0 else "x=1; y=[2, 3]; "
                w.write({"text": (word * 4)[: int(rng.integers(20, 32))], "domain": d})
    out = tmp_path / "out"
    proc = _run_cli("demo", "--data", str(tmp_path / "d"), "--tiny", "--steps", "10", "--pretrain-steps", "10",
                    "--eval-interval", "5", "--arms", "uniform,irdro", "--out", str(out), "--no-progress",
                    "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["corpus"]["domain_names"] == ["domain0", "domain1"] and res["corpus"]["rare_domains"] == ["domain1"]
    assert set(res["arms"]) == {"uniform", "irdro"}
    assert all(math.isfinite(r[0]["summary"]["mean"]) for r in res["arms"].values())


def _start_demo(tmp_path, tmpdir):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TMPDIR": str(tmpdir)}
    return subprocess.Popen(
        [sys.executable, "-m", "irdro_sampler.cli", "demo", "--tiny", "--steps", "400", "--pretrain-steps", "400",
         "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _wait_for_workdir(tmpdir, proc, timeout: float = 120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = list(tmpdir.glob("irdro-demo-*"))
        if found and any(found[0].iterdir()):  # training has started writing into it
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("the demo never created its work folder")


def _demo_leftovers(tmpdir):
    """What is left in the temp folder besides streaming's own file locks: the empty
    ``<shm prefix>_{barrier,cache}_filelock`` files every StreamingDataset creates in the temp folder and
    never removes (upstream; the next dataset with that prefix reuses them)."""
    import re

    upstream = re.compile(r"\d{6}_(barrier|cache)_filelock")
    return sorted(p.name for p in tmpdir.iterdir()
                  if not (upstream.fullmatch(p.name) and p.is_file() and p.stat().st_size == 0))


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("seconds_into_training", [0, 5])
def test_demo_killed_leaves_no_temporary_folders(tmp_path, sig, seconds_into_training):
    """Killed as training starts or in the middle of an epoch, while streaming's threads are still copying
    shards into the work folder (they must be stopped before it is removed)."""
    import signal

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = _start_demo(tmp_path, tmpdir)
    _wait_for_workdir(tmpdir, proc)
    time.sleep(seconds_into_training)
    assert proc.poll() is None, "the demo ended before it was killed"
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, 128 + signal.SIGTERM), err[-2000:]
    assert _demo_leftovers(tmpdir) == []
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".build-")]


@pytest.mark.slow
def test_demo_sigkill_leftovers_are_removed_by_the_next_run(tmp_path):
    import signal

    from irdro_sampler.demo.tempdirs import owned_tempdir

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = _start_demo(tmp_path, tmpdir)
    left = _wait_for_workdir(tmpdir, proc)
    proc.send_signal(signal.SIGKILL)  # cannot be caught: the folder stays ...
    proc.communicate(timeout=60)
    assert left.exists()
    fresh = owned_tempdir("irdro-demo-", tmpdir)  # ... until the next run makes its own
    # (torch itself leaves the folder it makes at import for torch.distributed.nn's generated module:
    # a SIGKILL skips its exit handler too; not the demo's, so not swept.)
    assert not left.exists() and list(tmpdir.glob("irdro-demo-*")) == [fresh]
    # A live process's folder is never touched.
    assert owned_tempdir("irdro-demo-", tmpdir).exists() and fresh.exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the discarded SystemExit
def test_a_signal_whose_exception_python_discarded_is_raised_again():
    """A SIGTERM handled inside ``__del__`` has its SystemExit discarded ("Exception ignored in ...");
    the demo must still stop, at its next step or at the latest when the protected block ends."""
    import signal

    from irdro_sampler.demo.tempdirs import raise_if_signalled, signals_unwind

    class KillsOnCollect:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs here, inside __del__

    import composer.core.engine  # noqa: F401  (installs Composer's own handler, as in a demo run)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as ended:
        with signals_unwind():
            obj = KillsOnCollect()
            del obj  # the SystemExit raised in __del__ is printed and dropped
            with pytest.raises(SystemExit) as at_step:
                raise_if_signalled()
            assert at_step.value.code == 128 + signal.SIGTERM
    assert ended.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    raise_if_signalled()  # the record does not outlive the block


def test_a_signal_during_a_deferred_step_is_raised_when_the_step_ends():
    """SIGTERM while a streaming dataset is being created waits for the creation to finish (an exception
    between creating a shared-memory block and sizing it would leave an empty block behind)."""
    import signal

    from irdro_sampler.demo.tempdirs import signals_deferred, signals_unwind

    finished = []
    with pytest.raises(SystemExit) as ended:
        with signals_unwind():
            with signals_deferred():
                with signals_deferred():  # nested: only the outermost block raises
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.01)  # the handler runs here and only records the signal
                    finished.append("inner")
                finished.append("outer")
            finished.append("after")
    assert ended.value.code == 128 + signal.SIGTERM
    assert finished == ["inner", "outer"]
    with signals_deferred():  # outside signals_unwind nothing is recorded or raised
        pass
