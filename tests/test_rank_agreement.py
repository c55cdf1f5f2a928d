"""Issue 12, item 4: diverging ranks are caught. Two gloo ranks (torchrun on 127.0.0.1, as in
test_composer_multirank.py) run a real Composer Trainer with the IRDRO algorithm:

* samplers built with different temperatures: IRDRO raises at FIT_START, naming both ranks;
* samplers that agree until rank 1's temperature changes after batch 3: raised at the next check,
  batch 4 (check_interval=2), not before;
* ranks that agree train to the end (test_composer_multirank.py covers that too, with checks on);
* the same three cases on the streaming path (WeightedStreamingDataset + IRDRO), where the fingerprint
  digests the loss table, the rule and the round weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _core_helpers import free_port

pytest.importorskip("composer")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    import composer_train as ex
    from composer.core import Callback
    from composer.utils import dist

    from irdro_sampler import DROWeighting
    from irdro_sampler.integrations.composer import IRDRO

    out = Path(sys.argv[1])
    data, _, _ = ex.make_classifier_data(num_samples=96, seed=0)


    class Diverge(Callback):
        # After batch `at`, rank 1 alone switches its sampler to another temperature.
        def __init__(self, sampler, at):
            self.sampler, self.at, self.batches = sampler, at, []

        def batch_end(self, state, logger):
            self.batches.append(int(state.timestamp.batch))
            if int(state.timestamp.batch) == self.at and dist.get_global_rank() == 1:
                self.sampler.rule = DROWeighting(temperature=3.0)


    def attempt(temperature, diverge_at, steps=8):
        dl = ex.build_dataloader(data, "irdro", 8, seed=5, sampler_kwargs={"feedback_delay": 2, "temperature": temperature})
        cb = Diverge(dl.sampler, diverge_at)
        trainer = ex.build_trainer(ex.build_classifier_model(seed=0), dl, [IRDRO(log_interval=0, check_interval=2)],
                                   steps=steps, seed=11, callbacks=[cb])
        try:
            trainer.fit()
            error = None
        except RuntimeError as e:
            error = str(e)
        finally:
            trainer.close()
        return {"error": error, "batches": cb.batches, "fingerprint": dl.sampler.fingerprint()}


    rank = dist.get_global_rank()
    results = {
        "start": attempt(0.5 + 0.2 * rank, diverge_at=None),
        "mid": attempt(0.5, diverge_at=3),
        "agree": attempt(0.5, diverge_at=None),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    """
)


