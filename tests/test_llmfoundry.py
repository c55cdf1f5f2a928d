"""The real llm-foundry (0.22.0) with the ``irdro_text`` loader and the ``irdro`` algorithm.

Skipped where llm-foundry is not installed (the main CI environment); ``.ci/run`` runs this file in a
second environment that has ``llm-foundry==0.22.0`` and the project's ``[composer,streaming]`` extras.
Everything is offline: the tokenizer is ``examples/llmfoundry_tokenizer`` and the MDS shards are written
here by ``examples/llmfoundry_setup.py``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmfoundry")
pytest.importorskip("streaming")

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "examples" / "llmfoundry.yaml"
TOKENIZER = ROOT / "examples" / "llmfoundry_tokenizer"
ROUND_BATCHES, GLOBAL_BATCH, STEPS, STOP = 10, 8, 40, 15  # 4 rounds; the interruption is mid-round 2


def _setup_module():
    spec = importlib.util.spec_from_file_location("llmfoundry_setup", ROOT / "examples" / "llmfoundry_setup.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


setup = _setup_module()


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lf_text")
    setup.write_corpus(root, num_docs=600, seed=0)
    return root


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def _train(workdir: Path, data: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``llmfoundry train examples/llmfoundry.yaml`` (the CLI's own code, in a fresh process)."""
    cmd = [
        sys.executable, "-c", "from llmfoundry.cli.cli import app; app()", "train", str(YAML),
        f"variables.data_local={data}", f"variables.tokenizer={TOKENIZER}", *overrides,
    ]
    proc = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def _checkpoint(folder: Path, batch: int) -> dict:
    (path,) = glob.glob(str(folder / f"ep*-ba{batch}-rank0.pt"))
    return torch.load(path, weights_only=False)["state"]


def assert_bitwise_equal(a, b, path="state"):
    """Equal tensors (``torch.equal``: NaN would count as different, and the states hold none), same structure."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def test_entry_points_register_the_loader_and_the_algorithm():
    from llmfoundry import registry

    from irdro_sampler.integrations.composer import IRDRO
    from irdro_sampler.integrations.llmfoundry import build_irdro_text_dataloader

    assert registry.dataloaders.get("irdro_text") is build_irdro_text_dataloader
    assert registry.algorithms.get("irdro") is IRDRO


@pytest.mark.slow
def test_llmfoundry_train_autoresumes_mid_round_bitwise(text_data, tmp_path):
    """The YAML as shipped, then the same run interrupted mid-round and autoresumed (with 2 workers)."""
    common = [f"train_loader.round_size={ROUND_BATCHES * GLOBAL_BATCH}", f"global_train_batch_size={GLOBAL_BATCH}",
              f"max_duration={STEPS}ba", f"scheduler.t_max={STEPS}ba", "save_interval=5ba"]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full_dir.mkdir()
    resumed_dir.mkdir()
    full = _train(full_dir, text_data, *common)
    assert "irdro/ess_fraction" in full.stdout + full.stderr  # the algorithm logged its metrics
    # "Interrupted" after batch 15 (mid-round: rounds are 10 batches), then `autoresume` picks up the
    # latest checkpoint in the same folder; the resumed process uses 2 persistent DataLoader workers.
    run = ["run_name=resume-test", "autoresume=true", "save_overwrite=false"]
    _train(resumed_dir, text_data, *common[:2], f"max_duration={STOP}ba", *common[3:], *run)
    mid = _checkpoint(resumed_dir / "resume-test" / "checkpoints", STOP)
    assert mid["dataset_state"]["train"]["sample_in_epoch"] == (STOP % ROUND_BATCHES) * GLOBAL_BATCH
    resumed = _train(resumed_dir, text_data, *common, *run, "train_loader.num_workers=2",
                     "train_loader.persistent_workers=true")
    assert "Autoresuming training from checkpoint" in resumed.stdout + resumed.stderr  # from latest = ba15

    a = _checkpoint(full_dir / "irdro-tiny-mpt" / "checkpoints", STEPS)
    b = _checkpoint(resumed_dir / "resume-test" / "checkpoints", STEPS)
    assert_bitwise_equal(a["model"], b["model"], "model")
    assert_bitwise_equal(a["optimizers"], b["optimizers"], "optimizers")
    (name_a, algo_a), (name_b, algo_b) = a["algorithms"][0], b["algorithms"][0]
    assert name_a == name_b == "IRDRO"
    assert_bitwise_equal(algo_a["table"], algo_b["table"], "IRDRO.table")
    assert_bitwise_equal(a["dataset_state"]["train"]["irdro"], b["dataset_state"]["train"]["irdro"], "irdro")
    table = algo_a["table"]
    assert not torch.isnan(table["losses"]).any()  # the saved state holds no NaN (unseen: counts == 0)
    assert 0 < int((table["counts"] > 0).sum()) < table["num_samples"]
    w = a["dataset_state"]["train"]["irdro"]
    weights = w["frozen_weights"] if w["frozen_weights"] is not None else w["pending_weights"]
    assert not torch.allclose(weights, torch.full_like(weights, 1.0 / weights.numel()))  # IR-DRO moved them


def _loader(tokenizer, data: Path, name: str, **extra):
    from llmfoundry import registry

    cfg = {"dataset": {"local": str(data), "split": "train", "shuffle": True, "max_seq_len": 64, "shuffle_seed": 3},
           "drop_last": True, "num_workers": 0, "pin_memory": False, **extra}
    return registry.dataloaders.get(name)(tokenizer=tokenizer, device_batch_size=4, **cfg)


@pytest.mark.parametrize("tokens", [False, True], ids=["text", "pretokenised"])
def test_batches_are_the_stock_text_loaders_plus_the_index(tmp_path, tokens):
    """Each irdro_text batch equals llm-foundry's own collator on the same samples, plus ``sample_idx``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    setup.write_corpus(tmp_path / "data", num_docs=200, seed=1, tokens=tokens)
    spec = _loader(tokenizer, tmp_path / "data", "irdro_text", round_size=40)
    ds = spec.dataloader.dataset
    assert ds.round_size == 40
    batches = list(spec.dataloader)
    assert len(batches) == 10
    ids = [b["sample_idx"] for b in batches]
    assert all(isinstance(i, list) and len(i) == 4 for i in ids)
    stock = _loader(tokenizer, tmp_path / "data", "text", persistent_workers=False, prefetch_factor=None)
    plain, collate = stock.dataloader.dataset, stock.dataloader.collate_fn
    for batch, idx in zip(batches, ids, strict=True):
        want = collate([plain[i] for i in idx])
        got = {k: v for k, v in batch.items() if k != "sample_idx"}
        assert_bitwise_equal(want, got, "batch")
    # Pre-tokenised rows are the stored ids; text rows are the tokenised text.
    raw = plain.get_item(ids[0][0])
    first = batches[0]["input_ids"][0]
    if tokens:
        assert torch.equal(first, torch.from_numpy(raw["tokens"][:64].copy()))
    else:
        assert tokenizer.decode(first[first != tokenizer.pad_token_id]) == raw["text"][:64]


