"""ShardedIRDROSampler saved one file per rank on 4 gloo ranks resumes on 2, 4 and 8 ranks with the same
global batches; bad or missing files are refused on every rank, naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _core_helpers import gloo_group, loss_of, spawn_gloo, train_sharded_steps

from irdro_sampler.sharded_sampler import ShardedIRDROSampler

N, GLOBAL_BATCH, SHARDS, SAVE_AT, END = 2048, 32, 16, 40, 90
OPTS = dict(seed=8, feedback_delay=3, refresh_interval=7, truncate_zscore=2.5)


def _loss(ids: np.ndarray, step: int) -> np.ndarray:
    return loss_of(ids, step) * np.where(ids % 89 == 0, 9.0, 1.0)


def _as_version_1(folder: str, to: Path) -> str:
    """A copy of ``folder`` in the format before draw schemes (version 1: no ``draws`` fields), its row files
    in the table layout of then."""
    to.mkdir()
    for path in Path(folder).iterdir():
        state = torch.load(path, weights_only=True)
        if path.name == "common.pt":
            assert state.pop("draws") == "iid" and state.pop("draw_state") is None
            state["version"] = 1
        else:
            assert state.pop("draws") is None
            # The table as LossTable.state_dict wrote it then: int64 counts, 0.0 for unseen losses.
            table = state["table"]
            assert table["counts"].dtype == torch.uint32 and table["losses"].isnan().any()
            table["counts"] = table["counts"].to(torch.int64)
            table["losses"] = torch.nan_to_num(table["losses"], nan=0.0)
        torch.save(state, to / path.name)
    return str(to)


def _steps(s: ShardedIRDROSampler, first: int, last: int) -> list[np.ndarray]:
    return train_sharded_steps(s, first, last, _loss)


def _reference(rank: int, world: int, port: int, results, folder: str) -> None:
    with gloo_group(rank, world, port):
        s = ShardedIRDROSampler(N, GLOBAL_BATCH // world, num_shards=SHARDS, **OPTS)
        before = _steps(s, 0, SAVE_AT + 1)
        s.save(folder)
        counters = _counters(s)
        results[rank] = (before, _steps(s, SAVE_AT + 1, END), s.fingerprint(), counters)


def _resume(rank: int, world: int, port: int, results, folder: str, bads: tuple[str, ...]) -> None:
    """Load ``folder`` into a sampler made wrong in each of ``bads`` ways ("" = right) in turn."""
    with gloo_group(rank, world, port):
        results[rank] = {bad: _load_and_continue(world, folder, bad) for bad in bads}


def _load_and_continue(world: int, folder: str, bad: str) -> tuple:
    opts = dict(OPTS, seed=9) if bad == "seed" else OPTS
    n = N + 1 if bad == "dataset_size" else N
    shards = SHARDS * 2 if bad == "num_shards" else SHARDS
    s = ShardedIRDROSampler(n, GLOBAL_BATCH // world, num_shards=shards, **opts)
    try:
        s.load(str(Path(folder).parent / "version_1") if bad == "version_1" else folder)
    except ValueError as e:
        return ("error", str(e))
    counters = _counters(s)
    return ("ok", _steps(s, SAVE_AT + 1, END), s.fingerprint(), counters)


def _counters(s: ShardedIRDROSampler) -> dict[str, float]:
    """The event counters of stats() (a collective)."""
    stats = s.stats()
    return {k: stats[k] for k in ("refreshes", "rebases", "stale_replays", "remeasured_cut", "readmitted")}


@pytest.mark.slow
def test_saved_on_4_ranks_resumes_on_2_4_and_8(tmp_path: Path):
    folder = str(tmp_path / "state")
    ref = spawn_gloo(_reference, 4, folder)
    assert len({r[2] for r in ref}) == 1
    assert ref[0][3]["refreshes"] > 0 and ref[0][3]["remeasured_cut"] > 0, ref[0][3]  # the counters moved
    files = sorted(p.name for p in Path(folder).iterdir())
    assert files == ["common.pt", "rows-0-512.pt", "rows-1024-1536.pt", "rows-1536-2048.pt", "rows-512-1024.pt"]
    legacy = _as_version_1(folder, tmp_path / "version_1")  # today's files still load (on 2 ranks)
    for world in (2, 4, 8):
        for rank, per in enumerate(spawn_gloo(_resume, world, folder, ("", "version_1") if world == 2 else ("",))):
            status, after, fp, counters = per[""]
            assert status == "ok"
            assert all(np.array_equal(a, b) for a, b in zip(after, ref[0][1], strict=True)), f"world {world} rank {rank}"
            assert fp == ref[0][2]
            assert counters == ref[0][3], f"world {world}: the event counters did not continue"
            if world == 2:
                legacy_status, legacy_after, legacy_fp, _ = per["version_1"]
                assert legacy_status == "ok" and legacy_fp == fp, f"rank {rank}: a version-1 copy continues otherwise"
                assert all(np.array_equal(a, b) for a, b in zip(legacy_after, after, strict=True)), f"rank {rank}"
    assert Path(legacy).is_dir()
    # Bad input, refused on every rank with the file and the field named.
    out = spawn_gloo(_resume, 2, folder, ("seed", "num_shards", "dataset_size"))
    for field, saved, mine in (("seed", 8, 9), ("num_shards", SHARDS, 2 * SHARDS), ("dataset_size", N, N + 1)):
        message = f"common.pt: {field} is {saved} but this sampler has {field}={mine}"
        assert all(r[field][0] == "error" and message in r[field][1] for r in out), (field, out)
    # (An i.i.d. state refused by a balanced sampler: tests/test_sharded_sampler_balanced.py.)
    Path(folder, "rows-512-1024.pt").unlink()
    out = [r[""] for r in spawn_gloo(_resume, 2, folder, ("",))]
    assert all(r[0] == "error" for r in out)
    assert "rows-512-1024.pt: missing" in out[0][1]  # rank 0 of 2 owns ids [0, 1024): it needed the file
    assert "another rank could not load" in out[1][1]
