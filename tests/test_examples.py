"""Every example runs in a tiny configuration (as a user would start it: a subprocess), and the
llm-foundry YAML builds the algorithm through the registered entry point."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
_SCRATCH = tempfile.mkdtemp(prefix="irdro-examples-")
atexit.register(shutil.rmtree, _SCRATCH, True)

# script -> tiny flags (seconds on a CPU). Scripts of other engineers are included once they exist.
TINY_FLAGS: dict[str, list[str]] = {
    "plain_pytorch.py": ["--samples", "2000", "--epochs", "1", "--batch-size", "64"],
    "importance_sampling.py": ["--samples", "2000", "--steps", "60", "--check-batches", "500"],
    "composer_train.py": ["--steps", "12", "--num-samples", "128", "--batch-size", "16", "--log-interval", "4"],
    "composer_streaming_lm.py": ["--steps", "12"],
    # Writes into a fresh temporary folder, not into the repository's examples/llmfoundry_tokenizer.
    "llmfoundry_setup.py": ["--docs", "50", "--data", os.path.join(_SCRATCH, "data"), "--tokenizer",
                            os.path.join(_SCRATCH, "tokenizer")],
}


def _run(script: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *TINY_FLAGS[script], *extra],
                          capture_output=True, text=True, timeout=300, env=env, cwd=EXAMPLES.parent)


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
    assert algo.mode == "resample" and algo.rule_options["truncate_zscore"] == 3.5
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
