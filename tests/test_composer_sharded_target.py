"""``ShardedSamplerTarget`` without a Trainer (one gloo rank): found in a DataLoader, its checkpoint entry
checked before any DataLoader exists, a ``state_dict()`` outside a ``CheckpointSaver`` save writes nothing
and loading it is refused, and IRDRO options that contradict the sampler are refused. The Trainer runs on
2 ranks are in ``tests/test_composer_sharded.py``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _core_helpers import gloo_group, spawn_gloo

pytest.importorskip("composer")

from irdro_sampler import DROWeighting, IndexedDataset  # noqa: E402
from irdro_sampler.integrations.composer import (  # noqa: E402
    FeedbackOptions,
    ShardedBatchSampler,
    ShardedSamplerTarget,
    find_target,
)
from irdro_sampler.integrations.composer.targets import check_target_states  # noqa: E402
from irdro_sampler.sharded_sampler import ShardedIRDROSampler  # noqa: E402


def _checks(rank: int, world: int, port: int, results) -> None:
    out: dict[str, object] = {}
    with gloo_group(rank, world, port):
        sampler = ShardedIRDROSampler(40, 4, num_shards=4, seed=1, feedback_delay=2, temperature=0.5)
        data = IndexedDataset(torch.utils.data.TensorDataset(torch.arange(40.0)))
        loader = torch.utils.data.DataLoader(data, batch_sampler=ShardedBatchSampler(sampler))
        target = find_target(loader)
        out["found"] = type(target).__name__
        rule = DROWeighting(temperature=0.5)
        target.attach(FeedbackOptions(rule, {"temperature": 0.5}, {}, None, "resample"), None)
        try:
            target.attach(FeedbackOptions(rule, {"temperature": 0.7}, {}, None, "resample"), None)
        except ValueError as e:
            out["conflict"] = str(e)
        for b in range(4):  # feedback_delay 2: the feedback of batches 0 and 1 is applied
            ids, _ = sampler.batch(b)
            target.update(ids, np.linspace(0, 1, ids.size, dtype=np.float32), step=b)
        out["stats"] = target.stats()
        loader.batch_sampler.set_epoch(1)  # as Composer does: passed on to the sampler
        out["len"] = len(loader)
        out["batches"] = [b[-1].tolist() for b in loader]  # the index is a tuple batch's last element
        out["epoch1"] = [sampler.batch(b)[0].tolist() for b in range(10, 20)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = target.state_dict()
        out["warned"] = [str(w.message) for w in caught]
        out["entry"] = dict(state["sharded_sampler"])
        fresh = ShardedSamplerTarget(ShardedIRDROSampler(40, 4, num_shards=4, seed=1, feedback_delay=2, temperature=0.5))
        for name, bad in (("no rows", state), ("unsharded", {"sampler": {}})):
            try:
                fresh.load_state_dict(bad)
            except ValueError as e:
                out[name] = str(e)
        out["fresh_unchanged"] = fresh.sampler.feedback.digest == ShardedIRDROSampler(
            40, 4, num_shards=4, seed=1, temperature=0.5).feedback.digest
        results[rank] = out


def test_target_found_checked_and_refusing_a_checkpoint_without_rows():
    (out,) = spawn_gloo(_checks, 1)
    assert out["found"] == "ShardedSamplerTarget"
    assert out["len"] == 10 and out["batches"] == out["epoch1"]  # epoch 1's batches: 10 to 19
    assert "temperature=0.7" in out["conflict"]
    assert 0 < out["stats"]["seen_fraction"] <= 0.2 and np.isfinite(out["stats"]["table_mean_loss"])
    assert any("outside a CheckpointSaver save" in w for w in out["warned"])
    assert out["entry"]["folder"] is None and out["entry"]["path"] is None
    assert "were not saved" in out["no rows"]
    assert "unsharded IRDROSampler state" in out["unsharded"]
    assert out["fresh_unchanged"]


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"format": "other"}, "not a sharded sampler entry"),
        ({"format": "irdro_sampler.composer.ShardedSidecar", "folder": 3, "path": None, "fingerprint": 1,
          "feedback_digest": ""}, r"\['folder'\]"),
        ({"format": "irdro_sampler.composer.ShardedSidecar", "folder": "x", "path": None, "fingerprint": True,
          "feedback_digest": ""}, r"\['fingerprint'\]"),
    ],
)
def test_a_malformed_checkpoint_entry_fails_before_any_dataloader(entry, match):
    with pytest.raises(ValueError, match=match):
        check_target_states({"sharded_sampler": entry})
