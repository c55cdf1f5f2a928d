"""IRDROCallback on real Lightning (CPU): 1 process and 2 DDP ranks (gloo, Lightning's own launcher).

What training_step received is decoded from the features (tests/_lightning_worker.py), so the counting
tests check what the model trained on. Runs in the `[lightning]` CI lane (.ci/lightning_lane); skipped
where lightning is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
import _lightning_worker as worker  # noqa: E402
from _core_helpers import free_port  # noqa: E402

sys.path.remove(str(TESTS))

from irdro_sampler import IndexedDataset, IRDROSampler  # noqa: E402
from irdro_sampler.integrations.lightning import IRDROCallback  # noqa: E402


def _run(out: Path, *args: str, devices: int = 1, check: bool = True) -> list[dict] | subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(TESTS / "_lightning_worker.py"), "--out", str(out),
                           "--devices", str(devices), *args], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    if not check:
        return proc
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


def _same_after(full: list[dict], resumed: list[dict], first_step: int) -> None:
    for a, b in zip(full, resumed, strict=True):
        ra = {m["step"]: m["idx"] for m in a["record"]}
        rb = {m["step"]: m["idx"] for m in b["record"]}
        assert min(rb) == first_step, sorted(rb)[:5]
        assert rb == {s: v for s, v in ra.items() if s >= first_step}
        assert a["fingerprint"] == b["fingerprint"]
        assert a["stats"] == b["stats"]


def test_one_rank_epoch_trains_every_sample_once_and_logs(tmp_path):
    res = worker.main(["--out", str(tmp_path), "--flat"])
    fed = [i for m in res["record"] for i in m["fed"]]
    assert sorted(fed) == list(range(96))
    assert all(m["fed"] == m["idx"] for m in res["record"])
    assert "irdro/ess_fraction" in res["logged"] and "irdro/drawn_loss_mean" in res["logged"]
    assert res["stats"]["late_feedback"] == 0


@pytest.mark.slow
def test_two_ranks_epoch_trains_every_sample_once(tmp_path):
    ranks = _run(tmp_path, "--flat", devices=2)
    fed = Counter(i for r in ranks for m in r["record"] for i in m["fed"])
    assert sorted(fed) == list(range(96)) and set(fed.values()) == {1}
    assert [len(r["record"]) for r in ranks] == [12, 12]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]


@pytest.mark.parametrize("ckpt, first_step", [("epoch=0-step=5.ckpt", 10), ("epoch=0-step=12.ckpt", 24)])
def test_resume_one_rank_is_bitwise(tmp_path, ckpt, first_step):
    """Mid-epoch (optimizer step 5 = batch 10) and end-of-epoch (step 12 = the epoch's last batch) checkpoints,
    gradient accumulation 2: the resumed run draws exactly the uninterrupted run's order."""
    common = ["--epochs", "2", "--grad-accum", "2"]
    full = worker.main(["--out", str(tmp_path / "a"), *common, "--save-every", "1"])
    assert full["stats"]["kl_to_uniform"] > 0.01  # real losses: the weights are not flat
    resumed = worker.main(["--out", str(tmp_path / "b"), *common, "--resume", str(tmp_path / "a" / "ckpt" / ckpt)])
    _same_after([full], [resumed], first_step)


def test_resume_after_an_epoch_cut_by_limit_train_batches_is_bitwise(tmp_path):
    """limit_train_batches=15 of 24: the checkpoint at the cut epoch's end resumes at the next epoch's start."""
    common = ["--epochs", "2", "--limit-batches", "15"]
    full = worker.main(["--out", str(tmp_path / "a"), *common, "--save-every", "15"])
    resumed = worker.main(["--out", str(tmp_path / "b"), *common, "--resume",
                           str(tmp_path / "a" / "ckpt" / "epoch=0-step=15.ckpt")])
    _same_after([full], [resumed], first_step=24)


@pytest.mark.slow
def test_resume_two_ranks_is_bitwise(tmp_path):
    common = ["--epochs", "2", "--grad-accum", "2", "--samples", "80"]  # 10 batches per epoch and rank
    full = _run(tmp_path / "a", *common, "--save-every", "3", devices=2)
    resumed = _run(tmp_path / "b", *common, "--resume", str(tmp_path / "a" / "ckpt" / "epoch=0-step=3.ckpt"),
                   devices=2)
    _same_after(full, resumed, first_step=6)


@pytest.mark.slow
def test_two_ranks_with_the_distributed_sampler_flag_on_keep_the_sampler(tmp_path):
    """use_distributed_sampler=True: Lightning leaves an IRDROSampler (a DistributedSampler) as it is, so the
    epoch still trains every sample once; the callback's check (the sampler must be the attached one) passes."""
    ranks = _run(tmp_path, "--flat", "--use-distributed-sampler", devices=2)
    fed = Counter(i for r in ranks for m in r["record"] for i in m["fed"])
    assert sorted(fed) == list(range(96)) and set(fed.values()) == {1}


def test_a_replaced_sampler_is_refused_naming_the_flag(tmp_path):
    """The check of on_train_start: a train DataLoader whose sampler is not the attached IRDROSampler."""
    import lightning as L

    class Replaced(worker.Module):
        def train_dataloader(self):
            loader = super().train_dataloader()
            return torch.utils.data.DataLoader(loader.dataset, batch_size=self.batch_size)  # sampler dropped

    irdro = IRDROCallback()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, callbacks=[irdro], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="sampler is SequentialSampler, not the attached IRDROSampler.*"
                       "use_distributed_sampler=False"):
        trainer.fit(Replaced(irdro, 32, 4, False, 0))


