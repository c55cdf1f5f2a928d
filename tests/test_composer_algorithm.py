"""The Composer IRDRO algorithm on a real Composer Trainer (CPU): wiring, losses, modes, errors.

Slow pieces (Composer import, the tiny GPT-2) are built once per module. Resumption and two-rank
agreement live in test_composer_resume.py and test_composer_multirank.py.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch

pytest.importorskip("composer")
pytest.importorskip("transformers")

from _composer_example import ex  # noqa: E402
from composer.core import Callback, Event  # noqa: E402
from composer.loggers import InMemoryLogger  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

from irdro_sampler import IRDROSampler, LossTable  # noqa: E402
from irdro_sampler.cut_rules import DEFAULT_CUT_RULE, DEFAULT_ZSCORE  # noqa: E402
from irdro_sampler.integrations.composer import (  # noqa: E402
    IRDRO,
    batch_sample_indices,
    causal_lm_loss_sums,
    causal_lm_per_sample_loss,
    classification_per_sample_loss,
    default_per_sample_loss,
    gather_feedback,
)
from irdro_sampler.integrations.composer.losses import has_class_targets  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm_data():
    return ex.make_lm_data(num_samples=128, seq_len=16, vocab_size=32, noise_fraction=0.1, seed=0)


@pytest.fixture(scope="module")
def lm_model_template():
    return ex.build_lm_model(vocab_size=32, seq_len=16, seed=0)


@pytest.fixture(scope="module")
def clf_data():
    return ex.make_classifier_data(num_samples=96, seed=0)


def _lm_model(template):
    return copy.deepcopy(template)


class Recorder(Callback):
    """Records what the training loop did, per event (a real callback; nothing is mocked)."""

    def __init__(self, algo: IRDRO | None = None) -> None:
        self.algo = algo
        self.events: list[tuple[str, int]] = []
        self.losses_before_backward: list[float] = []
        self.expected: list[float] = []
        self.params_before: list[dict[str, torch.Tensor]] = []
        self.batches: list = []
        self.weights: list[np.ndarray] = []
        self.round_probs: list[np.ndarray] = []
        self.batch_indices: list[torch.Tensor | None] = []  # per batch, as IRDRO took them out of the batch

    def run_event(self, event: Event, state, logger) -> None:  # noqa: D401
        self.events.append((event.value, int(state.timestamp.batch)))
        if event == Event.AFTER_DATALOADER:
            idx = batch_sample_indices(state)
            self.batch_indices.append(None if idx is None else idx.clone())
        if event == Event.BEFORE_FORWARD:
            self.params_before.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})
            self.batches.append(copy.deepcopy(state.batch))
        if event == Event.EPOCH_END and self.algo is not None and self.algo.table is not None:
            self.round_probs.append(self.algo._rule.probabilities(self.algo.table))  # after the algorithm ran
        if event == Event.BEFORE_BACKWARD:
            self.losses_before_backward.append(float(state.loss.detach()))
            if self.algo is not None and self.algo.mode != "resample":
                with torch.no_grad():
                    per = default_per_sample_loss(state.outputs, state.batch).double()
                if self.algo.mode == "importance":
                    idx = self.batch_indices[-1].numpy()  # one microbatch per batch in these runs
                    w = torch.as_tensor(self.algo.sampler.importance_weights(idx, step=self.algo._step))
                    self.weights.append(w.numpy())
                    self.expected.append(float((w * per).mean()))
                else:
                    tau = self.algo.rule_options.get("temperature", 1.0)
                    self.expected.append(float((torch.softmax(per / tau, 0) * per).sum()))


# --------------------------------------------------------------------------------------------- isolation
def test_importing_the_package_does_not_import_composer():
    code = "import sys, irdro_sampler; assert 'composer' not in sys.modules, 'composer imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


# --------------------------------------------------------------------------------------------- losses
def test_causal_lm_loss_matches_the_models_own_loss(lm_model_template):
    model = _lm_model(lm_model_template)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (5, 16), generator=g)
    labels = ids.clone()
    labels[1, 10:] = -100  # padding
    labels[2, :] = -100  # no target at all
    labels[3, 1::3] = -100  # holes
    with torch.no_grad():
        out = model({"input_ids": ids, "labels": labels})
    per = causal_lm_per_sample_loss(out.logits, labels)
    sums, counts = causal_lm_loss_sums(out.logits, labels)
    assert per.shape == (5,) and per.dtype == torch.float32
    assert torch.isnan(per[2]) and counts[2] == 0
    ok = counts > 0
    weighted = (per[ok].double() * counts[ok]).sum() / counts.sum()
    torch.testing.assert_close(weighted.float(), out.loss.float(), rtol=1e-5, atol=1e-6)
    # Chunking (one sequence at a time) and a low-precision model output give the same per-sample losses.
    one_row = causal_lm_per_sample_loss(out.logits, labels, max_chunk_bytes=1)
    torch.testing.assert_close(one_row, per, equal_nan=True)
    bf16 = causal_lm_per_sample_loss(out.logits.bfloat16(), labels)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16[ok], per[ok], rtol=2e-2, atol=2e-2)
    # The dispatcher picks the LM path for dict batches with labels, and falls back to input_ids.
    torch.testing.assert_close(default_per_sample_loss(out, {"labels": labels}), per, equal_nan=True)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    from_ids = default_per_sample_loss(out, {"input_ids": ids, "attention_mask": mask})
    assert torch.isfinite(from_ids).all()


def test_causal_lm_loss_gradient_skips_empty_sequences():
    logits = torch.randn(3, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 6))
    labels[1] = -100
    per = causal_lm_per_sample_loss(logits, labels)
    safe = torch.where(torch.isfinite(per), per, torch.zeros_like(per))
    safe.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[1].abs().sum() == 0


def test_classification_loss():
    logits = torch.randn(7, 4)
    y = torch.randint(0, 4, (7,))
    per = classification_per_sample_loss(logits, y)
    torch.testing.assert_close(per.mean(), torch.nn.functional.cross_entropy(logits, y))
    torch.testing.assert_close(default_per_sample_loss(logits, (None, y, torch.arange(7))), per)
    with pytest.raises(ValueError, match="pass loss_fn"):
        default_per_sample_loss(torch.randn(7, 4, 3, 2), {"labels": y})


def test_gather_feedback_single_process_is_identity():
    idx, loss = gather_feedback(torch.tensor([3, 1, 3]), torch.tensor([0.5, float("nan"), 2.0]))
    assert idx.tolist() == [3, 1, 3] and idx.dtype == torch.int64
    assert torch.equal(torch.isnan(loss), torch.tensor([False, True, False]))


# --------------------------------------------------------------------------------------------- training
def _reported(sampler: IRDROSampler) -> tuple[list[int], int]:
    """(steps, number of (index, loss) pairs) of the feedback buffered in the sampler."""
    pending = sampler.state_dict()["pending"]
    return pending["keys"][:, 0].tolist(), int(pending["indices"].numel())


def _lm_trainer(lm_data, template, *, steps=6, batch_size=8, mode="resample", microbatch=None, log_interval=2,
                optimizer=None, sampler=True, algo_kwargs=None, callbacks=(), sampler_kwargs=None):
    """A Trainer on the tiny GPT-2; ``sampler=False`` uses a plain shuffling sampler (reweight mode)."""
    data, _, _ = lm_data
    kind = "irdro" if sampler else "none"
    dl = ex.build_dataloader(data, kind, batch_size, seed=0, sampler_kwargs=sampler_kwargs)
    algo = IRDRO(mode=mode, log_interval=log_interval, **(algo_kwargs or {}))
    memory = InMemoryLogger()
    model = _lm_model(template)
    trainer = ex.build_trainer(
        model, dl, [algo], steps=steps, seed=0, microbatch_size=microbatch, loggers=[memory],
        callbacks=list(callbacks), optimizer=None if optimizer is None else optimizer(model),
    )
    return trainer, algo, memory


def test_lm_training_feeds_the_sampler_and_logs_metrics(lm_data, lm_model_template):
    rec = Recorder()
    trainer, algo, memory = _lm_trainer(lm_data, lm_model_template, steps=6, log_interval=2, callbacks=[rec])
    trainer.fit()
    sampler = algo.sampler
    assert isinstance(sampler, IRDROSampler)
    # Feedback is buffered until batch step + feedback_delay is drawn: one update per batch, in order.
    assert _reported(sampler) == ([0, 1, 2, 3, 4, 5], 6 * 8)  # every trained sample reported exactly once
    sampler.flush()
    assert sampler.state_dict()["schedule"]["max_reported_step"] == 5
    assert sampler.table.num_seen > 0 and np.isfinite(sampler.table.mean_loss())
    for key in ("ess_fraction", "kl_to_uniform", "temperature", "max_prob", "seen_fraction",
                "truncated_fraction", "late_feedback", "table_mean_loss", "drawn_loss_mean"):
        series = memory.data.get(f"irdro/{key}")
        assert series is not None and len(series) == 3, key  # batches 2, 4, 6
    assert memory.data["irdro/late_feedback"][-1][1] == 0.0
    # Event order the algorithm relies on: timestamp advances before BATCH_END.
    names = [e for e, _ in rec.events]
    first_end = names.index("batch_end")
    assert rec.events[first_end][1] == 1 and rec.events[names.index("batch_start")][1] == 0
    trainer.close()


def test_microbatching_reports_each_sample_once(lm_data, lm_model_template):
    full, algo_full, _ = _lm_trainer(lm_data, lm_model_template, steps=4, microbatch=None)
    full.fit()
    micro, algo_micro, _ = _lm_trainer(lm_data, lm_model_template, steps=4, microbatch=3)  # 8 = 3 + 3 + 2
    micro.fit()
    assert _reported(algo_micro.sampler) == ([0, 1, 2, 3], 4 * 8)
    algo_full.sampler.flush()
    algo_micro.sampler.flush()
    t_full, t_micro = algo_full.sampler.table, algo_micro.sampler.table
    np.testing.assert_array_equal(t_full.counts, t_micro.counts)  # same draws, same samples
    np.testing.assert_allclose(t_full.losses, t_micro.losses, rtol=1e-4, equal_nan=True)
    full.close()
    micro.close()


def test_repeated_train_batch_attempts_do_not_double_count(lm_data, lm_model_template):
    # LBFGS evaluates its closure several times per step: Composer reruns the whole microbatch loop
    # (BEFORE_TRAIN_BATCH, forward, loss, backward) each time, exactly as on an auto-microbatching retry.
    rec = Recorder()
    trainer, algo, _ = _lm_trainer(
        lm_data, lm_model_template, steps=3, callbacks=[rec],
        optimizer=lambda m: torch.optim.LBFGS(m.parameters(), lr=0.1, max_iter=3),
    )
    trainer.fit()
    attempts = sum(1 for e, _ in rec.events if e == "before_train_batch")
    assert attempts > 3  # the loop really ran more than once per batch
    assert _reported(algo.sampler) == ([0, 1, 2], 3 * 8)
    trainer.close()


@pytest.mark.parametrize("mode", ["importance", "reweight"])
def test_loss_replacing_modes_change_the_backpropagated_loss(lm_data, lm_model_template, mode):
    rec = Recorder()
    kwargs = {"temperature": 2.0} if mode == "reweight" else {}
    trainer, algo, memory = _lm_trainer(lm_data, lm_model_template, steps=3, mode=mode, callbacks=[rec],
                                        algo_kwargs=kwargs, sampler=(mode == "importance"))
    rec.algo = algo
    trainer.fit()
    assert len(rec.expected) == 3
    np.testing.assert_allclose(rec.losses_before_backward, rec.expected, rtol=1e-5)
    # The logged train loss is the one that was backpropagated.
    logged = [v for _, v in memory.data["loss/train/total"]]
    np.testing.assert_allclose(logged, rec.expected, rtol=1e-5)
    if mode == "reweight":
        assert algo.sampler is None and algo.table is None  # uniform data, nothing fed
        (_, max_w), = memory.data["irdro/reweight_max_weight"]
        assert 1 / 8 < max_w < 1  # in-batch softmax weights over 8 samples
    trainer.close()


def test_importance_mode_gradient_is_the_weighted_per_sample_loss(clf_data):
    # An SGD step through Composer equals a hand-made step on mean_i(w_i * l_i) from the same batch.
    data, _, _ = clf_data
    dl = ex.build_dataloader(data, "irdro-importance", 16, seed=0, sampler_kwargs={"temperature": 0.5})
    algo = IRDRO(mode="importance", log_interval=0)
    model = ex.build_classifier_model(seed=0)
    rec = Recorder(algo)
    lr = 0.5
    # 40 batches with feedback_delay 32: the last batches are drawn from non-uniform weights.
    trainer = ex.build_trainer(model, dl, [algo], steps=40, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                               callbacks=[rec])
    trainer.fit()
    step = len(rec.batches) - 1
    batch, before, w = rec.batches[step], rec.params_before[step], torch.as_tensor(rec.weights[step])
    assert not np.allclose(w.numpy(), 1.0)  # the draw was not uniform
    ref = ex.build_classifier_model(seed=0)
    ref.load_state_dict(before)
    per = classification_per_sample_loss(ref(batch), batch["labels"])
    (w.float() * per).mean().backward()
    after = model.state_dict()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            torch.testing.assert_close(after[name], p - lr * p.grad, rtol=1e-5, atol=1e-6)
    trainer.close()


def test_streaming_protocol_table_and_round_weights(tmp_path):
    """The duck-typed streaming path (set_weights + round_size): table fed per batch, weights per round."""

    class TinyWeightedStream(IterableDataset):
        """A minimal dataset speaking the WeightedStreamingDataset protocol (rounds = epochs)."""

        def __init__(self, x, y, round_size):
            self.x, self.y, self.round_size = x, y, round_size
            self.num_samples = len(x)
            self.weights = np.full(self.num_samples, 1.0 / self.num_samples)
            self.pushed = []
            self.epoch = 0

        def set_weights(self, weights):
            self.weights = np.asarray(weights, dtype=np.float64)
            self.pushed.append(self.weights.copy())

        def __iter__(self):
            rng = np.random.default_rng([0, self.epoch])
            self.epoch += 1
            for i in rng.choice(self.num_samples, size=self.round_size, p=self.weights):
                yield {"x": self.x[i], "labels": self.y[i], "sample_idx": int(i)}

    data, _, _ = ex.make_classifier_data(num_samples=64, seed=1)
    stream = TinyWeightedStream(data.columns["x"], data.columns["labels"], round_size=32)
    dl = DataLoader(stream, batch_size=8)
    algo = IRDRO(truncate_quantile=0.9, log_interval=2)
    model = ex.build_classifier_model(seed=0)
    memory = InMemoryLogger()
    rec = Recorder(algo)
    trainer = ex.build_trainer(model, dl, [algo], steps=9, loggers=[memory], callbacks=[rec])
    trainer.fit()
    assert algo.sampler is None and isinstance(algo.table, LossTable)
    expected = np.zeros(64, dtype=np.int64)  # the table counts each sample once per batch it was in
    for idx in rec.batch_indices:
        expected[np.unique(idx.numpy())] += 1
    np.testing.assert_array_equal(algo.table.counts, expected)
    assert int(algo.table.last_step.max()) == 8
    assert len(stream.pushed) == 2  # one push per finished round (EPOCH_END)
    assert len(rec.round_probs) == 2
    for pushed, table_probs in zip(stream.pushed, rec.round_probs, strict=True):
        np.testing.assert_array_equal(pushed, table_probs)
    assert not np.allclose(stream.pushed[-1], 1 / 64)  # the table moved the weights
    assert "irdro/ess_fraction" in memory.data
    state = algo.state_dict()
    assert "table" in state
    path = tmp_path / "algo.pt"
    torch.save(state, path)
    fresh = IRDRO(truncate_quantile=0.9)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    fresh.table = LossTable(64)
    fresh._apply_state(fresh._pending_state)
    np.testing.assert_array_equal(fresh.table.losses, algo.table.losses)
    trainer.close()


# --------------------------------------------------------------------------------------------- state
def test_state_dict_is_plain_and_roundtrips_with_weights_only(lm_data, lm_model_template, tmp_path):
    trainer, algo, _ = _lm_trainer(lm_data, lm_model_template, steps=3)
    trainer.fit()
    path = tmp_path / "irdro.pt"
    torch.save(algo.state_dict(), path)
    loaded = torch.load(path, weights_only=True)  # tensors and primitives only
    assert loaded["sampler"]["schedule"]["max_reported_step"] == 2
    fresh = IRDRO()
    fresh.load_state_dict(loaded)
    assert fresh.state_dict()["sampler"]["pending"]["indices"].numel() == 3 * 8  # stashed, still saveable
    trainer.close()


# --------------------------------------------------------------------------------------------- errors
def test_no_sampler_is_a_clear_error(clf_data):
    data, _, _ = clf_data
    dl = ex.build_dataloader(data, "none", 8)
    trainer = ex.build_trainer(ex.build_classifier_model(), dl, [IRDRO()], steps=2)
    with pytest.raises(ValueError, match="IRDROSampler"):
        trainer.fit()
    trainer.close()


def test_missing_index_key_is_a_clear_error_before_the_first_step(clf_data):
    data, _, _ = clf_data
    model = ex.build_classifier_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dl = DataLoader(data, batch_size=8, sampler=IRDROSampler(data, 8, num_replicas=1, rank=0))  # not indexed
    trainer = ex.build_trainer(model, dl, [IRDRO()], steps=2)
    with pytest.raises(KeyError, match="IndexedDataset"):
        trainer.fit()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # nothing was trained
    trainer.close()


def test_wrong_loss_shape_is_a_clear_error_at_the_first_batch(clf_data):
    data, _, _ = clf_data
    dl = ex.build_dataloader(data, "irdro", 8)
    bad = IRDRO(loss_fn=lambda outputs, batch: torch.nn.functional.cross_entropy(outputs, batch["labels"]))
    trainer = ex.build_trainer(ex.build_classifier_model(), dl, [bad], steps=2)
    with pytest.raises(ValueError, match=r"one loss per sample, shape \(8,\)"):
        trainer.fit()
    assert trainer.state.timestamp.batch == 0
    trainer.close()


@pytest.mark.parametrize("with_groups", [False, True])
def test_class_targets_without_groups_are_noted_once(clf_data, caplog, with_groups):
    data, groups, _ = clf_data
    dl = ex.build_dataloader(data, "irdro", 8, sampler_kwargs={"groups": groups} if with_groups else None)
    trainer = ex.build_trainer(ex.build_classifier_model(), dl, [IRDRO(log_interval=0)], steps=4)
    with caplog.at_level("WARNING", logger="irdro_sampler.integrations.composer.algorithm"):
        trainer.fit()
    notes = [r for r in caplog.records if "look like class indices and no groups" in r.getMessage()]
    assert len(notes) == (0 if with_groups else 1)
    if notes:
        assert "0.006-0.130" in notes[0].getMessage() and "groups=labels" in notes[0].getMessage()
    trainer.close()


def test_lm_batches_are_not_class_targets():
    ids = torch.randint(0, 50, (4, 9))
    assert not has_class_targets({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert has_class_targets({"x": torch.zeros(4, 3), "labels": torch.tensor([0, 1, 2, 1])})
    assert has_class_targets((torch.zeros(4, 3), torch.tensor([0, 1, 2, 1])))
    assert not has_class_targets((torch.zeros(4, 3), torch.zeros(4)))  # regression targets


def test_detached_loss_in_importance_mode_is_an_error(clf_data):
    data, _, _ = clf_data
    dl = ex.build_dataloader(data, "irdro-importance", 8)
    bad = IRDRO(mode="importance", loss_fn=lambda o, b: classification_per_sample_loss(o, b["labels"]).detach())
    trainer = ex.build_trainer(ex.build_classifier_model(), dl, [bad], steps=2)
    with pytest.raises(ValueError, match="without gradients"):
        trainer.fit()
    trainer.close()


def test_option_conflicts_and_bad_options():
    with pytest.raises(ValueError, match="mode"):
        IRDRO(mode="sometimes")
    with pytest.raises(ValueError, match="temperature"):
        IRDRO(temperature=-1.0)
    with pytest.raises(ValueError, match="at most one"):
        IRDRO(temperature=1.0, kl_radius=0.1)
    with pytest.raises(ValueError, match="loss_fn"):
        IRDRO(loss_fn="no_such_loss")


def test_options_must_agree_with_the_sampler(clf_data):
    data, _, _ = clf_data
    dl = ex.build_dataloader(data, "irdro", 8, sampler_kwargs={"temperature": 1.0})
    trainer = ex.build_trainer(ex.build_classifier_model(), dl, [IRDRO(temperature=2.0)], steps=1)
    with pytest.raises(ValueError, match="temperature=2.0"):
        trainer.fit()
    trainer.close()
    dl = ex.build_dataloader(data, "irdro", 8, sampler_kwargs={"temperature": 1.0, "truncate_quantile": 0.9})
    trainer = ex.build_trainer(ex.build_classifier_model(), dl, [IRDRO(temperature=1.0, truncate_quantile=0.9)],
                               steps=1)
    trainer.fit()  # agreeing options are fine
    trainer.close()
    # A sampler left at its defaults agrees with IRDRO() and with the defaults spelled out, and with
    # nothing else: a fixed temperature is not the default (which calibrates tau from the ESS).
    for agreeing in (IRDRO(), IRDRO(truncate_zscore=DEFAULT_ZSCORE, cut_rule=DEFAULT_CUT_RULE)):
        dl = ex.build_dataloader(data, "irdro", 8)
        trainer = ex.build_trainer(ex.build_classifier_model(), dl, [agreeing], steps=1)
        trainer.fit()
        trainer.close()
    for bad, match in ((IRDRO(temperature=1.0), "temperature=1.0"), (IRDRO(cut_rule="mixture"), "cut_rule")):
        dl = ex.build_dataloader(data, "irdro", 8)
        trainer = ex.build_trainer(ex.build_classifier_model(), dl, [bad], steps=1)
        with pytest.raises(ValueError, match=match):
            trainer.fit()
        trainer.close()


# --------------------------------------------------------------------------------------------- llm-foundry
def test_llmfoundry_entry_point_builds_the_algorithm_from_a_dict():
    eps = {ep.name: ep for ep in entry_points(group="llmfoundry_algorithms")}
    assert "irdro" in eps, "run `pip install -e .` so the entry point is registered"
    cls = eps["irdro"].load()
    assert cls is IRDRO
    algo = cls(**{"temperature": 1.0, "truncate_quantile": 0.95})
    assert algo.rule_options == {"temperature": 1.0, "truncate_quantile": 0.95}
    assert algo.mode == "resample"
    assert "truncate_quantile=0.95" in repr(algo)
    yaml_like = cls(**{"kl_radius": 0.5, "mode": "importance", "loss_fn": "causal_lm", "log_interval": 100})
    assert yaml_like.mode == "importance" and yaml_like.log_interval == 100


# --------------------------------------------------------------------------------------------- example
@pytest.mark.parametrize("algorithm", ["none", "irdro", "irdro-importance", "irdro-reweight"])
def test_example_script_runs_with_each_algorithm(algorithm, capsys):
    out = ex.main(["--task", "classifier", "--algorithm", algorithm, "--steps", "6", "--num-samples", "64",
                   "--batch-size", "8", "--log-interval", "3"])
    assert np.isfinite(out["loss"])
    assert sum(out["drawn"].values()) == 6 * 8
    assert bool(out["stats"]) == (algorithm in ("irdro", "irdro-importance"))
    assert f"algorithm={algorithm}" in capsys.readouterr().out
    assert set(out["group_loss"]) == {"class0", "class1", "class2", "class3", "noise"}


def test_example_script_lm_task_with_microbatches():
    out = ex.main(["--task", "lm", "--algorithm", "irdro", "--steps", "4", "--num-samples", "64",
                   "--batch-size", "8", "--microbatch-size", "4"])
    assert np.isfinite(out["loss"]) and out["stats"]["temperature"] == 1.0
