"""Exact resumption: a Composer run resumed from a mid-epoch checkpoint ends bitwise equal to the
uninterrupted run (model weights and IRDRO sampler state), with DataLoader num_workers 0 and 2.

Composer replays and discards the batches already trained in the current epoch when it resumes a
plain DataLoader (and spins one batch of every earlier epoch); the sampler must tolerate both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("composer")
pytest.importorskip("transformers")

from _composer_example import ex  # noqa: E402

from irdro_sampler.integrations.composer import IRDRO  # noqa: E402

torch.set_num_threads(1)

STEPS = 12  # 64 samples / batch 8 = 8 batches per epoch: the run crosses an epoch boundary
CHECKPOINTS = (3, 9)  # epoch 0 batch 3, and epoch 1 batch 1 (needs the spin of epoch 0)


@pytest.fixture(scope="module")
def lm_data():
    return ex.make_lm_data(num_samples=64, seq_len=16, vocab_size=32, noise_fraction=0.1, seed=0)


def _run(lm_data, *, num_workers, mode, save_folder=None, load_path=None):
    data, _, _ = lm_data
    kind = {"resample": "irdro", "importance": "irdro-importance"}[mode]
    # A short feedback delay so that feedback really changes the draws within these few batches
    # (it must still exceed num_workers * prefetch_factor = 4).
    sampler_kwargs = {"feedback_delay": 5, "truncate_quantile": 0.9, "temperature": 0.5}
    dl = ex.build_dataloader(data, kind, 8, num_workers=num_workers, seed=3, sampler_kwargs=sampler_kwargs)
    algo = IRDRO(mode=mode, log_interval=0)
    model = ex.build_lm_model(vocab_size=32, seq_len=16, seed=0)
    kwargs = {}
    if save_folder is not None:
        kwargs.update(save_folder=str(save_folder), save_interval="3ba", save_overwrite=True)
    trainer = ex.build_trainer(model, dl, [algo], steps=STEPS, seed=7, load_path=load_path, **kwargs)
    trainer.fit()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = algo.sampler.state_dict()
    trainer.close()
    return weights, state


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        assert a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes(), path  # bitwise, NaN included
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize(
    ("num_workers", "mode"),
    [(0, "resample"), (2, "resample"), (0, "importance")],
)
def test_resumed_run_is_bitwise_equal_to_uninterrupted(lm_data, tmp_path, num_workers, mode):
    folder = tmp_path / "ckpt"
    full_weights, full_state = _run(lm_data, num_workers=num_workers, mode=mode, save_folder=folder)
    assert full_state["counters"]["late_feedback"] == 0
    assert full_state["schedule"]["max_reported_step"] == STEPS - 1
    # The sampler really adapted: the draws of later batches depend on the feedback.
    assert full_state["params"] is not None
    for batch in CHECKPOINTS:
        ckpt = folder / f"ep{batch // 8}-ba{batch}-rank0.pt"
        assert ckpt.exists(), sorted(p.name for p in folder.iterdir())
        saved = dict(torch.load(ckpt, weights_only=False)["state"]["algorithms"])["IRDRO"]["sampler"]
        assert saved["schedule"]["max_reported_step"] == batch - 1  # feedback committed before the save
        weights, state = _run(lm_data, num_workers=num_workers, mode=mode, load_path=str(ckpt))
        for name, value in full_weights.items():
            assert weights[name].numpy().tobytes() == value.numpy().tobytes(), f"weights {name} differ after resuming from batch {batch}"
        _assert_same(full_state, state)


def _assert_strictly_equal(a, b, path="state"):
    """What checkpoint comparisons do: torch.equal / allclose at zero tolerance, and == (NaN fails all)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=0, atol=0), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_strictly_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_strictly_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_two_identical_runs_give_equal_states_under_zero_tolerance(lm_data):
    """Unseen samples are stored as 0.0 with count 0, so identical runs' states compare equal."""
    _, first = _run(lm_data, num_workers=0, mode="resample")
    _, second = _run(lm_data, num_workers=0, mode="resample")
    assert int((first["table"]["counts"] == 0).sum()) > 0  # some samples are still unseen
    _assert_strictly_equal(first, second)