@pytest.mark.slow
def test_diverging_ranks_raise_within_check_interval(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path), str(ROOT / "examples"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        # Different temperatures: caught before the first batch, on every rank, naming both.
        start = r["start"]
        assert start["batches"] == []
        assert "FIT_START" in start["error"] and "ranks [0]" in start["error"] and "ranks [1]" in start["error"]
        # Diverged after batch 3 (not caught by the check at batch 2): caught at the next check, batch 4,
        # every rank raising together (Composer runs the algorithm's BATCH_END before the callback's).
        mid = r["mid"]
        assert mid["batches"] == [1, 2, 3], mid
        assert "batch 4" in mid["error"] and "ranks [0]" in mid["error"] and "ranks [1]" in mid["error"]
        # Agreeing ranks train to the end without an error.
        assert r["agree"]["error"] is None and r["agree"]["batches"] == list(range(1, 9))
    assert ranks[0]["start"]["fingerprint"] != ranks[1]["start"]["fingerprint"]
    assert ranks[0]["agree"]["fingerprint"] == ranks[1]["agree"]["fingerprint"]


def test_irdro_rejects_bad_states_before_stashing_them():
    import copy

    import torch

    from irdro_sampler import IRDROSampler, LossTable
    from irdro_sampler.integrations.composer import IRDRO

    s = IRDROSampler(50, 5, feedback_delay=1)
    s.update([1, 2], [0.5, 1.0], step=0)
    s.flush()
    algo = IRDRO()
    good = {"sampler": s.state_dict(), "version": 1}
    algo.load_state_dict(good)
    stashed = algo._pending_state
    bad_sampler = copy.deepcopy(good)
    bad_sampler["sampler"]["seed"] = -1
    bad_table = {"table": {**LossTable(5).state_dict(), "counts": torch.full((5,), -1)}}
    for bad in (bad_sampler, bad_table, {"rule": {"temperature": 0.0}}, {"rule": "hot"}):
        with pytest.raises(ValueError):
            algo.load_state_dict(bad)
        assert algo._pending_state is stashed
    with pytest.raises(ValueError, match="check_interval"):
        IRDRO(check_interval=-1)
    assert IRDRO(log_interval=7).check_interval == 7 and IRDRO(check_interval=0).check_interval == 0


def test_streaming_fingerprint_follows_table_and_weights():
    from irdro_sampler import LossTable
    from irdro_sampler.integrations.composer import IRDRO

    class Stream:  # what IRDRO sees of a weighted streaming dataset for its fingerprint
        def __init__(self, fp: int) -> None:
            self.fp = fp

        def fingerprint(self) -> int:
            return self.fp

    a, b = IRDRO(temperature=0.5), IRDRO(temperature=0.5)
    for algo in (a, b):
        algo.table, algo.dataset = LossTable(20), Stream(1)
    assert a.fingerprint() == b.fingerprint()
    b.table.update([3], [1.0])
    assert a.fingerprint() != b.fingerprint()
    a.table.update([3], [1.0])
    assert a.fingerprint() == b.fingerprint()
    b.dataset = Stream(2)
    assert a.fingerprint() != b.fingerprint()
    c = IRDRO(temperature=0.6)
    c.table, c.dataset = a.table, a.dataset
    assert c.fingerprint() != a.fingerprint()
    assert IRDRO().fingerprint() is None


STREAM_SCRIPT = textwrap.dedent(
    """
    import json
    import os
    import sys
    from pathlib import Path

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from composer import Trainer
    from composer.core import Callback
    from composer.devices import DeviceCPU
    from composer.models import ComposerModel
    from composer.utils import dist

    from irdro_sampler.integrations.composer import IRDRO
    from irdro_sampler.integrations.streaming import WeightedStreamingDataset

    root = Path(sys.argv[1])
    dist.initialize_dist(DeviceCPU())
    rank = dist.get_global_rank()


    class Tiny(ComposerModel):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(64, 4)

        def forward(self, batch):
            return self.emb(batch["x"] % 64)

        def loss(self, outputs, batch, *args, **kwargs):
            return F.cross_entropy(outputs, batch["x"] % 4)


    class Diverge(Callback):
        # After batch `at`, rank 1 alone records an extra loss in its table.
        def __init__(self, algo, at):
            self.algo, self.at, self.batches = algo, at, []

        def batch_end(self, state, logger):
            self.batches.append(int(state.timestamp.batch))
            if int(state.timestamp.batch) == self.at and rank == 1:
                self.algo.table.update([0], [123.0], step=999)


    def attempt(name, temperature, diverge_at):
        ds = WeightedStreamingDataset(round_size=80, remote=str(root / "remote"), local=str(root / f"local-{name}"),
                                      batch_size=8, shuffle=True, shuffle_block_size=100, seed=1)
        dl = torch.utils.data.DataLoader(ds, batch_size=8)
        algo = IRDRO(temperature=temperature, loss_fn=lambda out, batch: F.cross_entropy(out, batch["x"] % 4, reduction="none"),
                     log_interval=0, check_interval=2)
        cb = Diverge(algo, diverge_at)
        model = Tiny()
        trainer = Trainer(model=model, train_dataloader=dl, max_duration="8ba", algorithms=[algo], callbacks=[cb],
                          optimizers=torch.optim.SGD(model.parameters(), lr=0.1), device="cpu", seed=3,
                          progress_bar=False, log_to_console=False)
        try:
            trainer.fit()
            error = None
        except RuntimeError as e:
            error = str(e)
        finally:
            trainer.close()
        return {"error": error, "batches": cb.batches}


    results = {
        "start": attempt("start", 0.5 + 0.2 * rank, None),
        "mid": attempt("mid", 0.5, 3),
        "agree": attempt("agree", 0.5, None),
    }
    (root / f"rank{rank}.json").write_text(json.dumps(results))
    """
)


@pytest.mark.slow
def test_streaming_ranks_that_diverge_raise(tmp_path):
    pytest.importorskip("streaming")
    from _streaming_data import write_mds
    # No sweep of streaming's stale shared memory: it deletes the blocks of streaming datasets alive in other
    # processes (tests/test_streaming_compat.py guards against it); the fresh tmp_path is enough.
    write_mds(str(tmp_path), 400, 50)
    script = tmp_path / "stream_ranks.py"
    script.write_text(STREAM_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    for r in (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)):
        assert r["start"]["batches"] == [] and "FIT_START" in r["start"]["error"]
        assert "loss table / stream weights" in r["start"]["error"] and "ranks [1]" in r["start"]["error"]
        assert r["mid"]["batches"] == [1, 2, 3] and "batch 4" in r["mid"]["error"], r["mid"]
        assert r["agree"]["error"] is None and r["agree"]["batches"] == list(range(1, 9))
