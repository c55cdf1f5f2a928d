"""End to end: Composer + IRDRO on a WeightedStreamingDataset resumes exactly from checkpoints."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch

pytest.importorskip("streaming")
pytest.importorskip("composer")
from _streaming_composer_model import Tiny, per_sample_loss  # noqa: E402
from _streaming_data import fresh_local, write_mds  # noqa: E402
from composer import Callback, Trainer  # noqa: E402

from irdro_sampler import IndexListCollate  # noqa: E402
from irdro_sampler.integrations.composer import IRDRO, batch_sample_indices  # noqa: E402
from irdro_sampler.integrations.streaming import WeightedStreamingDataset  # noqa: E402

N, BATCH, ROUND = 20_000, 10, 200  # 20 batches per round; 160 KB of weights per tensor


class RecordIds(Callback):
    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []

    def after_dataloader(self, state, logger) -> None:
        self.ids.append(batch_sample_indices(state).numpy().copy())  # IRDRO took them out of the batch


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mds_composer"))
    write_mds(root, N, 500)  # 40 shards
    return root


def run(root, *, num_workers, save_folder=None, save_interval=None, load_path=None, max_duration="3ep",
        collate_fn=None, microbatch=None):
    ds = WeightedStreamingDataset(
        round_size=ROUND, remote=os.path.join(root, "remote"), local=fresh_local(root), batch_size=BATCH,
        shuffle=True, shuffle_block_size=300, seed=1,
    )
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=num_workers, collate_fn=collate_fn)
    algo = IRDRO(temperature=0.5, uniform_mix=0.1, loss_fn=per_sample_loss, log_interval=0)
    rec = RecordIds()
    model = Tiny()
    trainer = Trainer(
        model=model, train_dataloader=dl, max_duration=max_duration, algorithms=[algo], callbacks=[rec],
        optimizers=torch.optim.SGD(model.parameters(), lr=0.5), device="cpu", seed=3,
        save_folder=save_folder, save_interval=save_interval, save_overwrite=True, load_path=load_path,
        progress_bar=False, log_to_console=False, device_train_microbatch_size=microbatch,
    )
    trainer.fit()
    params = [p.detach().clone() for p in model.parameters()]
    out = dict(ids=np.concatenate(rec.ids), weights=ds.pending_weights(), losses=algo.table.losses.copy(), params=params,
               counts=algo.table.counts.copy(), state=algo.state_dict())
    trainer.close()
    return out


def same(a, b):
    assert np.array_equal(a["weights"], b["weights"])  # bitwise: IRDRO pushed identical weights
    assert np.array_equal(a["losses"], b["losses"], equal_nan=True)
    # The saved table holds no NaN (unseen: count 0), so zero-tolerance comparisons see equal states.
    ta, tb = a["state"]["table"], b["state"]["table"]
    for key in ("losses", "counts", "last_step"):
        assert torch.equal(ta[key], tb[key]) and torch.allclose(ta[key].double(), tb[key].double(), rtol=0, atol=0)
    for x, y in zip(a["params"], b["params"], strict=True):
        assert torch.equal(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_composer_resumes_exactly_mid_round(data_root, tmp_path, num_workers):
    full = run(data_root, num_workers=num_workers, save_folder=str(tmp_path), save_interval="25ba")
    assert len(full["ids"]) == 3 * ROUND
    assert not np.allclose(full["weights"], 1.0 / N)  # IRDRO did push loss-based weights
    ckpt = glob.glob(os.path.join(str(tmp_path), "*ba25*"))
    assert ckpt, os.listdir(tmp_path)
    state = torch.load(ckpt[0], weights_only=False)
    ir = state["state"]["dataset_state"]["train"]["irdro"]
    assert state["state"]["dataset_state"]["train"]["epoch"] == 1
    assert ir["frozen_weights"].numel() == N and ir["frozen_weights"].dtype == torch.float64
    resumed = run(data_root, num_workers=2 - num_workers, load_path=ckpt[0])
    # The resumed run trains exactly the batches the full run trained after batch 25.
    assert np.array_equal(resumed["ids"], full["ids"][25 * BATCH :])
    same(full, resumed)


@pytest.mark.slow
def test_composer_resumes_at_round_boundary_without_replay(data_root, tmp_path):
    full = run(data_root, num_workers=0, save_folder=str(tmp_path), save_interval="1ep")
    ckpt = glob.glob(os.path.join(str(tmp_path), "ep1-*"))
    assert ckpt, os.listdir(tmp_path)
    state = torch.load(ckpt[0], weights_only=False)
    train_state = state["state"]["dataset_state"]["train"]
    assert (train_state["epoch"], train_state["sample_in_epoch"]) == (1, 0)
    resumed = run(data_root, num_workers=2, load_path=ckpt[0])
    assert np.array_equal(resumed["ids"], full["ids"][ROUND:])
    same(full, resumed)


@pytest.mark.slow
def test_index_list_collate_trains_like_the_default_collate(data_root):
    """Ids as a list (the advised collate with workers) change nothing: same batches, weights, model."""
    default = run(data_root, num_workers=2, max_duration="2ep")
    listed = run(data_root, num_workers=2, max_duration="2ep", collate_fn=IndexListCollate())
    assert np.array_equal(default["ids"], listed["ids"])
    same(default, listed)


@pytest.mark.slow
def test_index_list_collate_splits_into_microbatches(data_root):
    """Composer splits the id list with the tensors: 10 = 3 + 3 + 3 + 1, every sample reported once."""
    out = run(data_root, num_workers=0, max_duration="1ep", collate_fn=IndexListCollate(), microbatch=3)
    assert len(out["ids"]) == ROUND
    expected = np.bincount(out["ids"], minlength=N)
    assert np.array_equal(out["counts"], expected)
    assert np.isfinite(out["losses"][out["ids"]]).all()
