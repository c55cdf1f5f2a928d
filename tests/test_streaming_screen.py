"""``IRDRO(screen=True)`` on the streaming path: the real Composer Trainer over a ``WeightedStreamingDataset`` of MDS
shards written here. The table is primed with low losses for the even ids and none for the odd ones, so the first
round's cut lies far below the untrained model's loss (about log 4) and the odd ids' first visits are screened:
each step's loss is the mean of ``keep_i * l_i`` as ``RoundFeedback.screen`` says, recomputed from the step's own
outputs, and what is screened is exactly the first visits of odd ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("streaming")
pytest.importorskip("composer")
from _streaming_composer_model import Tiny, per_sample_loss  # noqa: E402
from _streaming_data import fresh_local, write_mds  # noqa: E402
from composer import Callback, Trainer  # noqa: E402
from composer.core import Event  # noqa: E402
from composer.loggers import InMemoryLogger  # noqa: E402

from irdro_sampler.integrations.composer import IRDRO, batch_sample_indices  # noqa: E402
from irdro_sampler.integrations.streaming import WeightedStreamingDataset  # noqa: E402

N, BATCH, ROUND, STEPS = 2000, 10, 200, 40  # two rounds


class ScreenCheck(Callback):
    """Before each backward: the loss the screen asks for, from the step's outputs and the target's screen."""

    def __init__(self, algo: IRDRO) -> None:
        self.algo = algo
        self.block_only = algo.screen == "block"
        self.idx: np.ndarray | None = None
        self.got: list[float] = []
        self.expected: list[float] = []
        self.screened: list[int] = []
        self.first_odd: list[int] = []
        self.visited: set[int] = set()

    def run_event(self, event: Event, state, logger) -> None:
        if event == Event.AFTER_DATALOADER:
            self.idx = batch_sample_indices(state).numpy().copy()
        if event == Event.BEFORE_BACKWARD:
            with torch.no_grad():
                per = per_sample_loss(state.outputs, state.batch).double()
            keep = self.algo.target.screen(self.idx, per, block_only=self.block_only)
            self.got.append(float(state.loss.detach()))
            self.expected.append(float((torch.as_tensor(keep.astype(np.float64)) * per).mean()))
            self.screened.extend(int(i) for i in self.idx[~keep])
            # Odd ids the table has no loss of yet (feedback of this run reaches it at the batch's end).
            self.first_odd.extend(int(i) for i in self.idx if i % 2 and int(i) not in self.visited)
            if len(self.got) == ROUND // BATCH:  # the first round's last step
                self.first_round = (len(self.screened), len(self.first_odd))
            self.visited.update(int(i) for i in self.idx)


@pytest.mark.parametrize("screen", [True, "block"])
def test_streaming_path_screens_first_visits_the_rounds_cut_would_take(tmp_path, screen):
    """With ``screen="block"`` a tenth of the ids (even ones) are primed at 0.5 instead: a block of unlearnable
    samples in the table, whose valley the untrained model's first visits (about log 4) lie above."""
    remote = write_mds(str(tmp_path), N, 500)
    ds = WeightedStreamingDataset(round_size=ROUND, remote=remote, local=fresh_local(str(tmp_path)),
                                  batch_size=BATCH, shuffle=True, seed=1)
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH)
    primed = np.full(N, np.nan)
    primed[::2] = 0.05 + 0.01 * np.random.default_rng(0).random(N // 2)
    if screen == "block":
        primed[::10] = 0.5 + 0.001 * np.random.default_rng(1).random(N // 10)
    algo = IRDRO(screen=screen, initial_losses=primed, loss_fn=per_sample_loss, log_interval=1)
    check = ScreenCheck(algo)
    logger = InMemoryLogger()
    model = Tiny()
    trainer = Trainer(model=model, train_dataloader=dl, max_duration=f"{STEPS}ba", algorithms=[algo],
                      callbacks=[check], loggers=[logger], optimizers=torch.optim.SGD(model.parameters(), lr=0.5),
                      device="cpu", seed=3, progress_bar=False, log_to_console=False)
    trainer.fit()
    trainer.close()
    assert len(check.got) == STEPS
    np.testing.assert_allclose(check.got, check.expected, rtol=1e-5)
    # What is screened is first visits of odd ids (never an even, primed one, never a revisit), and most of them.
    assert check.screened and all(i % 2 for i in check.screened)
    assert set(check.screened) <= set(check.first_odd)
    if screen is True:
        assert len(check.screened) >= 0.8 * len(check.first_odd)
    else:  # the first round's table holds the block; the second's (the run's own losses) none, so none is screened
        screened, first_odd = check.first_round
        assert screened >= 0.8 * first_odd and len(check.screened) == screened
    fractions = [v for _, v in logger.data["irdro/screened_fraction"]]
    assert np.isclose(float(np.mean(fractions)) * STEPS * BATCH, len(check.screened))

