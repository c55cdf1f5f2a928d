"""One rank of the sharded Composer runs of ``tests/test_composer_sharded.py`` (launched by torchrun).

    python -m torch.distributed.run --nproc_per_node 2 _composer_sharded_worker.py OUT EXAMPLES PHASE

PHASE ``first``: the uninterrupted reference run (folder ``OUT/ref``), then the same run in ``OUT/run``
stopped by an exception after batch ``CRASH`` (a checkpoint every 3 batches, one kept).
PHASE ``second`` (a new process group, as after a restart): autoresume from a copy of ``OUT/run`` whose
rank 1 row file was deleted (must fail, nothing loaded), then autoresume from ``OUT/run`` to the end.
PHASE ``screen``: ``IRDRO(screen=True)`` on a sampler primed with low losses for half the samples; each rank writes
``OUT/screen-rank<r>.pt``: per batch the loss Composer backpropagated and the one recomputed from the step's
outputs with the sampler's screen (a collective: both ranks call it in step), and how many were screened.
Every run is primed with a scoring pass's losses (``IRDRO(initial_losses=...)``: a fresh run at FIT_START, a
resumed one by its checkpoint). Each run writes ``OUT/<name>-rank<r>.pt``: the batches this rank trained, the
fingerprint, the model weights, this rank's table rows and whether its first losses are the primed ones.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
OUT, EXAMPLES, PHASE = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path.insert(0, EXAMPLES)
import composer_train as ex  # noqa: E402
from composer.core import Callback, Event  # noqa: E402
from composer.devices import DeviceCPU  # noqa: E402
from composer.utils import dist  # noqa: E402

from irdro_sampler import IndexedDataset  # noqa: E402
from irdro_sampler.integrations.composer import IRDRO, ShardedBatchSampler, batch_sample_indices  # noqa: E402
from irdro_sampler.sharded_sampler import ShardedIRDROSampler  # noqa: E402

STEPS, CRASH = 12, 10  # 100 samples / 2 ranks / 8 = 7 batches per epoch: checkpoints ep0-ba3, ep0-ba6, ep1-ba9
dist.initialize_dist(DeviceCPU())  # the sharded sampler is built on a process group
RANK = dist.get_global_rank()


class Crash(RuntimeError):
    pass


class Record(Callback):
    """The indices this rank trained on, per batch; raises ``Crash`` after batch ``crash_after``."""

    def __init__(self, crash_after: int | None = None) -> None:
        self.seen: list[list[int]] = []
        self.crash_after = crash_after

    def after_dataloader(self, state, logger) -> None:
        self.seen.append(batch_sample_indices(state).tolist())

    def batch_end(self, state, logger) -> None:
        if self.crash_after is not None and int(state.timestamp.batch) == self.crash_after:
            raise Crash(f"interrupted after batch {self.crash_after}")


def scored() -> np.ndarray:
    """A scoring pass's losses (every run is primed with them: ``IRDRO(initial_losses=...)``)."""
    return np.random.default_rng(2).uniform(0.5, 2.5, 100).astype(np.float32)


def make_sampler() -> ShardedIRDROSampler:
    return ShardedIRDROSampler(100, 8, num_shards=8, seed=5, feedback_delay=3, temperature=0.5)


def run(name: str, folder: Path, *, crash_after: int | None = None) -> None:
    data, _, _ = ex.make_classifier_data(num_samples=100, seed=0)
    sampler = make_sampler()
    dl = torch.utils.data.DataLoader(IndexedDataset(data), batch_sampler=ShardedBatchSampler(sampler))
    algo = IRDRO(log_interval=2, check_interval=1, initial_losses=scored())
    model = ex.build_classifier_model(seed=0)
    record = Record(crash_after)
    trainer = ex.build_trainer(model, dl, [algo], steps=STEPS, seed=11, microbatch_size=4, callbacks=[record], save_folder=str(folder),
                               save_interval="3ba", save_num_checkpoints_to_keep=1, autoresume=True, run_name="sharded")
    error = None
    try:
        trainer.fit()
    except (Crash, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    table = sampler.table
    torch.save({"seen": record.seen, "fingerprint": sampler.fingerprint(), "error": error, "epoch": sampler.epoch,
                "fresh_fingerprint": make_sampler().fingerprint(),
                "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "rows": {k: torch.from_numpy(np.array(getattr(table, k))) for k in ("losses", "counts", "last_step")},
                "primed": bool(np.array_equal(table.first_losses, scored()[sampler.start:sampler.stop]))},
               OUT / f"{name}-rank{RANK}.pt")  # fmt: skip
    trainer.close()
    dist.barrier()
    if RANK == 0:  # the folder as the run left it
        torch.save(sorted(p.name for p in folder.iterdir()), OUT / f"{name}-files.pt")


class ScreenCheck(Callback):
    """Before each backward: the loss the screen asks for, recomputed from the step's own outputs."""

    def __init__(self, sampler: ShardedIRDROSampler) -> None:
        self.sampler = sampler
        self.got: list[float] = []
        self.expected: list[float] = []
        self.screened = 0

    def run_event(self, event: Event, state, logger) -> None:
        if event != Event.BEFORE_BACKWARD:
            return
        with torch.no_grad():
            per = torch.nn.functional.cross_entropy(state.outputs, state.batch["labels"], reduction="none").double()
        keep = self.sampler.screen(batch_sample_indices(state).numpy(), per)  # a collective, on both ranks
        self.got.append(float(state.loss.detach()))
        self.expected.append(float((torch.as_tensor(keep.astype(np.float64)) * per).mean()))
        self.screened += int((~keep).sum())


def run_screen() -> None:
    data, _, _ = ex.make_classifier_data(num_samples=100, seed=0)
    sampler = make_sampler()
    dl = torch.utils.data.DataLoader(IndexedDataset(data), batch_sampler=ShardedBatchSampler(sampler))
    primed = np.full(100, np.nan)
    primed[:50] = 0.05 + 0.01 * np.random.default_rng(0).random(50)  # the other half: first visits, far above
    check = ScreenCheck(sampler)
    trainer = ex.build_trainer(ex.build_classifier_model(seed=0), dl, [IRDRO(screen=True, initial_losses=primed)],
                               steps=6, seed=11, microbatch_size=8, callbacks=[check])
    trainer.fit()
    torch.save({"got": check.got, "expected": check.expected, "screened": check.screened},
               OUT / f"screen-rank{RANK}.pt")
    trainer.close()


if PHASE == "screen":
    run_screen()
elif PHASE == "first":
    run("ref", OUT / "ref")
    run("interrupted", OUT / "run", crash_after=CRASH)
else:
    broken = OUT / "broken"
    if RANK == 0:
        shutil.copytree(OUT / "run", broken, symlinks=True)
        (broken / "ep1-ba9-rank0.pt.irdro-shards" / "rows-52-100.pt").unlink()  # rank 1's rows
    dist.barrier()
    run("broken", broken)
    run("resumed", OUT / "run")
