"""IRDROTrainer on the real Hugging Face Trainer (transformers + accelerate), CPU, 1 process and 2 gloo ranks.

What the model was fed is decoded from its input_ids (tests/_hf_worker.py), so the counting tests check
the batches the model trained on, not the sampler's output. Runs in the `[hf]` CI lane
(.ci/hf_lane); skipped where transformers' Trainer or accelerate is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import _hf_required  # noqa: E402, F401  (skips this module where the Trainer cannot run)
import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
import _hf_worker as worker  # noqa: E402
from _core_helpers import free_port  # noqa: E402

sys.path.remove(str(TESTS))

from irdro_sampler.integrations.hf import STATE_FILE, IRDROTrainer  # noqa: E402


def _torchrun(out: Path, *args: str) -> list[dict]:
    """Two gloo ranks on 127.0.0.1 running the worker; returns both ranks' results."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(TESTS / "_hf_worker.py"), "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _by_step(result: dict) -> dict[int, list[int]]:
    return {m["step"]: m["idx"] for m in result["record"]}


# ---------------------------------------------------------------------------- counting (flat weights)
def test_one_rank_epoch_trains_every_sample_once_and_logs_metrics(tmp_path):
    res = worker.main(["--out", str(tmp_path), "--flat", "--samples", "96", "--batch-size", "4"])
    fed = [i for m in res["record"] for i in m["fed"]]
    assert sorted(fed) == list(range(96))
    assert all(m["fed"] == m["idx"] for m in res["record"])  # the indices travel with their samples
    assert [m["step"] for m in res["record"]] == list(range(24))
    assert res["stats"]["late_feedback"] == 0
    logs = [h for h in res["log_history"] if "loss" in h]
    assert logs and all("irdro/ess_fraction" in h and "irdro/drawn_loss_mean" in h for h in logs)


@pytest.mark.slow
def test_two_ranks_epoch_trains_every_sample_once(tmp_path):
    """accelerate's prepare() must not re-shard the sampler's per-rank output: on 2 ranks an epoch of flat
    weights trains each of the 96 samples exactly once (re-sharding would train 48 and drop 48)."""
    ranks = _torchrun(tmp_path, "--flat", "--samples", "96", "--batch-size", "4")
    fed = Counter(i for r in ranks for m in r["record"] for i in m["fed"])
    assert sorted(fed) == list(range(96)) and set(fed.values()) == {1}
    for r in ranks:
        assert [m["step"] for m in r["record"]] == list(range(12))  # 96 / (2 x 4) batches on each rank
        assert all(m["fed"] == m["idx"] for m in r["record"])
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    assert ranks[0]["global_step"] == 12


# ---------------------------------------------------------------------------- resume, bitwise
def _resume_equals_uninterrupted(full: list[dict], resumed: list[dict], first_step: int) -> None:
    for a, b in zip(full, resumed, strict=True):
        ra, rb = _by_step(a), _by_step(b)
        assert min(rb) == first_step, sorted(rb)[:5]
        assert rb == {s: ra[s] for s in ra if s >= first_step}
        assert a["fingerprint"] == b["fingerprint"]
        assert a["stats"] == b["stats"]
        la = [h for h in a["log_history"] if "loss" in h]
        lb = [h for h in b["log_history"] if "loss" in h]
        assert la[-1] == lb[-1]  # same losses, same irdro/* metrics at the end


def test_resume_one_rank_is_bitwise(tmp_path):
    """Gradient accumulation 2, a checkpoint mid-epoch 0 (optimizer step 5 = micro-batch 10), resumed into
    a new Trainer: the rest of the run (across the epoch boundary) draws exactly the uninterrupted order."""
    common = ["--grad-accum", "2", "--epochs", "2", "--save-steps", "5", "--samples", "96", "--batch-size", "4"]
    full = worker.main(["--out", str(tmp_path / "a"), *common])
    assert (tmp_path / "a" / "checkpoint-5" / STATE_FILE).is_file()
    state = torch.load(tmp_path / "a" / "checkpoint-5" / STATE_FILE, weights_only=True)
    assert state["global_step"] == 5 and state["sampler"]["format"] == "irdro_sampler.IRDROSampler"
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-5", tmp_path / "b" / "checkpoint-5")
    resumed = worker.main(["--out", str(tmp_path / "b"), *common, "--resume", "true"])  # the last checkpoint
    assert full["stats"]["kl_to_uniform"] > 0.01  # real losses fed back: the weights are not flat
    _resume_equals_uninterrupted([full], [resumed], first_step=10)


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


