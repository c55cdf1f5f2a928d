"""IRDROCallback with a ShardedIRDROSampler on real Lightning: 2 DDP ranks on CPU (gloo, Lightning's own
launcher; tests/_lightning_sharded_worker.py), checkpoints every 5 steps with ``save_top_k=2``.

* The 2-rank run trains the global batches one ``ShardedIRDROSampler`` on **one** rank draws when driven by
  hand with the same feedback, and ends with its fingerprint; the table's rows are split between the ranks,
  on disk too (one rows folder per kept checkpoint: the folders of rotated-out checkpoints are removed).
* Resume from a mid-epoch checkpoint (copied with its rows folder) trains bitwise the uninterrupted order.
* A checkpoint whose rows folder is missing is a ``ValueError`` naming it, on every rank, nothing trained.

Runs in the `[lightning]` CI lane (.ci/lightning_lane); skipped where lightning is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")


from irdro_sampler.integrations import lightning_sharded  # noqa: E402

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
import _lightning_sharded_worker as worker  # noqa: E402
from _core_helpers import free_port, spawn_gloo  # noqa: E402
from _sharded_by_hand import drive_by_hand  # noqa: E402

sys.path.remove(str(TESTS))

SAMPLES, BATCH, WORLD = 96, 4, 2  # 12 global batches per epoch, 2 epochs: 24 steps, checkpoints at 5 .. 20
RUN = ["--samples", str(SAMPLES), "--batch-size", str(BATCH), "--epochs", "2", "--save-every", "5", "--top-k", "2"]


def _run(out: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(TESTS / "_lightning_sharded_worker.py"), "--out", str(out),
                           "--devices", str(WORLD), *RUN, *args], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _results(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _entry(checkpoint: Path) -> dict:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    (entry,) = [v for v in state["callbacks"].values() if v.get("format") == lightning_sharded.FORMAT]
    return entry


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("full")
    _run(out)
    return out, _results(out)


def _drive_by_hand(rank: int, world: int, port: int, results, steps: list[int], feedback: list) -> None:
    options = dict(dataset_size=SAMPLES, batch_size=BATCH * WORLD // world, num_shards=worker.NUM_SHARDS,
                   seed=worker.SEED, feedback_delay=worker.FEEDBACK_DELAY)
    drive_by_hand(rank, world, port, results, steps, feedback, options)


def test_two_ranks_draw_what_one_sharded_sampler_draws_by_hand_and_split_the_rows(full_run):
    out, ranks = full_run
    by_rank = [{m["step"]: m["idx"] for m in r["record"]} for r in ranks]
    assert sorted(by_rank[0]) == sorted(by_rank[1]) == list(range(24))
    trained = {s: by_rank[0][s] + by_rank[1][s] for s in range(24)}  # the ranks' slices in rank order
    for r in ranks:
        assert r["type"] == "ShardedIRDROSampler"
        assert all(m["fed"] == m["idx"] for m in r["record"])
    assert ranks[0]["feedback"] == ranks[1]["feedback"]
    feedback = ranks[0]["feedback"]
    assert [f[0] for f in feedback] == list(range(24)) and all(f[1] == trained[f[0]] for f in feedback)
    assert ranks[0]["stats"]["kl_to_uniform"] > 0.01
    (by_hand,) = spawn_gloo(_drive_by_hand, 1, list(range(24)), feedback)
    assert {int(k): v for k, v in by_hand["drawn"].items()} == trained
    assert by_hand["fingerprint"] == ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    assert [r["rows"] for r in ranks] == [[0, 48], [48, 96]] and [r["table_rows"] for r in ranks] == [48, 48]
    # save_top_k=2 kept the checkpoints of steps 15 and 20; the rows folders of 5 and 10 went with theirs.
    ckpt = out / "ckpt"
    files = sorted(ckpt.glob("*.ckpt"))
    assert [f.name for f in files] == ["epoch=1-step=15.ckpt", "epoch=1-step=20.ckpt"]
    folders = sorted((ckpt / lightning_sharded.SHARDS_FOLDER).iterdir())
    assert sorted(ckpt / _entry(f)["folder"] for f in files) == folders
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["common.pt", "rows-0-48.pt", "rows-48-96.pt", "trainer.pt"]


def test_resume_from_mid_epoch_checkpoint_is_bitwise(full_run, tmp_path):
    out, full = full_run
    src = out / "ckpt" / "epoch=1-step=15.ckpt"
    folder = _entry(src)["folder"]
    (tmp_path / "copy").mkdir()
    shutil.copy(src, tmp_path / "copy" / src.name)
    shutil.copytree(out / "ckpt" / folder, tmp_path / "copy" / folder)
    _run(tmp_path / "b", "--resume", str(tmp_path / "copy" / src.name))
    resumed = _results(tmp_path / "b")
    first = 15  # global step 15: epoch 1, batch 3
    for a, b in zip(full, resumed, strict=True):
        ra = {m["step"]: m["idx"] for m in a["record"]}
        rb = {m["step"]: m["idx"] for m in b["record"]}
        assert min(rb) == first and rb == {s: ra[s] for s in ra if s >= first}
        assert a["fingerprint"] == b["fingerprint"]
        assert a["stats"] == b["stats"]
        assert b["feedback"] == [f for f in a["feedback"] if f[0] >= first]


def test_missing_rows_folder_is_a_clear_error(full_run, tmp_path):
    out, _ = full_run
    src = out / "ckpt" / "epoch=1-step=15.ckpt"
    folder = _entry(src)["folder"]
    shutil.copy(src, tmp_path / src.name)  # without its rows folder
    original = out / "ckpt" / folder
    hidden = original.with_name(original.name + ".hidden")
    original.rename(hidden)  # the absolute path recorded in the checkpoint is gone too
    try:
        proc = _run(tmp_path / "b", "--resume", str(tmp_path / src.name), ok=False)
    finally:
        hidden.rename(original)
    assert proc.returncode != 0
    missing = f"ValueError: IRDROCallback: {tmp_path / folder} is missing"
    assert missing in proc.stderr, proc.stderr[-4000:]
    assert not list((tmp_path / "b").glob("rank*.json"))
