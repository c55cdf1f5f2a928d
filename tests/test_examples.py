"""Every example runs in a tiny configuration (as a user would start it: a subprocess), and the
llm-foundry YAML builds the algorithm through the registered entry point."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
_SCRATCH = tempfile.mkdtemp(prefix="irdro-examples-")
atexit.register(shutil.rmtree, _SCRATCH, True)

# script -> tiny flags (seconds on a CPU). Scripts of other engineers are included once they exist.
TINY_FLAGS: dict[str, list[str]] = {
    "plain_pytorch.py": ["--samples", "2000", "--epochs", "1", "--batch-size", "64"],
    "continual_scoring_pass.py": ["--docs", "600", "--pretrain-steps", "100"],
    "importance_sampling.py": ["--samples", "2000", "--steps", "60", "--check-batches", "500"],
    "composer_train.py": ["--steps", "12", "--num-samples", "128", "--batch-size", "16", "--log-interval", "4"],
    "composer_streaming_lm.py": ["--steps", "12"],
    "hf_trainer.py": ["--samples", "256", "--epochs", "1"],
    "lightning_train.py": ["--samples", "2000", "--epochs", "1"],
    "sharded_pytorch.py": ["--samples", "4000", "--epochs", "1"],
    "sharded_streaming.py": ["--samples", "4000", "--rounds", "1"],
    # Writes into a fresh temporary folder, not into the repository's examples/llmfoundry_tokenizer.
    "llmfoundry_setup.py": ["--docs", "50", "--data", os.path.join(_SCRATCH, "data"), "--tokenizer",
                            os.path.join(_SCRATCH, "tokenizer")],
}


def _run(script: str, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run an example in its own session; on a timeout, every process of it prints its threads' stacks
    (faulthandler on SIGABRT) into the failure, so a hang says where it is."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONFAULTHANDLER": "1"}
    args = [sys.executable, str(EXAMPLES / script), *TINY_FLAGS[script], *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=EXAMPLES.parent, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        stacks = "\n".join(line for line in err.splitlines() if not line.startswith("Extension modules:"))
        pytest.fail(f"{script} {' '.join(args[2:])} did not finish in {timeout:.0f} s; its output:\n{out[-3000:]}\n"
                    f"its stacks (faulthandler):\n{stacks[-20000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the group is gone: nothing left to signal
        pass


def test_every_example_script_has_tiny_flags():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    missing = [s for s in scripts if s not in TINY_FLAGS]
    assert not missing, f"add tiny flags for {missing} to TINY_FLAGS"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TINY_FLAGS))
def test_example_runs_tiny(script):
    if not (EXAMPLES / script).exists():
        pytest.skip(f"{script} not written yet")
    if script.startswith("composer"):
        pytest.importorskip("composer")
    if script == "llmfoundry_setup.py":
        pytest.importorskip("streaming")
        pytest.importorskip("transformers")
    if script == "hf_trainer.py":
        pytest.importorskip("accelerate")  # the [hf] extra (its CI lane)
    if script == "lightning_train.py":
        pytest.importorskip("lightning")  # the [lightning] extra (its CI lane)
    proc = _run(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip()


@pytest.mark.slow
def test_importance_sampling_example_is_unbiased():
    """The example's own check: the importance-weighted batch loss estimates the full-data loss.

    4,000 batches give a standard error the example prints; |z| < 4 fails with probability < 1e-4
    if the estimator is unbiased (it is exact in expectation, so a real bias shows as a large z).
    """
    proc = _run("importance_sampling.py", "--check-batches", "4000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"z = ([-+]\d+\.\d+)", proc.stdout)
    assert m, proc.stdout
    assert abs(float(m.group(1))) < 4.0, proc.stdout
    for mode in ("uniform", "importance", "resample"):
        assert re.search(rf"^{mode}\s+full-data ERM loss \d", proc.stdout, flags=re.M), proc.stdout


def test_llmfoundry_yaml_builds_irdro_through_the_entry_point():
    pytest.importorskip("composer")
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((EXAMPLES / "llmfoundry.yaml").read_text())
    for key in ("model", "train_loader", "optimizer", "max_duration", "algorithms"):
        assert key in cfg, key
    eps = {ep.name: ep for ep in entry_points(group="llmfoundry_algorithms")}
    assert "irdro" in eps, "pip install -e . registers the llmfoundry_algorithms entry point"
    cls = eps["irdro"].load()
    # llm-foundry does this: algorithm class from the registry, keyword arguments from the YAML block.
    algo = cls(**cfg["algorithms"]["irdro"])
    from irdro_sampler.integrations.composer import IRDRO

    assert isinstance(algo, IRDRO)
    assert algo.mode == "resample" and algo.rule_options == {}  # the library's defaults
    assert algo.table_options == {"ema": 0.5}
    # The demo's recommended options are the YAML's: one set of defaults across docs and examples.
    from irdro_sampler.demo.run import RECOMMENDED

    block = cfg["algorithms"]["irdro"]
    assert {k: block[k] for k in RECOMMENDED} == RECOMMENDED
    # The train loader is the registered irdro_text; its module imports without llm-foundry installed.
    assert cfg["train_loader"]["name"] == "irdro_text"
    loaders = {ep.name: ep for ep in entry_points(group="llmfoundry_dataloaders")}
    assert "irdro_text" in loaders, "pip install -e . registers the llmfoundry_dataloaders entry point"
    from irdro_sampler.integrations.llmfoundry import build_irdro_text_dataloader

    assert loaders["irdro_text"].load() is build_irdro_text_dataloader


@pytest.mark.slow
def test_plain_pytorch_example_shows_its_claim():
    """At the default seed and flags, with the library's defaults: the rare group ends with a test loss
    no worse than uniform sampling's, and noise gets fewer draws than its 2% share of the data."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plain_pytorch", EXAMPLES / "plain_pytorch.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    uniform = example.main(["--sampler", "uniform"])
    irdro = example.main([])
    assert irdro["rare"] <= uniform["rare"], (irdro, uniform)
    assert irdro["common"] <= uniform["common"] + 0.01, (irdro, uniform)
    assert irdro["drawn_noise"] < 0.02 < uniform["drawn_noise"] + 0.005, (irdro, uniform)
    assert irdro["drawn_rare"] > uniform["drawn_rare"], (irdro, uniform)