@pytest.mark.slow
@pytest.mark.skipif(_transformers_major() < 5, reason=(
    "transformers 4.x cannot resume a CPU DDP run under torch 2.7 at all: its _load_optimizer_and_scheduler "
    "loads optimizer.pt with map_location=args.device ('cpu:0'), which torch 2.7's loader rejects "
    "(before any sampler code runs; GPU runs are not affected)"))
def test_resume_two_ranks_is_bitwise(tmp_path):
    common = ["--grad-accum", "2", "--epochs", "2", "--save-steps", "4", "--samples", "80", "--batch-size", "4"]
    full = _torchrun(tmp_path / "a", *common)  # 10 micro-batches per epoch and rank, 5 steps per epoch
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    resumed = _torchrun(tmp_path / "b", *common, "--resume", str(tmp_path / "b" / "checkpoint-4"))
    _resume_equals_uninterrupted(full, resumed, first_step=8)
    assert full[0]["fingerprint"] == full[1]["fingerprint"]


# ---------------------------------------------------------------------------- models and inputs
def test_sequence_classification_feeds_cross_entropy(tmp_path):
    res = worker.main(["--out", str(tmp_path), "--task", "cls", "--samples", "64", "--batch-size", "8",
                       "--epochs", "5"])
    assert res["stats"]["seen_fraction"] == 1.0
    assert 0.3 < res["stats"]["table_mean_loss"] < 1.5  # per-sample cross-entropy of a 2-class problem
    assert res["stats"]["kl_to_uniform"] > 0


def test_datasets_dataset_with_unused_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import TrainingArguments

    base = worker.Samples(32, "lm")
    rows = [base[i] for i in range(32)]
    ds = datasets.Dataset.from_dict({
        "input_ids": [r["input_ids"].tolist() for r in rows],
        "attention_mask": [r["attention_mask"].tolist() for r in rows],
        "labels": [r["labels"].tolist() for r in rows],
        "text": [f"sample {i}" for i in range(32)],  # not a model input: the Trainer removes it
    })
    from transformers import default_data_collator

    trainer, _ = worker.build(["--out", str(tmp_path)])
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    t = worker.RecordingTrainer(model=trainer.model, args=args, train_dataset=ds, data_collator=default_data_collator)
    t.train()
    assert sorted(i for m in t.record for i in m["fed"]) == list(range(32))
    assert t.irdro_sampler.stats()["pending_feedback"] == 8  # one update per micro-batch (delay 32: not applied yet)


def _class_label_trainer(tmp_path, datasets, irdro):
    """A real Trainer on a ``datasets.Dataset`` whose ``label`` column is a 3-class ``ClassLabel``."""
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        TrainingArguments,
        default_data_collator,
    )

    n = 48
    base = worker.Samples(n, "lm")
    labels = [i % 3 if i < 40 else 2 for i in range(n)]  # class 2 larger: the ids are the data's, not a range
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int64")),
        "attention_mask": datasets.Sequence(datasets.Value("int64")),
        "label": datasets.ClassLabel(names=["a", "b", "c"]),
    })
    ds = datasets.Dataset.from_dict({
        "input_ids": [base[i]["input_ids"].tolist() for i in range(n)],
        "attention_mask": [base[i]["attention_mask"].tolist() for i in range(n)],
        "label": labels,
    }, features=features)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=worker.VOCAB, n_positions=worker.SEQ, n_embd=16,
                                                     n_layer=1, n_head=2, num_labels=3, pad_token_id=0))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=1,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = IRDROTrainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator, irdro=irdro)
    return trainer, labels


def _group_notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "no groups were given" in r.getMessage()]


def test_class_label_column_becomes_the_groups(tmp_path, caplog):
    datasets = pytest.importorskip("datasets")
    caplog.set_level("INFO", logger="irdro_sampler.integrations.hf")
    trainer, labels = _class_label_trainer(tmp_path / "auto", datasets, dict(seed=1))
    trainer.train()
    assert trainer.irdro_sampler.table.groups.tolist() == labels
    assert any("ClassLabel" in r.getMessage() for r in caplog.records)
    assert _group_notes(caplog) == []
    # groups=None is the user's choice: no groups, and no note about them either
    caplog.clear()
    trainer, _ = _class_label_trainer(tmp_path / "off", datasets, dict(seed=1, groups=None))
    trainer.train()
    assert trainer.irdro_sampler.table.groups is None
    assert _group_notes(caplog) == []