def test_state_dict_round_trip_and_errors():
    cb = IRDROCallback()
    assert cb.state_dict() == {}
    s = cb.attach(IRDROSampler(40, 4, seed=1))
    s.update([0, 1, 2], [1.0, 2.0, 3.0], step=0)
    state = cb.state_dict()
    assert state["next_batch"] == 0 and state["sampler"]["format"] == "irdro_sampler.IRDROSampler"
    state["next_batch"] = 13  # epoch 1, batch 3 of 10
    fresh = IRDROCallback()
    fresh.load_state_dict(state)
    restored = fresh.attach(IRDROSampler(40, 4, seed=1))
    assert restored.fingerprint() == s.fingerprint() and restored.epoch == 1
    assert len(list(iter(restored))) == 4 * 7  # starts at batch 3 of the epoch
    with pytest.raises(TypeError, match="sampler must be an irdro_sampler.IRDROSampler, got RandomSampler"):
        cb.attach(torch.utils.data.RandomSampler(range(4)))
    with pytest.raises(ValueError, match="not an IRDROCallback state"):
        IRDROCallback().load_state_dict({"format": "x"})
    with pytest.raises(ValueError, match="check_interval must be an int >= 0, got -1"):
        IRDROCallback(check_interval=-1)


def test_missing_per_sample_loss_names_the_key():
    cb = IRDROCallback()
    with pytest.raises(KeyError, match="'per_sample_loss'"):
        cb._losses({"loss": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="1-D float tensor"):
        cb._losses({"per_sample_loss": torch.ones(2, 2)})


def _group_notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "no groups were given" in r.getMessage()]


def test_class_index_targets_without_groups_are_noted_once(tmp_path, caplog):
    """A real fit on (x, y, idx) batches: a sampler without groups gets one note; with the labels, none."""
    import lightning as L

    caplog.set_level("WARNING", logger="irdro_sampler.integrations.lightning")

    def fit(module_type):
        irdro = IRDROCallback()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, callbacks=[irdro], logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            use_distributed_sampler=False, default_root_dir=str(tmp_path))
        trainer.fit(module_type(irdro, 32, 4, False, 0))

    fit(worker.Module)  # 8 batches
    notes = _group_notes(caplog)
    assert len(notes) == 1 and "groups=labels" in notes[0] and "RESULTS_quality.md" in notes[0]

    class WithGroups(worker.Module):
        def train_dataloader(self):
            ds = IndexedDataset(worker.make_data(self.n))
            labels = worker.make_data(self.n).tensors[1].numpy()
            sampler = self.irdro.attach(IRDROSampler(ds, self.batch_size, seed=3, groups=labels))
            return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, sampler=sampler)

    caplog.clear()
    fit(WithGroups)
    assert _group_notes(caplog) == []


def test_an_index_is_not_mistaken_for_class_targets(caplog):
    """(x, idx) batches: the last element is the index, not a label; a float target is not a class either."""
    caplog.set_level("WARNING", logger="irdro_sampler.integrations.lightning")
    cb = IRDROCallback()
    sampler = cb.attach(IRDROSampler(8, 4, seed=1))
    cb._note_class_targets({"loss": 0}, (torch.randn(4, 3), torch.arange(4)), sampler)
    cb._note_class_targets({"loss": 0}, (torch.randn(4, 3), torch.randn(4), torch.arange(4)), sampler)
    assert _group_notes(caplog) == []
    cb._note_class_targets({"loss": 0}, {"x": torch.randn(4, 3), "labels": torch.tensor([0, 1, 1, 2])}, sampler)
    assert len(_group_notes(caplog)) == 1
