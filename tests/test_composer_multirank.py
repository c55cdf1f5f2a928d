"""Two ranks (gloo on 127.0.0.1, launched with torchrun, which Composer's Trainer picks up from the
environment like its own `composer -n 2` launcher): every rank's sampler gets identical updates in
identical order, so both sampler states are identical after training.

(torchrun rather than `composer -n 2`: the Composer launcher alone spends ~10-25 s importing Composer on
this shared 2-core machine; the training processes are the same.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _core_helpers import free_port

pytest.importorskip("composer")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    import composer_train as ex
    from composer.utils import dist

    from irdro_sampler.integrations.composer import IRDRO, batch_sample_indices, gather_feedback

    out = Path(sys.argv[1])
    steps = 10
    # 100 samples over 2 ranks = 50 per rank = 7 batches of 8 per epoch, the last one of 2 per rank.
    data, _, _ = ex.make_classifier_data(num_samples=100, seed=0)
    dl = ex.build_dataloader(data, "irdro", 8, seed=5, sampler_kwargs={"feedback_delay": 3, "temperature": 0.5})
    assert dl.sampler.num_replicas == 2, dl.sampler.num_replicas
    algo = IRDRO(log_interval=2)
    model = ex.build_classifier_model(seed=0)
    seen = []

    from composer.core import Callback

    class Seen(Callback):
        def after_dataloader(self, state, logger):
            seen.append(batch_sample_indices(state).tolist())

    trainer = ex.build_trainer(model, dl, [algo], steps=steps, seed=11, microbatch_size=3, callbacks=[Seen()])
    trainer.fit()
    rank = dist.get_global_rank()
    # Variable-length gather: rank 0 sends 3 pairs, rank 1 sends 5.
    n = 3 + 2 * rank
    idx, loss = gather_feedback(torch.arange(n) + 100 * rank, torch.linspace(0, 1, n) + rank)
    torch.save(
        {
            "sampler": algo.sampler.state_dict(),
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "gather": (idx, loss),
            "seen": seen,
        },
        out / f"rank{rank}.pt",
    )
    trainer.close()
    """
)


def _same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes(), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


@pytest.mark.slow
def test_two_ranks_end_with_identical_sampler_states(tmp_path):
    script = tmp_path / "train_2ranks.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path), str(ROOT / "examples"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # Each rank trained its own disjoint share of the same global batches.
    for a, b in zip(r0["seen"], r1["seen"], strict=True):
        assert len(a) == len(b)
    assert [len(a) for a in r0["seen"]] == [8, 8, 8, 8, 8, 8, 2, 8, 8, 8]
    # Identical sampler states (tensors bitwise), including the buffered and applied feedback.
    _same(r0["sampler"], r1["sampler"])
    pending = r0["sampler"]["pending"]
    table_updates = int((r0["sampler"]["table"]["last_step"] >= 0).sum())
    assert pending["keys"][:, 0].tolist() == list(range(10 - pending["keys"].shape[0], 10))
    assert table_updates > 0  # feedback_delay 3: early feedback has been applied to the table
    # Feedback of the last (still buffered) batch holds both ranks' samples, in rank order.
    last = pending["indices"][pending["offsets"][-2] : pending["offsets"][-1]].tolist()
    assert last == r0["seen"][-1] + r1["seen"][-1]
    assert r0["sampler"]["counters"]["late_feedback"] == 0
    # DDP kept the models equal too.
    _same(r0["weights"], r1["weights"])
    # Variable-length all-gather, in rank order, bit-exact.
    for r in (r0, r1):
        idx, loss = r["gather"]
        assert idx.tolist() == [0, 1, 2, 100, 101, 102, 103, 104]
        expected = torch.cat([torch.linspace(0, 1, 3), torch.linspace(0, 1, 5) + 1])
        assert loss.numpy().tobytes() == expected.numpy().tobytes()
