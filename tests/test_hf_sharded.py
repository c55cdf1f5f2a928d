"""IRDROTrainer with the loss table sharded over 2 gloo ranks (``irdro=dict(sharded=True)``), on the real
Hugging Face Trainer (CPU, torchrun, tests/_hf_sharded_worker.py) and a tiny GPT-2 built from its config.

* The 2-rank run trains the global batches a ``ShardedIRDROSampler`` on **one** rank draws when driven by
  hand with the same feedback (the sharded sampler's contract: the draws do not depend on the world size),
  and ends with its fingerprint; the table's rows are split between the ranks, on disk too.
* Resume from a mid-run checkpoint (mid-epoch, gradient accumulation 2) trains bitwise the uninterrupted
  order and ends in the same sampler state.
* A checkpoint without its ``irdro-shards`` folder, or with a rank's row file missing, is a ``ValueError``
  naming the path, on every rank, with nothing loaded.

Runs in the `[hf]` CI lane (.ci/hf_lane); skipped where transformers' Trainer or accelerate is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import _hf_required  # noqa: E402, F401  (skips this module where the Trainer cannot run)
import numpy as np
import pytest
import torch
import torch.distributed as dist  # noqa: E402

from irdro_sampler import ShardedIRDROSampler  # noqa: E402
from irdro_sampler.integrations import hf_sharded  # noqa: E402
from irdro_sampler.integrations.hf import IRDROTrainer  # noqa: E402

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
import _hf_sharded_worker as worker  # noqa: E402
from _core_helpers import free_port, gloo_group, spawn_gloo  # noqa: E402
from _hf_worker import Samples  # noqa: E402
from _sharded_by_hand import drive_by_hand  # noqa: E402

sys.path.remove(str(TESTS))

SAMPLES, BATCH, WORLD = 80, 4, 2  # 10 micro-batches per epoch and rank, 5 optimizer steps (accumulation 2)
COMMON = ["--samples", str(SAMPLES), "--batch-size", str(BATCH), "--grad-accum", "2", "--epochs", "2"]


def _torchrun(out: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(TESTS / "_hf_sharded_worker.py"), "--out", str(out),
           *COMMON, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _results(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The uninterrupted 2-rank run (2 epochs, checkpoints every 4 optimizer steps)."""
    out = tmp_path_factory.mktemp("full")
    _torchrun(out, "--save-steps", "4")
    return out, _results(out)


def _global_batches(ranks: list[dict]) -> dict[int, list[int]]:
    """Global batch per step: the ranks' slices in rank order (the sampler's layout)."""
    by_rank = [{m["step"]: m["idx"] for m in r["record"]} for r in ranks]
    assert all(set(b) == set(by_rank[0]) for b in by_rank)
    return {s: [i for b in by_rank for i in b[s]] for s in sorted(by_rank[0])}


# ---------------------------------------------------------------------------- the draws and the rows
def _drive_by_hand(rank: int, world: int, port: int, results, steps: list[int], feedback: list) -> None:
    options = dict(dataset_size=SAMPLES, batch_size=BATCH * WORLD // world, num_shards=worker.NUM_SHARDS,
                   seed=worker.SEED, feedback_delay=worker.FEEDBACK_DELAY)
    drive_by_hand(rank, world, port, results, steps, feedback, options)


