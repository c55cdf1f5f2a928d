"""The Composer target interface: finders pick the target, a third target plugs in by registration alone,
and IRDRO itself has no branch on the data path."""

from __future__ import annotations

import ast
import inspect
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("composer")

from _composer_example import ex  # noqa: E402
from composer.loggers import InMemoryLogger  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, Sampler  # noqa: E402

import irdro_sampler  # noqa: E402
from irdro_sampler import DROWeighting, IndexedDataset, IRDROSampler, LossTable, RoundFeedback  # noqa: E402
from irdro_sampler.integrations.composer import (  # noqa: E402
    IRDRO,
    FeedbackOptions,
    FeedbackTarget,
    SamplerTarget,
    StreamingTarget,
    find_target,
    register_target,
    unregister_target,
)
from irdro_sampler.integrations.composer import algorithm as algorithm_module  # noqa: E402

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------- a third path
class ListWeightedSampler(Sampler[int]):
    """A plain sampler over a list of weights, redrawn every epoch: a data path IRDRO has never heard of."""

    def __init__(self, num_samples: int, epoch_size: int, seed: int = 0) -> None:
        self.weights = [1.0 / num_samples] * num_samples
        self.epoch_size, self.seed, self.epoch = epoch_size, seed, 0
        self.pushes = 0

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        yield from rng.choice(len(self.weights), size=self.epoch_size, p=np.asarray(self.weights)).tolist()

    def __len__(self) -> int:
        return self.epoch_size


class ListTarget:
    """Feeds a :class:`ListWeightedSampler` through the core's RoundFeedback: new weights every epoch."""

    name = "list weights"
    wants_epoch_end = True
    tuple_index_last = True
    has_groups = False

    def __init__(self, sampler: ListWeightedSampler) -> None:
        self.sampler_list = sampler
        self.feedback: RoundFeedback | None = None
        self.updates: list[int] = []
        self.fed: list[np.ndarray] = []

    @staticmethod
    def find(dataloader):
        sampler = getattr(dataloader, "sampler", None)
        return ListTarget(sampler) if isinstance(sampler, ListWeightedSampler) else None

    @staticmethod
    def check_state(state) -> None:
        if "list_table" in state and not isinstance(state["list_table"], dict):
            raise ValueError(f"state['list_table'] must be a dict, got {state['list_table']!r}")

    def attach(self, options, previous) -> None:
        self.feedback = RoundFeedback(LossTable(len(self.sampler_list.weights)), options.rule)

    def global_step(self, timestamp) -> int:
        return int(timestamp.batch)

    def update(self, indices, losses, step) -> None:
        self.updates.append(step)
        self.fed.append(np.asarray(indices).copy())
        self.feedback.update(indices, losses, step)

    def importance_weights(self, indices, step):
        p = np.asarray(self.sampler_list.weights)[indices]
        return 1.0 / (len(self.sampler_list.weights) * p)

    def stats(self):
        return {"seen_fraction": self.feedback.table.num_seen / self.feedback.num_samples, "list_updates": len(self.updates)}

    def epoch_end(self, want_stats):
        p = self.feedback.round_probabilities()
        self.sampler_list.weights = p.tolist()
        self.sampler_list.pushes += 1
        return self.feedback.stats(p) if want_stats else {}

    def fingerprint(self) -> int:
        return self.feedback.fingerprint()

    def missing_index_help(self, index_key) -> str:
        return ": wrap the dataset in IndexedDataset"

    def state_dict(self):
        return {"list_table": self.feedback.table.state_dict()}

    def load_state_dict(self, state) -> None:
        self.feedback.table.load_state_dict(state["list_table"])


@pytest.fixture
def list_target_registered():
    register_target(ListTarget.find, check_state=ListTarget.check_state)
    yield
    unregister_target(ListTarget.find, check_state=ListTarget.check_state)


def _list_run(steps=12, algo=None, load_path=None, save_folder=None):
    data, _, _ = ex.make_classifier_data(num_samples=48, seed=0)
    sampler = ListWeightedSampler(48, epoch_size=32, seed=1)
    dl = DataLoader(IndexedDataset(data), sampler=sampler, batch_size=8)
    algo = algo or IRDRO(temperature=0.5, log_interval=2)
    memory = InMemoryLogger()
    trainer = ex.build_trainer(ex.build_classifier_model(seed=0), dl, [algo], steps=steps, seed=0, loggers=[memory])
    trainer.fit()
    trainer.close()
    return algo, sampler, memory