def test_class_label_groups_reads_only_declared_complete_labels():
    datasets = pytest.importorskip("datasets")
    import numpy as np

    from irdro_sampler.integrations._class_targets import class_label_groups

    feats = datasets.Features({"label": datasets.ClassLabel(num_classes=3), "x": datasets.Value("float32")})
    ds = datasets.Dataset.from_dict({"label": [0, 2, 1, 2, 0, 1], "x": [0.0, 1, 2, 3, 4, 5]}, features=feats)
    column, ids = class_label_groups(ds)
    assert column == "label" and ids.tolist() == [0, 2, 1, 2, 0, 1] and ids.dtype == np.int64
    shuffled = ds.shuffle(seed=0)  # an indices mapping: the ids follow the data set's own order
    assert class_label_groups(shuffled)[1].tolist() == [int(v) for v in shuffled.to_dict()["label"]]
    unlabelled = datasets.Dataset.from_dict({"label": [0, -1, 1]}, features=datasets.Features(
        {"label": datasets.ClassLabel(num_classes=2)}))
    assert class_label_groups(unlabelled) is None  # -1: a missing label, not a class
    assert class_label_groups(datasets.Dataset.from_dict({"label": [0, 1, 1]})) is None  # not declared
    assert class_label_groups(worker.Samples(8, "cls")) is None  # a torch Dataset


def test_class_index_labels_without_groups_are_noted_once(tmp_path, caplog):
    caplog.set_level("WARNING", logger="irdro_sampler.integrations.hf")
    worker.main(["--out", str(tmp_path / "cls"), "--task", "cls", "--samples", "32", "--batch-size", "4"])
    notes = _group_notes(caplog)
    assert len(notes) == 1  # 8 micro-batches, one note
    assert "irdro=dict(groups=labels)" in notes[0] and "RESULTS_quality.md" in notes[0]
    caplog.clear()
    worker.main(["--out", str(tmp_path / "lm"), "--task", "lm", "--samples", "32", "--batch-size", "4"])
    assert _group_notes(caplog) == []  # a causal LM's labels are token ids, not classes


def test_iterable_dataset_is_refused_naming_the_argument(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from ()

    trainer, _ = worker.build(["--out", str(tmp_path), "--max-steps", "3"])  # the Trainer needs it for streams
    t = IRDROTrainer(model=trainer.model, args=trainer.args, train_dataset=Stream())
    with pytest.raises(TypeError, match="train_dataset: .*map-style.*Stream"):
        t.get_train_dataloader()


def test_feedback_delay_must_exceed_gradient_accumulation(tmp_path):
    trainer, _ = worker.build(["--out", str(tmp_path), "--grad-accum", "40"])
    with pytest.raises(ValueError, match="feedback_delay=32 must exceed.*gradient_accumulation_steps \\(40\\)"):
        trainer.get_train_dataloader()
    trainer, _ = worker.build(["--out", str(tmp_path), "--grad-accum", "2"])
    trainer._irdro_spec = {"feedback_delay": 3, "seed": 3}
    with pytest.raises(ValueError, match="feedback_delay=3"):
        trainer.get_train_dataloader()


def test_bad_options_name_the_argument(tmp_path):
    trainer, _ = worker.build(["--out", str(tmp_path)])
    with pytest.raises(ValueError, match="irdro: 'batch_size' is set by the Trainer"):
        IRDROTrainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset,
                     irdro={"batch_size": 8})
    with pytest.raises(ValueError, match="per_sample_loss must be .*'nope'"):
        IRDROTrainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset,
                     per_sample_loss="nope")
    from irdro_sampler import IRDROSampler

    wrong = IRDROSampler(96, 8)
    t = IRDROTrainer(model=trainer.model, args=trainer.args, train_dataset=trainer.train_dataset, irdro=wrong)
    with pytest.raises(ValueError, match="batch_size=8 but the Trainer has 4"):
        t.get_train_dataloader()


def test_resume_from_a_checkpoint_without_sampler_state_raises(tmp_path):
    worker.main(["--out", str(tmp_path), "--max-steps", "3", "--save-steps", "3"])
    os.remove(tmp_path / "checkpoint-3" / STATE_FILE)
    with pytest.raises(FileNotFoundError, match=f"resume_from_checkpoint: .*checkpoint-3 has no {STATE_FILE}"):
        worker.main(["--out", str(tmp_path), "--max-steps", "6", "--resume", str(tmp_path / "checkpoint-3")])


def test_dataloader_workers_do_not_change_the_order(tmp_path):
    """2 DataLoader worker processes (the keyed dataset and collate pickled to them): the same batches, the
    same sampler state as without workers, and no feedback arrives late."""
    common = ["--grad-accum", "2", "--epochs", "2", "--samples", "64"]
    plain = worker.main(["--out", str(tmp_path / "a"), *common])
    (tmp_path / "b").mkdir()
    workers = worker.main(["--out", str(tmp_path / "b"), *common, "--workers", "2"])
    assert _by_step(workers) == _by_step(plain)
    assert workers["fingerprint"] == plain["fingerprint"] and workers["stats"]["late_feedback"] == 0