def test_plain_pytorch_screen_flag_harms_the_rare_group_as_its_docstring_says():
    """``--screen`` (sampler.screen in the loop): the rare group, whose own decision boundary the model has not
    learned at its first visits, has those visits screened and ends worse than under uniform sampling
    (benchmarks/screen_subgroup.py); ``--screen-block`` screens nothing here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plain_pytorch", EXAMPLES / "plain_pytorch.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    uniform, screened = example.main(["--sampler", "uniform"]), example.main(["--screen"])
    assert screened["rare"] > uniform["rare"] + 0.5, (screened, uniform)
    assert screened["drawn_rare"] < uniform["drawn_rare"], (screened, uniform)
    assert screened["screened"] > 0.0
    # --screen-block: the rare group is learnable, not a block, so nothing is screened and the run is the
    # unscreened one (its claims: test_plain_pytorch_example_shows_its_claim).
    unscreened, block = example.main([]), example.main(["--screen-block"])
    assert block["screened"] == 0.0 and unscreened["screened"] == 0.0
    assert block == unscreened, (block, unscreened)


@pytest.mark.slow
def test_scoring_pass_example_shows_its_claim():
    """At the default seed and flags, with the library's defaults: the primed sampler draws the random
    documents far below their 25% share, and the held-out clean loss ends below uniform sampling's and below
    the unprimed sampler's; the screened loop trains on the random documents at under half the unscreened
    sampler's share and ends between the unscreened and the primed sampler."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("continual_scoring_pass", EXAMPLES / "continual_scoring_pass.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main([])
    uniform, plain, primed = out["uniform"], out["irdro"], out["irdro + scoring pass"]
    screened = out["irdro + screen"]
    assert primed["noise_draws"] < 0.1 < 0.2 < min(uniform["noise_draws"], plain["noise_draws"]), out
    assert primed["held_out_loss"] < plain["held_out_loss"] < uniform["held_out_loss"], out
    assert screened["noise_trained"] < 0.5 * plain["noise_trained"], out
    assert primed["held_out_loss"] < screened["held_out_loss"] < plain["held_out_loss"], out