def test_a_registered_third_target_is_fed_by_a_real_trainer(list_target_registered, tmp_path):
    algo, sampler, memory = _list_run()
    assert isinstance(algo.target, ListTarget) and isinstance(algo.target, FeedbackTarget)
    assert algo.sampler is None and algo.table is None  # the built-in views: not this target's parts
    assert algo.target.updates == list(range(12))  # one gathered update per batch, at the target's step
    assert sum(len(idx) for idx in algo.target.fed) == 12 * 8  # every trained sample, gathered
    expected = np.zeros(48, dtype=np.int64)  # the table counts each sample once per batch it was in
    for idx in algo.target.fed:
        expected[np.unique(idx)] += 1
    np.testing.assert_array_equal(algo.target.feedback.table.counts, expected)
    assert sampler.pushes == 3  # 32 draws per epoch = 4 batches: EPOCH_END after batches 4, 8, 12
    assert not np.allclose(sampler.weights, 1 / 48)  # the fed losses moved the weights
    assert [v for _, v in memory.data["irdro/list_updates"]] == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    assert len(memory.data["irdro/ess_fraction"]) == 3  # the round diagnostics epoch_end returned
    # The target's entry travels in IRDRO's checkpoint and its state check runs at load time.
    state = algo.state_dict()
    assert set(state) == {"repr", "version", "mode", "list_table"}
    torch.save(state, tmp_path / "algo.pt")
    fresh = IRDRO(temperature=0.5)
    fresh.load_state_dict(torch.load(tmp_path / "algo.pt", weights_only=True))
    assert set(fresh.state_dict()) == set(state)  # stashed before FIT_START, still saveable
    with pytest.raises(ValueError, match=r"state\['list_table'\] must be a dict"):
        fresh.load_state_dict({"list_table": 3})


def test_without_the_registration_the_third_path_is_not_found():
    data, _, _ = ex.make_classifier_data(num_samples=48, seed=0)
    dl = DataLoader(IndexedDataset(data), sampler=ListWeightedSampler(48, 32), batch_size=8)
    assert find_target(dl) is None
    trainer = ex.build_trainer(ex.build_classifier_model(), dl, [IRDRO()], steps=1)
    with pytest.raises(ValueError, match="found nothing to feed.*ListWeightedSampler"):
        trainer.fit()
    trainer.close()


def test_registry_arguments_are_checked():
    with pytest.raises(TypeError, match="finder must be callable"):
        register_target("not a function")
    with pytest.raises(TypeError, match="check_state must be callable"):
        register_target(ListTarget.find, check_state=1)
    with pytest.raises(ValueError, match="is not registered"):
        unregister_target(ListTarget.find)
    register_target(ListTarget.find, first=True)
    try:
        with pytest.raises(ValueError, match="registered already"):
            register_target(ListTarget.find)
    finally:
        unregister_target(ListTarget.find)