def test_two_ranks_draw_what_one_sharded_sampler_draws_by_hand_and_split_the_rows(full_run):
    out, ranks = full_run
    trained = _global_batches(ranks)
    assert sorted(trained) == list(range(20))  # 2 epochs x 10 global batches, each trained once
    for r in ranks:
        assert r["type"] == "ShardedIRDROSampler"
        assert all(m["fed"] == m["idx"] for m in r["record"])  # the indices travel with their samples
    # Every rank applied the same gathered feedback: the global batch's ids in order, real model losses.
    assert ranks[0]["feedback"] == ranks[1]["feedback"]
    feedback = ranks[0]["feedback"]
    assert [f[0] for f in feedback] == sorted(trained) and all(f[1] == trained[f[0]] for f in feedback)
    assert ranks[0]["stats"]["kl_to_uniform"] > 0.01  # the weights moved: the draws are not uniform
    (by_hand,) = spawn_gloo(_drive_by_hand, 1, sorted(trained), feedback)
    assert {int(k): v for k, v in by_hand["drawn"].items()} == trained
    assert by_hand["fingerprint"] == ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    # The table's rows are split: each rank holds half, and saved its half into the checkpoint.
    assert [r["rows"] for r in ranks] == [[0, 40], [40, 80]]
    assert [r["table_rows"] for r in ranks] == [40, 40]
    assert sum(r["table_seen"] for r in ranks) == int(round(ranks[0]["stats"]["seen_fraction"] * SAMPLES))
    shards = out / "checkpoint-4" / hf_sharded.SHARDS_FOLDER
    assert sorted(p.name for p in shards.iterdir()) == ["common.pt", "rows-0-40.pt", "rows-40-80.pt",
                                                        hf_sharded.TRAINER_FILE]
    assert torch.load(shards / hf_sharded.TRAINER_FILE, weights_only=True)["global_step"] == 4
    assert not (out / "checkpoint-4" / "irdro_sampler.pt").exists()


# ---------------------------------------------------------------------------- resume, bitwise
def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


@pytest.mark.skipif(_transformers_major() < 5, reason=(
    "transformers 4.x cannot resume a CPU DDP run under torch 2.7 at all (optimizer.pt loaded with "
    "map_location='cpu:0'; see tests/test_hf_trainer.py::test_resume_two_ranks_is_bitwise)"))
def test_resume_from_mid_run_checkpoint_is_bitwise(full_run, tmp_path):
    out, full = full_run
    shutil.copytree(out / "checkpoint-4", tmp_path / "checkpoint-4")
    _torchrun(tmp_path, "--save-steps", "4", "--resume", str(tmp_path / "checkpoint-4"))
    resumed = _results(tmp_path)
    first = 8  # optimizer step 4 = micro-batch 8 (mid-epoch 0)
    for a, b in zip(full, resumed, strict=True):
        ra = {m["step"]: m["idx"] for m in a["record"]}
        rb = {m["step"]: m["idx"] for m in b["record"]}
        assert min(rb) == first and rb == {s: ra[s] for s in ra if s >= first}
        assert a["fingerprint"] == b["fingerprint"]
        assert a["stats"] == b["stats"]
        assert [h for h in a["log_history"] if "loss" in h][-1] == [h for h in b["log_history"] if "loss" in h][-1]
        assert b["feedback"] == [f for f in a["feedback"] if f[0] >= first]


# ---------------------------------------------------------------------------- missing files
def test_missing_shard_folder_is_a_clear_error(full_run, tmp_path):
    out, _ = full_run
    shutil.copytree(out / "checkpoint-4", tmp_path / "checkpoint-4")
    shutil.rmtree(tmp_path / "checkpoint-4" / hf_sharded.SHARDS_FOLDER)
    proc = _torchrun(tmp_path, "--resume", str(tmp_path / "checkpoint-4"), ok=False)
    assert proc.returncode != 0
    missing = tmp_path / "checkpoint-4" / hf_sharded.SHARDS_FOLDER
    assert proc.stderr.count(f"ValueError: resume_from_checkpoint: {missing} is missing") >= WORLD, proc.stderr[-4000:]
    assert not list(tmp_path.glob("rank*.json"))  # no rank trained


