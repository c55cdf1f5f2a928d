"""States saved by WeightedStreamingDataset before its split into parts load and resume bit for bit.

``tests/data/legacy_streaming_states.json`` was written by this file's ``main()`` run against commit
7844db4 (main before the split)::

    git archive 7844db4 irdro_sampler | tar -x -C /tmp/base
    PYTHONPATH=/tmp/base:tests python3 tests/test_streaming_legacy_state.py

For each draw scheme it holds a state saved three batches into round 2 (after two rounds of changing
weights) and what the old code did after loading it: the rest of the round's sample ids, the state
saved at the round's end and the fingerprint. Vectors are stored as float hex strings (exact).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("streaming")
import torch  # noqa: E402
from _streaming_data import fresh_local, write_mds  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

FIXTURE = Path(__file__).parent / "data" / "legacy_streaming_states.json"
OPTIONS = dict(round_size=40, batch_size=4, seed=7, shuffle_seed=3)


def _dataset(remote: str, root: str, draws: str):
    from irdro_sampler.integrations.streaming import WeightedStreamingDataset

    return WeightedStreamingDataset(remote=remote, local=fresh_local(root), draws=draws, **OPTIONS)


def _ids(ds, batches: int | None = None) -> list[int]:
    out: list[int] = []
    for k, batch in enumerate(DataLoader(ds, batch_size=OPTIONS["batch_size"], num_workers=0)):
        if batches is not None and k == batches:
            break
        out += [int(i) for i in batch["sample_idx"]]
    return out


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"float64": [float(x).hex() for x in value.numpy()]}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"float64"}:
        return torch.from_numpy(np.array([float.fromhex(x) for x in value["float64"]], np.float64))
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def _continue(remote: str, root: str, draws: str, saved: dict[str, Any]) -> dict[str, Any]:
    ds = _dataset(remote, root, draws)
    ds.load_state_dict(saved)
    rest = _ids(ds)
    return {"rest_of_round": rest, "state_after": _encode(ds.state_dict(0, True)), "fingerprint": ds.fingerprint()}


def main(root: str) -> None:
    """Write the fixture with the code on PYTHONPATH (see the module docstring)."""
    remote = write_mds(root, 200, 20)
    fixture = {}
    for draws in ("balanced", "iid"):
        ds = _dataset(remote, root, draws)
        rng = np.random.default_rng(1)
        for _ in range(2):
            ds.set_weights(rng.random(200) ** 2)
            _ids(ds)
        ds.set_weights(rng.random(200) ** 2)
        _ids(ds, batches=3)
        saved = ds.state_dict(12, True)
        fixture[draws] = {"saved": _encode(saved), **_continue(remote, root, draws, saved)}
    FIXTURE.write_text(json.dumps(fixture, indent=1) + "\n")


@pytest.mark.parametrize("draws", ["balanced", "iid"])
def test_legacy_state_resumes_bit_for_bit(tmp_path, draws):
    legacy = json.loads(FIXTURE.read_text())[draws]
    remote = write_mds(str(tmp_path), 200, 20)
    got = _continue(remote, str(tmp_path), draws, _decode(legacy["saved"]))
    assert got["rest_of_round"] == legacy["rest_of_round"]
    assert got["state_after"] == legacy["state_after"]
    assert got["fingerprint"] == legacy["fingerprint"]


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, os.path.dirname(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        main(tmp)
