"""The Composer snippets of README.md and docs/composer.md, run verbatim with stock Composer models.

The snippets leave the user's data and model to the reader (``my_dataset`` / ``ds``, ``model``); here they
are ``(x, y)`` tensors and a stock ``ComposerClassifier``, which unpacks ``inputs, targets = batch`` and so
fails with "too many values to unpack" if the index reaches it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("composer")
from composer import Callback, Event  # noqa: E402
from composer.models import ComposerClassifier, HuggingFaceModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path, must_contain: str) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    found = [b for b in blocks if must_contain in b]
    assert found, f"{path.name}: no python block with {must_contain!r}"
    return found


class SeenByModel(Callback):
    """What the model receives: the batch at BEFORE_FORWARD (after every algorithm ran)."""

    def __init__(self) -> None:
        self.batches: list = []

    def run_event(self, event, state, logger) -> None:
        if event == Event.BEFORE_FORWARD:
            self.batches.append(state.batch)


def xy_data(n: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return [(x[i], int(y[i])) for i in range(n)]


def stock_classifier() -> ComposerClassifier:
    torch.manual_seed(0)
    return ComposerClassifier(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)),
                              num_classes=4)


@pytest.mark.slow
@pytest.mark.parametrize(("doc", "marker"), [("README.md", "IRDRO()"), ("docs/composer.md", "IRDRO()")])
def test_composer_snippet_runs_verbatim_with_a_stock_classifier(doc, marker):
    (code,) = python_blocks(ROOT / doc, marker)
    data = xy_data()
    model = stock_classifier()
    namespace = {"my_dataset": data, "ds": data, "model": model}
    seen = SeenByModel()
    # The snippet builds its Trainer itself; record what the model is given by adding a callback to it.
    code = code.replace("algorithms=[IRDRO()]", "algorithms=[IRDRO()], callbacks=[seen]")
    namespace["seen"] = seen
    exec(compile(code, f"{doc} snippet", "exec"), namespace)  # noqa: S102 - the documented code, verbatim
    trainer = namespace["trainer"]
    if "trainer.fit()" not in code:
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 20  # 10 epochs of 64 / 32
    assert seen.batches and all(isinstance(b, (tuple, list)) and len(b) == 2 for b in seen.batches)
    sampler = namespace["sampler"]
    sampler.flush()  # feedback waits feedback_delay (32) batches before it is applied; apply it now
    assert sampler.table.num_seen == len(data)  # every sample was trained and its loss came back
    trainer.close()


def test_stock_huggingface_model_never_sees_the_index():
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import DataLoader

    from irdro_sampler import IndexedDataset, IRDROSampler
    from irdro_sampler.integrations.composer import IRDRO, batch_sample_indices

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (32, 12), generator=g)
    data = IndexedDataset([{"input_ids": ids[i], "labels": ids[i]} for i in range(32)])
    sampler = IRDROSampler(data, batch_size=8)
    loader = DataLoader(data, batch_size=8, sampler=sampler)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=12, n_embd=16, n_layer=1, n_head=2)
    model = HuggingFaceModel(transformers.GPT2LMHeadModel(config), use_logits=True)
    seen = SeenByModel()
    recorded = []

    class Indices(Callback):
        def after_dataloader(self, state, logger) -> None:
            recorded.append(batch_sample_indices(state).tolist())

    from composer import Trainer

    trainer = Trainer(model=model, train_dataloader=loader, max_duration="4ba", algorithms=[IRDRO()],
                      callbacks=[seen, Indices()], device="cpu", progress_bar=False, log_to_console=False)
    trainer.fit()
    assert len(seen.batches) == 4 and all("sample_idx" not in b for b in seen.batches)
    assert all(set(b) == {"input_ids", "labels"} for b in seen.batches)
    assert [len(r) for r in recorded] == [8, 8, 8, 8]
    sampler.flush()
    assert sampler.table.num_seen == len({i for r in recorded for i in r})
    trainer.close()


def test_readme_plain_pytorch_snippet_runs_verbatim(tmp_path, monkeypatch):
    """The README's first snippet (IRDROBatchSampler in a plain loop, then save_state) runs as written."""
    (code,) = python_blocks(ROOT / "README.md", "sampler.update(idx, per_sample.detach(), step=step)")
    data = xy_data(n=256)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    namespace = {"my_dataset": data, "labels": [y for _, y in data], "model": model, "epochs": 2,
                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    monkeypatch.chdir(tmp_path)  # the snippet saves "sampler.pt" in the working directory
    exec(compile(code, "README.md plain snippet", "exec"), namespace)  # noqa: S102 - the documented code, verbatim
    sampler = namespace["sampler"]
    assert namespace["step"] == 4  # 2 epochs of 256 / 128
    state = torch.load(tmp_path / "sampler.pt", weights_only=True)
    sampler.flush()
    assert sampler.table.num_seen > 0 and state["dataset_size"] == 256


def test_readme_screen_snippet_runs_verbatim():
    """The README's screen snippet, as written: the gradient is that of the batch's mean with the screened first
    visits weighing 0, and every loss is reported."""
    from irdro_sampler import IRDROSampler

    (code,) = python_blocks(ROOT / "README.md", "sampler.screen(idx, losses)")
    n = 400
    sampler = IRDROSampler(n, 8, seed=0)
    seen = np.arange(200)
    sampler.prime(seen, np.exp(0.3 * np.random.default_rng(0).standard_normal(200)))
    sampler.set_epoch(0)
    next(iter(sampler))  # the first draw fits the rule on the primed losses
    idx = torch.tensor([200, 201, 202, 203])  # unseen; the second's loss is far above every seen one
    weight = torch.ones(4, requires_grad=True)
    per_sample = weight * torch.tensor([1.0, 50.0, 0.9, 1.1])
    namespace = {"sampler": sampler, "idx": idx, "per_sample": per_sample, "step": 0, "torch": torch}
    exec(compile(code, "README.md screen snippet", "exec"), namespace)  # noqa: S102 - the documented code, verbatim
    assert namespace["keep"].tolist() == [True, False, True, True]
    assert torch.allclose(weight.grad, torch.tensor([1.0, 0.0, 0.9, 1.1]) / 4)
    assert len(sampler.order.feedback.pending) == 1 and sampler.order.feedback.pending[0][2].tolist() == idx.tolist()


def test_readme_from_weights_snippet_runs_and_follows_the_weights():
    """The README's WeightedRandomSampler replacement, as written, draws in proportion to the weights."""
    from torch.utils.data import DataLoader

    from irdro_sampler import IndexedDataset, IRDROBatchSampler, IRDROSampler

    (code,) = python_blocks(ROOT / "README.md", "IRDROSampler.from_weights(class_balancing_weights")
    data = IndexedDataset(xy_data(n=256))
    weights = np.where(np.arange(256) < 64, 3.0, 1.0)  # the first quarter three times as likely
    namespace = {"class_balancing_weights": weights, "dataset": data, "DataLoader": DataLoader,
                 "IRDROSampler": IRDROSampler, "IRDROBatchSampler": IRDROBatchSampler}
    exec(compile(code, "README.md from_weights snippet", "exec"), namespace)  # noqa: S102 - verbatim
    drawn = [int(i) for _, _, idx in namespace["loader"] for i in idx]
    assert len(drawn) == 256
    share = np.mean(np.asarray(drawn) < 64)
    assert abs(share - 0.5) < 0.02  # 64 * 3 / (64 * 3 + 192) = 0.5, balanced draws: within 2 per sample