def _missing_row_file(rank: int, world: int, port: int, results, folder: str) -> None:
    with gloo_group(rank, world, port):
        def sampler() -> ShardedIRDROSampler:
            return ShardedIRDROSampler(SAMPLES, BATCH, num_shards=worker.NUM_SHARDS, seed=worker.SEED,
                                       feedback_delay=worker.FEEDBACK_DELAY)

        trained = sampler()
        for b in range(12):
            ids = trained.batch(b)[0]
            trained.update(ids, (ids % 7).astype(np.float32), step=b)
        checkpoint = Path(folder) / "checkpoint-6"
        checkpoint.mkdir(exist_ok=True)
        hf_sharded.save(trained, checkpoint, 6)
        out: dict = {}
        fresh = sampler()
        out["step"] = hf_sharded.load(fresh, checkpoint)  # complete: loads
        out["same"] = fresh.fingerprint() == trained.fingerprint()
        dist.barrier()
        if rank == 0:
            (checkpoint / hf_sharded.SHARDS_FOLDER / "rows-40-80.pt").unlink()  # rank 1's rows
        dist.barrier()
        fresh = sampler()
        before = fresh.fingerprint()
        try:
            hf_sharded.load(fresh, checkpoint)
        except ValueError as e:
            out["error"] = str(e)
        out["unchanged"] = fresh.fingerprint() == before and fresh.table.num_seen == 0 and fresh.params is None
        results[rank] = out


def test_missing_rank_file_is_a_clear_error_on_every_rank_with_nothing_loaded(tmp_path):
    ranks = spawn_gloo(_missing_row_file, WORLD, str(tmp_path))
    missing = tmp_path / "checkpoint-6" / hf_sharded.SHARDS_FOLDER / "rows-40-80.pt"
    for r in ranks:
        assert r["step"] == 6 and r["same"]
        assert r["error"].startswith(f"resume_from_checkpoint: {missing} is missing")
        assert r["unchanged"]


# ---------------------------------------------------------------------------- the first-visit screen
def test_sharded_table_screens_first_visits_on_every_rank(tmp_path):
    """``irdro_screen=True`` with the sharded table: every 4th sample is not scored (a first visit far above the
    cut of the primed losses), and until the run's first feedback is applied (``feedback_delay`` micro-batches,
    less the one accelerate draws ahead of the step) each rank's loss is the Trainer's times the share of the token-loss sum its kept samples hold. The Trainer's
    loss is the model's times one factor for the run (the world size where transformers averages tokens across
    devices with ``num_items_in_batch``, else 1): the screen keeps that normalisation."""
    _torchrun(tmp_path, "--screen")
    screened, factors = 0, []
    for r in _results(tmp_path):
        early = [m for m in r["losses"] if m["step"] < worker.FEEDBACK_DELAY - 1]
        assert len(early) == worker.FEEDBACK_DELAY - 1
        for m in early:
            block = np.arange(SAMPLES)[m["idx"]] % 4 == 0
            sums = np.array(m["sums"])
            factors.append(m["loss"] / (m["own"] * sums[~block].sum() / sums.sum()))
            screened += int(block.sum())
        assert any("irdro/screened_fraction" in h for h in r["log_history"])
    assert screened >= 8
    assert min(abs(factors[0] - 1.0), abs(factors[0] - WORLD)) < 1e-5, factors[0]
    np.testing.assert_allclose(factors, factors[0], rtol=1e-5)


# ---------------------------------------------------------------------------- options
def test_options_are_checked(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True)
    data = Samples(16, "lm")
    with pytest.raises(ValueError, match=r"irdro: 'sharded' must be True or False, got 'yes'"):
        IRDROTrainer(model=model, args=args, train_dataset=data, irdro=dict(sharded="yes"))
    with pytest.raises(ValueError, match=r"irdro: 'dataset_size' is set by the Trainer"):
        IRDROTrainer(model=model, args=args, train_dataset=data, irdro=dict(sharded=True, dataset_size=16))
    trainer = IRDROTrainer(model=model, args=args, train_dataset=data, irdro=dict(sharded=True))
    with pytest.raises(ValueError, match="sharded=True needs an initialised torch.distributed process group"):
        trainer.get_train_dataloader()
