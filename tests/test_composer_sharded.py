"""A Composer run on 2 gloo ranks with the loss table sharded (``ShardedIRDROSampler``), interrupted and
autoresumed, is bitwise equal to the uninterrupted run (every run primed with a scoring pass's losses, a resumed
one from its checkpoint, not again): the same batches drawn on every rank, the same
fingerprint, the same model weights and table rows. Each checkpoint's per-rank rows live in its sidecar
folder (``<checkpoint>.irdro-shards``), removed with the checkpoint when Composer rotates it; a missing
rank file on resume is a ``ValueError`` naming the file, with nothing loaded.

The ranks run ``tests/_composer_sharded_worker.py`` under torchrun (as ``test_composer_multirank.py``):
one launch for the reference run and the interrupted one, a second (a new process group, as after a
restart) for the two resumptions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _core_helpers import free_port

pytest.importorskip("composer")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_composer_sharded_worker.py"
STEPS, CRASH, RESUMED_FROM = 12, 10, 9


def _launch(out: Path, phase: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NODE_RANK="0")  # Composer reads NODE_RANK (torchrun sets GROUP_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(out),
           str(ROOT / "examples"), phase]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _load(out: Path, name: str) -> list[dict]:
    return [torch.load(out / f"{name}-rank{r}.pt", weights_only=True) for r in range(2)]


def _bitwise(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes(), f"{what} {k}"


def _files(out: Path, name: str) -> list[str]:
    return torch.load(out / f"{name}-files.pt", weights_only=True)


SIDECAR = ".irdro-shards"


@pytest.mark.slow
def test_sharded_run_interrupted_and_autoresumed_is_bitwise_equal(tmp_path):
    _launch(tmp_path, "first")
    ref, interrupted = _load(tmp_path, "ref"), _load(tmp_path, "interrupted")
    for r in range(2):
        assert ref[r]["error"] is None and len(ref[r]["seen"]) == STEPS
        assert interrupted[r]["error"] == f"Crash: interrupted after batch {CRASH}"
        assert interrupted[r]["seen"] == ref[r]["seen"][:CRASH]
        assert ref[r]["primed"] and interrupted[r]["primed"]  # IRDRO(initial_losses=...) reached each rank's rows
    # Each rank trains its slice of the same global batches (the last batch of an epoch is short).
    assert [len(s) for s in ref[0]["seen"]] == [8] * 6 + [2] + [8] * 5
    assert [len(s) for s in ref[1]["seen"]] == [len(s) for s in ref[0]["seen"]]
    assert ref[0]["fingerprint"] == ref[1]["fingerprint"] != ref[0]["fresh_fingerprint"]
    # One checkpoint kept: the sidecars of the rotated ones went with them (at the next batch, or FIT_END).
    assert _files(tmp_path, "ref") == ["ep1-ba12-rank0.pt", f"ep1-ba12-rank0.pt{SIDECAR}", "latest-rank0.pt"]
    assert _files(tmp_path, "interrupted") == ["ep1-ba9-rank0.pt", f"ep1-ba9-rank0.pt{SIDECAR}", "latest-rank0.pt"]
    sidecar = tmp_path / "run" / f"ep1-ba9-rank0.pt{SIDECAR}"
    assert sorted(p.name for p in sidecar.iterdir()) == ["common.pt", "rows-0-52.pt", "rows-52-100.pt"]

    _launch(tmp_path, "second")
    broken, resumed = _load(tmp_path, "broken"), _load(tmp_path, "resumed")
    missing = tmp_path / "broken" / f"ep1-ba9-rank0.pt{SIDECAR}" / "rows-52-100.pt"
    for r in range(2):
        # A missing rank file: a ValueError naming it on every rank; nothing trained, nothing loaded.
        assert broken[r]["error"].startswith(f"ValueError: IRDRO: {missing} is missing"), broken[r]["error"]
        assert broken[r]["seen"] == []
        assert broken[r]["fingerprint"] == broken[r]["fresh_fingerprint"]
        assert int(broken[r]["rows"]["counts"].sum()) == 0
        # Resumed from ep1-ba9: the batches of the uninterrupted run from there on, on every rank, and
        # bitwise the same table rows, model weights and fingerprint at the end.
        assert resumed[r]["error"] is None and resumed[r]["primed"] and not broken[r]["primed"]
        assert resumed[r]["seen"] == ref[r]["seen"][RESUMED_FROM:]
        assert resumed[r]["fingerprint"] == ref[r]["fingerprint"]
        assert resumed[r]["epoch"] == ref[r]["epoch"] == 1
        _bitwise(resumed[r]["rows"], ref[r]["rows"], f"rank {r} table rows")
        _bitwise(resumed[r]["weights"], ref[r]["weights"], f"rank {r} weights")
    assert [resumed[r]["rows"]["losses"].shape[0] for r in range(2)] == [52, 48]  # each rank its own shards
    # The resumed run keeps the checkpoint it resumed from (Composer rotates only its own saves).
    assert _files(tmp_path, "resumed") == ["ep1-ba12-rank0.pt", f"ep1-ba12-rank0.pt{SIDECAR}", "ep1-ba9-rank0.pt",
                                           f"ep1-ba9-rank0.pt{SIDECAR}", "latest-rank0.pt"]


@pytest.mark.slow
def test_sharded_table_screens_first_visits(tmp_path):
    """``IRDRO(screen=True)`` with a ``ShardedIRDROSampler`` on 2 ranks: each rank's loss leaves out the first
    visits the owners' rows say the cut would take, as the sampler's screen recomputes it from the outputs."""
    _launch(tmp_path, "screen")
    for r in range(2):
        out = torch.load(tmp_path / f"screen-rank{r}.pt", weights_only=True)
        assert len(out["got"]) == 6 and 0 < out["screened"] < 6 * 8
        assert out["got"] == pytest.approx(out["expected"], rel=1e-5)