def test_default_round_size_is_100_global_batches(tmp_path):
    from transformers import AutoTokenizer

    from irdro_sampler.integrations.llmfoundry import DEFAULT_ROUND_BATCHES

    setup.write_corpus(tmp_path / "data", num_docs=50, seed=2)
    spec = _loader(AutoTokenizer.from_pretrained(str(TOKENIZER)), tmp_path / "data", "irdro_text")
    assert spec.dataloader.dataset.round_size == DEFAULT_ROUND_BATCHES * 4  # world size 1, device batch 4
    assert len(spec.dataloader) == DEFAULT_ROUND_BATCHES


def test_subclass_without_the_index_fails_with_advice_that_applies(text_data, tmp_path):
    """The natural first attempt: subclass both datasets, keep llm-foundry's collator. IRDRO must say
    what was lost and where, not advise IndexedDataset (which does not apply to a streaming dataset)."""
    from composer import Trainer
    from llmfoundry.data.text_data import StreamingTextDataset
    from llmfoundry.models.mpt import ComposerMPTCausalLM
    from llmfoundry.utils.builders import build_tokenizer
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForLanguageModeling

    from irdro_sampler.integrations.composer import IRDRO
    from irdro_sampler.integrations.streaming import WeightedStreamingDataset

    class Naive(WeightedStreamingDataset, StreamingTextDataset):
        pass

    tokenizer = build_tokenizer(str(TOKENIZER), {})
    ds = Naive(tokenizer=tokenizer, max_seq_len=64, local=str(text_data), split="train", shuffle=True,
               batch_size=4, round_size=40)
    dl = DataLoader(ds, batch_size=4, collate_fn=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    model = ComposerMPTCausalLM(d_model=32, n_heads=2, n_layers=1, expansion_ratio=2, max_seq_len=64,
                                vocab_size=320, loss_fn="torch_crossentropy", attn_config={"attn_impl": "torch"})
    trainer = Trainer(model=model, train_dataloader=dl, max_duration="2ba", algorithms=[IRDRO()], device="cpu",
                      progress_bar=False, log_to_console=False)
    with pytest.raises(KeyError) as err:
        trainer.fit()
    msg = str(err.value)
    assert "get_item" in msg and "irdro_text" in msg and "IndexListCollate" in msg
    assert "IndexedDataset" not in msg
    trainer.close()


@pytest.mark.slow
def test_llmfoundry_train_primes_from_a_npy_named_in_the_yaml(text_data, tmp_path):
    """``algorithms.irdro.initial_losses=<.npy>`` (a scoring pass's losses, as a YAML config names them): the first
    round is drawn from the rule fitted on them. Planted: a tenth of the samples far above the rest (cut: the
    floor's weight only), every seventh not scored (NaN: unseen, the prior)."""
    import numpy as np

    n = 600  # text_data's documents
    rng = np.random.default_rng(0)
    losses = rng.uniform(2.0, 3.0, n)
    high = rng.choice(n, n // 10, replace=False)
    losses[high] = 40.0
    losses[::7] = np.nan
    path = tmp_path / "initial_losses.npy"
    np.save(path, losses.astype(np.float32))
    workdir = tmp_path / "run"
    workdir.mkdir()
    _train(workdir, text_data, f"train_loader.round_size={ROUND_BATCHES * GLOBAL_BATCH}",
           f"global_train_batch_size={GLOBAL_BATCH}", "max_duration=5ba", "scheduler.t_max=5ba", "save_interval=5ba",
           f"algorithms.irdro.initial_losses={path}")
    state = _checkpoint(workdir / "irdro-tiny-mpt" / "checkpoints", 5)
    table = state["algorithms"][0][1]["table"]
    scored = ~np.isnan(losses)
    assert bool((table["counts"].numpy()[scored] > 0).all())  # primed: every scored sample in the table
    w = state["dataset_state"]["train"]["irdro"]["frozen_weights"].double().numpy()  # round 0's, mid-round
    assert w.shape == (n,) and abs(w.sum() - 1.0) < 1e-6
    cut = high[scored[high]]  # planted high and scored (an unscored one gets the prior)
    kept = scored.copy()
    kept[high] = False
    assert cut.size >= 40 and w[cut].max() < 0.2 * w[kept].min()  # cut from the first draw: the floor only
    np.testing.assert_allclose(w[cut], 0.1 / n, rtol=1e-6)  # the default uniform_mix over all samples