@pytest.mark.slow
def test_plain_example_checkpoints_and_resumes(tmp_path):
    """--checkpoint: save_state after every epoch; a rerun resumes after the last saved epoch."""
    import torch

    ckpt = tmp_path / "run.pt"
    first = _run("plain_pytorch.py", "--checkpoint", str(ckpt))  # 1 epoch
    assert first.returncode == 0, first.stderr[-3000:]
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 0 and state["sampler"]["format"] == "irdro_sampler.IRDROSampler"
    second = _run("plain_pytorch.py", "--checkpoint", str(ckpt), "--epochs", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed after epoch 0" in second.stdout and "epoch 1:" in second.stdout and "epoch 0:" not in second.stdout
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


@pytest.mark.slow
def test_composer_classifier_example_shows_its_claim():
    """The classifier path at its default seed and flags, library defaults (labels as groups): the rare
    class and every clean class end no worse than without IR-DRO, the rare class gets more than its
    share of the draws, and the noise less than its share."""
    pytest.importorskip("composer")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import composer_train as ex
    finally:
        sys.path.remove(str(EXAMPLES))
    base = ex.main(["--task", "classifier", "--algorithm", "none"])
    irdro = ex.main(["--task", "classifier", "--algorithm", "irdro"])
    data, groups, names = ex.make_classifier_data()
    share = {g: float(np.mean(groups == g)) for g in range(len(names))}
    total = sum(irdro["drawn"].values())
    for name in names[:-1]:
        assert irdro["group_loss"][name] <= base["group_loss"][name], (name, irdro, base)
    rare = names.index("class3")
    assert irdro["drawn"][rare] / total > share[rare], irdro["drawn"]
    assert irdro["drawn"][len(names) - 1] / total < share[len(names) - 1], irdro["drawn"]


def _load_example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.mark.slow
def test_hf_trainer_example_shows_its_claim():
    """At the default seed and flags (the [hf] lane): IRDROTrainer with the library's defaults ends with a
    rare-group held-out loss no worse than the stock Trainer's, draws the rare group more than its share,
    and the noise less than its share (the stock Trainer's draws are exactly the data's shares: whole
    epochs of a random permutation)."""
    pytest.importorskip("accelerate")
    example = _load_example("hf_trainer.py")
    uniform = example.main(["--sampler", "uniform"])
    irdro = example.main([])
    assert irdro["rare"] <= uniform["rare"], (irdro, uniform)
    assert irdro["common"] <= uniform["common"] + 0.05, (irdro, uniform)
    assert irdro["drawn_noise"] < uniform["drawn_noise"], (irdro, uniform)
    assert irdro["drawn_rare"] > uniform["drawn_rare"], (irdro, uniform)


@pytest.mark.slow
def test_lightning_example_shows_its_claim():
    """At the default seed, 10,000 samples, 5 epochs (the [lightning] lane): IRDROCallback ends with a rare-group
    test loss no worse than uniform sampling's, and the noise gets less than its share of the draws."""
    pytest.importorskip("lightning")
    example = _load_example("lightning_train.py")
    flags = ["--samples", "10000", "--epochs", "5"]
    uniform = example.main(["--sampler", "uniform", *flags])
    irdro = example.main(flags)
    assert irdro["rare"] <= uniform["rare"], (irdro, uniform)
    assert irdro["common"] <= uniform["common"] + 0.01, (irdro, uniform)
    assert irdro["drawn_noise"] < irdro["share_noise"], irdro
    assert irdro["drawn_rare"] > irdro["share_rare"], irdro


@pytest.mark.slow
def test_sharded_example_shows_its_claim(tmp_path):
    """At the default seed and flags on 2 gloo ranks, library defaults: the rare group gets more than its
    5% share of the draws and the noise less than its 2% share; the sampler saved on 2 ranks resumes on 1
    with the same fingerprint (every rank of any world size shares it)."""
    first = _run("sharded_pytorch.py", "--samples", "20000", "--epochs", "3", "--save", str(tmp_path / "s"))
    assert first.returncode == 0, first.stderr[-3000:]
    last = re.findall(r"drawn rare ([\d.]+)% noise ([\d.]+)%", first.stdout)[-1]
    assert float(last[0]) > 5.0 and float(last[1]) < 2.0, first.stdout
    saved = re.search(r"saved on 2 rank\(s\): sampler fingerprint (-?0x[0-9a-f]+)", first.stdout)
    second = _run("sharded_pytorch.py", "--samples", "20000", "--world", "1", "--resume", str(tmp_path / "s"))
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = re.search(r"resumed on 1 rank\(s\): sampler fingerprint (-?0x[0-9a-f]+)", second.stdout)
    assert saved and resumed and saved.group(1) == resumed.group(1), (first.stdout, second.stdout)


@pytest.mark.slow
def test_sharded_streaming_example_shows_its_claim(tmp_path):
    """At the default seed and flags on 2 gloo ranks, library defaults, weights sharded over the ranks: the
    rare group gets more than its 5% share of the draws and the noise less than its 2% share; every rank has
    the same round fingerprint; the states saved per rank resume with the saved fingerprint."""
    pytest.importorskip("streaming")
    first = _run("sharded_streaming.py", "--samples", "20000", "--rounds", "3", "--save", str(tmp_path / "s"))
    assert first.returncode == 0, first.stderr[-3000:]
    last = re.findall(r"drawn rare ([\d.]+)% noise ([\d.]+)%", first.stdout)[-1]
    assert float(last[0]) > 5.0 and float(last[1]) < 2.0, first.stdout
    assert "round fingerprints equal on 2 rank(s)" in first.stdout, first.stdout
    saved = re.search(r"saved on 2 rank\(s\): round fingerprint (-?0x[0-9a-f]+)", first.stdout)
    second = _run("sharded_streaming.py", "--samples", "20000", "--resume", str(tmp_path / "s"), "--rounds", "1")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = re.search(r"resumed on 2 rank\(s\): round fingerprint (-?0x[0-9a-f]+)", second.stdout)
    assert saved and resumed and saved.group(1) == resumed.group(1), (first.stdout, second.stdout)