# --------------------------------------------------------------------------------------------- built-in finders
class _HoldsSampler(Sampler[list[int]]):
    """A batch sampler that keeps its IRDROSampler in ``.sampler`` (as IRDROBatchSampler does)."""

    def __init__(self, sampler: IRDROSampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        it = iter(self.sampler)
        while batch := [i for _, i in zip(range(self.sampler.batch_size), it, strict=False)]:
            yield batch

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch


def test_the_sampler_is_found_as_sampler_or_inside_a_batch_sampler():
    data, _, _ = ex.make_classifier_data(num_samples=40, seed=0)
    ds = IndexedDataset(data)
    s = IRDROSampler(data, 8, num_replicas=1, rank=0)
    batch_samplers = [BatchSampler(s, 8, drop_last=False), _HoldsSampler(s)]
    if hasattr(irdro_sampler, "IRDROBatchSampler"):  # the core's own batch sampler, where it exists
        batch_samplers.append(irdro_sampler.IRDROBatchSampler(s))
    loaders = [DataLoader(ds, sampler=s, batch_size=8)] + [DataLoader(ds, batch_sampler=b) for b in batch_samplers]
    for dl in loaders:
        target = find_target(dl)
        assert isinstance(target, SamplerTarget) and target.sampler is s, type(dl.batch_sampler)
        assert target.tuple_index_last  # an IndexedDataset appends the index to tuple samples
    # The batch-sampler loaders have no batch_size of their own: attach has nothing to compare it with.
    target = find_target(loaders[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target.attach(FeedbackOptions(DROWeighting(), {}, {}, None, "resample"), None)


def test_a_batch_sampler_holding_the_sampler_trains_like_sampler_equals():
    """IRDRO feeds an IRDROSampler inside ``batch_sampler=`` exactly as one given as ``sampler=``."""
    from _core_helpers import assert_state_equal
    from composer import Callback

    from irdro_sampler.integrations.composer import batch_sample_indices

    class Seen(Callback):
        def __init__(self):
            self.ids = []

        def after_dataloader(self, state, logger):
            self.ids.append(batch_sample_indices(state).tolist())

    data, _, _ = ex.make_classifier_data(num_samples=96, seed=0)
    wrap = getattr(irdro_sampler, "IRDROBatchSampler", _HoldsSampler)
    runs = []
    for as_batch_sampler in (False, True):
        s = IRDROSampler(data, 8, num_replicas=1, rank=0, seed=3, feedback_delay=2, temperature=0.5)
        ds = IndexedDataset(data)
        dl = DataLoader(ds, batch_sampler=wrap(s)) if as_batch_sampler else DataLoader(ds, sampler=s, batch_size=8)
        seen, algo = Seen(), IRDRO(log_interval=0)
        trainer = ex.build_trainer(ex.build_classifier_model(seed=0), dl, [algo], steps=8, seed=0, callbacks=[seen],
                                   microbatch_size=8)  # a batch_sampler DataLoader has no batch_size
        trainer.fit()
        trainer.close()
        assert algo.sampler is s
        runs.append((seen.ids, s.state_dict()))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == 8  # same draws, batch by batch
    assert_state_equal(runs[0][1], runs[1][1])  # same feedback, same order


def test_streaming_target_keeps_the_previous_table_of_the_same_size():
    class Stream:
        round_size, num_samples = 16, 30

        def set_weights(self, weights):
            self.weights = weights

    dl = DataLoader([0], batch_size=1)
    dl_stream = type("Loader", (), {"dataset": Stream(), "sampler": None, "batch_sampler": None})()
    assert find_target(dl) is None
    target = find_target(dl_stream)
    assert isinstance(target, StreamingTarget) and target.table is None
    options = FeedbackOptions(DROWeighting(), {}, {"ema": 0.25}, None, "resample")
    target.attach(options, None)
    assert target.table.dataset_size == 30 and target.table.ema == 0.25
    again = find_target(dl_stream)
    again.attach(options, target)
    assert again.feedback is target.feedback  # a second fit() continues the same table
    with pytest.raises(ValueError, match="draw_probabilities"):
        find_target(dl_stream).attach(FeedbackOptions(DROWeighting(), {}, {}, None, "importance"), None)


# --------------------------------------------------------------------------------------------- no path branches
_PATH_NAMES = {"sampler", "table", "dataset", "SamplerTarget", "StreamingTarget", "IRDROSampler", "LossTable"}


def test_irdro_has_no_branch_on_the_data_path():
    """No condition inside IRDRO mentions a path's parts: the target decides, IRDRO only wires events."""
    tree = ast.parse(inspect.getsource(algorithm_module.IRDRO))
    offenders = []
    for node in ast.walk(tree):
        tests = []
        if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert)):
            tests.append(node.test)
        if isinstance(node, ast.BoolOp):
            tests.extend(node.values)
        for test in tests:
            for sub in ast.walk(test):
                name = sub.attr if isinstance(sub, ast.Attribute) else sub.id if isinstance(sub, ast.Name) else None
                if name in _PATH_NAMES:
                    offenders.append(f"line {test.lineno}: {ast.unparse(test)}")
    assert not offenders, offenders
