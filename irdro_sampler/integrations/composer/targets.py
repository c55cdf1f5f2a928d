"""What IRDRO feeds: the target interface, its two implementations, and the registry that finds one.

:class:`~irdro_sampler.integrations.composer.IRDRO` does not know which data path a run uses. At
``FIT_START`` it asks the registered *target finders*, in order, for a :class:`FeedbackTarget` for the
train DataLoader, and from then on only calls the interface:

* :class:`SamplerTarget`: an :class:`~irdro_sampler.IRDROSampler` in the DataLoader (``sampler=``, or
  inside ``batch_sampler=``, e.g. ``IRDROBatchSampler(sampler)`` or a ``BatchSampler``). The sampler
  keeps the table and decides every draw.
* :class:`~.sharded_target.ShardedSamplerTarget`: a
  :class:`~irdro_sampler.sharded_sampler.ShardedIRDROSampler` (the table sharded over the ranks), its
  rows checkpointed in per-rank files beside Composer's checkpoint (see :mod:`.sharded_target`).
* :class:`StreamingTarget`: a weighted streaming dataset (anything with ``set_weights`` and
  ``round_size``, such as ``irdro_sampler.integrations.streaming.WeightedStreamingDataset``) plus a
  :class:`~irdro_sampler.RoundFeedback`, which keeps the table and fits each round's weights.

A new data path is a new class implementing :class:`FeedbackTarget` plus ``register_target(finder)``;
IRDRO needs no change. This module imports nothing from Composer or streaming (the targets are plain
objects over the DataLoader's parts) and touches no private name of either.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from irdro_sampler import (
    DROWeighting,
    IndexedDataset,
    IRDROSampler,
    LossTable,
    RoundFeedback,
)
from irdro_sampler._validation import as_groups
from irdro_sampler.priming import prime_from

__all__ = [
    "FeedbackOptions",
    "FeedbackTarget",
    "SamplerTarget",
    "ShardedSamplerTarget",
    "StreamingTarget",
    "TargetFinder",
    "check_target_states",
    "find_target",
    "register_target",
    "unregister_target",
]


@dataclass(frozen=True)
class FeedbackOptions:
    """IRDRO's options, as a target sees them at :meth:`FeedbackTarget.attach`.

    ``rule`` is the rule built from ``rule_options`` (the options given explicitly to IRDRO);
    ``table_options`` the loss table's ``ema``/``prior`` given explicitly; ``groups`` the per-sample
    group ids given (or None); ``mode`` one of ``resample``, ``importance``, ``reweight``.
    """

    rule: DROWeighting
    rule_options: Mapping[str, Any]
    table_options: Mapping[str, Any]
    groups: Any
    mode: str


@runtime_checkable
class FeedbackTarget(Protocol):
    """Where IRDRO's per-sample feedback goes, and where the importance weights come from.

    Every method is called identically on every rank (IRDRO gathers the feedback of all ranks first),
    so ranks that agree stay in agreement.

    Attributes:
        name: what the target holds, for messages (``"IRDROSampler"``).
        wants_epoch_end: whether :meth:`epoch_end` is called at ``EPOCH_END`` (IRDRO matches the event
            only then, so other targets leave no trace of it).
        tuple_index_last: whether a tuple batch's last element holds the sample indices.
        has_groups: whether the samples carry group ids (class labels, sources) the cut judges them by.

    Optional: ``bind(state)``, called with Composer's ``State`` at ``FIT_START`` after :meth:`attach` and
    before a checkpoint's state is loaded, for a target whose checkpoint needs the run's files (the
    sharded sampler's rows are written beside the checkpoint file); ``fit_end()``, called at ``FIT_END``;
    ``prime(initial_losses)``, called at the first ``FIT_START`` of a fresh run given
    ``IRDRO(initial_losses=...)`` (losses of a scoring pass, any form of
    :func:`~irdro_sampler.initial_loss_feedback`), before anything is drawn; ``screen(indices, losses)``, which
    of a microbatch's samples to learn from (``IRDRO(screen=True)``; on this rank, read-only).
    """

    name: str
    wants_epoch_end: bool
    tuple_index_last: bool
    has_groups: bool

    def attach(self, options: FeedbackOptions, previous: FeedbackTarget | None) -> None:
        """Called once at ``FIT_START``, before any other method: check IRDRO's ``options`` against what
        the target holds (``ValueError`` on a conflict) and build what it keeps. ``previous`` is the
        target of the previous ``fit()`` of the same IRDRO (or one installed by hand), else None."""
        ...

    def global_step(self, timestamp: Any) -> int:
        """The global batch index the target knows the current batch by (from a Composer ``Timestamp``,
        read at ``BATCH_START``)."""
        ...

    def update(self, indices: np.ndarray, losses: np.ndarray, step: int) -> None:
        """Record one global batch's gathered feedback (int64 indices, float32 losses) at ``step``."""
        ...

    def importance_weights(self, indices: np.ndarray, step: int) -> np.ndarray:
        """``1 / (N p_i)`` (float64) with ``p`` the probabilities the samples of batch ``step`` were drawn
        from; may hold inf for a sample whose probability is 0 now."""
        ...

    def stats(self) -> dict[str, float]:
        """Diagnostics logged every ``log_interval`` batches (``seen_fraction`` and ``table_mean_loss``
        at least)."""
        ...

    def epoch_end(self, want_stats: bool) -> dict[str, float]:
        """The end of an epoch (a round for round-based data); returns diagnostics to log (empty unless
        ``want_stats``)."""
        ...

    def fingerprint(self) -> int:
        """Signed 64-bit digest of what the ranks must agree on."""
        ...

    def missing_index_help(self, index_key: str | int) -> str:
        """The end of the message of a batch that lacks its sample indices: how to put them back."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The entries this target adds to IRDRO's checkpoint (tensors and primitives)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from IRDRO's checkpoint (all its entries; the target reads its own)."""
        ...


#: ``dataloader -> target or None``: what a registered finder is.
TargetFinder = Callable[[Any], "FeedbackTarget | None"]
#: ``state -> None``: checks a checkpoint's entries of one target kind before any DataLoader exists.
StateCheck = Callable[[Mapping[str, Any]], None]


def option_conflicts(rule_cfg: dict[str, Any], table: Any, options: FeedbackOptions,
                     expected_groups: Any) -> list[str]:
    """The rule, table and group options of ``IRDRO(...)`` that differ from the sampler's (named, with both
    values). ``expected_groups(groups)`` gives the group ids the sampler's table should hold for them."""
    conflicts = [
        f"{k}={v!r} (sampler: {rule_cfg.get(k)!r})" for k, v in options.rule_options.items() if rule_cfg.get(k) != v
    ]
    for k, v in options.table_options.items():
        if getattr(table, k, v) != v:
            conflicts.append(f"{k}={v!r} (sampler: {getattr(table, k)!r})")
    if options.groups is not None and (
        table.groups is None or not np.array_equal(expected_groups(options.groups), table.groups)
    ):
        conflicts.append("groups (the sampler has other groups or none)")
    return conflicts


class SamplerTarget:
    """An :class:`~irdro_sampler.IRDROSampler` in the train DataLoader: the sampler decides everything.

    Its options are the truth: IRDRO's rule and table options must agree with them (checked at
    :meth:`attach`, unless ``mode='reweight'``, where the sampler is only fed).
    """

    name = "IRDROSampler"
    wants_epoch_end = False

    def __init__(self, sampler: IRDROSampler, dataloader: Any = None) -> None:
        self.sampler = sampler
        self.dataloader = dataloader
        self.tuple_index_last = isinstance(getattr(dataloader, "dataset", None), IndexedDataset)

    @property
    def has_groups(self) -> bool:
        return self.sampler.table.groups is not None

    #: The sampler class this target drives (a subclass of the target names its own).
    sampler_type: type = IRDROSampler

    @classmethod
    def find(cls, dataloader: Any) -> SamplerTarget | None:
        """The ``sampler_type`` sampler of ``sampler=``, or of ``batch_sampler=`` (itself, or its ``.sampler``)."""
        for obj in (getattr(dataloader, "sampler", None), getattr(dataloader, "batch_sampler", None)):
            for candidate in (obj, getattr(obj, "sampler", None)):
                if isinstance(candidate, cls.sampler_type):
                    return cls(candidate, dataloader)
        return None

    @staticmethod
    def check_state(state: Mapping[str, Any]) -> None:
        if "sampler" in state:
            IRDROSampler.check_state_dict(state["sampler"])

    def attach(self, options: FeedbackOptions, previous: FeedbackTarget | None) -> None:
        sampler, dataloader = self.sampler, self.dataloader
        batch_size = getattr(dataloader, "batch_size", None)
        if batch_size is not None and batch_size != sampler.batch_size:
            raise ValueError(
                f"the IRDROSampler has batch_size={sampler.batch_size} but the DataLoader has "
                f"batch_size={batch_size}: they must be equal (the per-rank batch size)"
            )
        depth = int(getattr(dataloader, "num_workers", 0) or 0) * int(getattr(dataloader, "prefetch_factor", 2) or 2)
        if depth >= sampler.feedback_delay:
            warnings.warn(
                f"IRDROSampler(feedback_delay={sampler.feedback_delay}) does not exceed the DataLoader's prefetch "
                f"depth (num_workers x prefetch_factor = {depth}): feedback will often arrive after its batch was "
                "drawn (counted as late_feedback) and runs will not be exactly reproducible or resumable; "
                "raise feedback_delay",
                stacklevel=2,
            )
        conflicts = self._conflicts(options)
        if conflicts and options.mode != "reweight":
            raise ValueError(
                "IRDRO options disagree with the IRDROSampler in the train DataLoader: "
                + ", ".join(conflicts)
                + ". The sampler's options decide; set them on IRDROSampler(...) and leave them out of IRDRO(...)"
            )

    def _conflicts(self, options: FeedbackOptions) -> list[str]:
        table = self.sampler.table
        return option_conflicts(self.sampler.rule.config(), table, options,
                                lambda groups: as_groups(groups, table.dataset_size))

    def prime(self, initial_losses: Any) -> None:
        """The sampler's ``prime`` with a scoring pass's losses (``IRDRO(initial_losses=...)``)."""
        prime_from(self.sampler.prime, initial_losses, self.sampler.dataset_size)

    def global_step(self, timestamp: Any) -> int:
        # The sampler's global batch index: epoch * batches_per_epoch + batch_in_epoch.
        return int(timestamp.epoch) * int(self.sampler.batches_per_epoch) + int(timestamp.batch_in_epoch)

    def update(self, indices: np.ndarray, losses: np.ndarray, step: int) -> None:
        self.sampler.update(indices, losses, step=step)

    def screen(self, indices: np.ndarray, losses: Any, block_only: bool = False) -> np.ndarray:
        """:meth:`IRDROSampler.screen <irdro_sampler.IRDROSampler.screen>` (``IRDRO(screen=True)`` or ``'block'``)."""
        return self.sampler.screen(indices, losses, block_only=block_only)

    def importance_weights(self, indices: np.ndarray, step: int) -> np.ndarray:
        """The batch's draw probabilities (buffered by the sampler while the batch is recent)."""
        return np.asarray(self.sampler.importance_weights(indices, step=step), dtype=np.float64)

    def stats(self) -> dict[str, float]:
        """:meth:`IRDROSampler.stats` (O(N)), with the table's seen fraction and mean loss if it lacks them."""
        out = dict(self.sampler.stats())
        table = self.sampler.table
        out.setdefault("seen_fraction", table.num_seen / table.dataset_size)
        out.setdefault("table_mean_loss", table.mean_loss())
        return out

    def epoch_end(self, want_stats: bool) -> dict[str, float]:
        return {}  # the sampler refreshes on its own schedule

    def fingerprint(self) -> int:
        return self.sampler.fingerprint()

    def missing_index_help(self, index_key: str | int) -> str:
        return ". Wrap the dataset in irdro_sampler.IndexedDataset (adds 'sample_idx') or set IRDRO(index_key=...)"

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "sampler" not in state:
            warnings.warn(
                "IRDRO: the checkpoint holds no IRDROSampler state (it was trained without one); "
                "the sampler starts fresh",
                stacklevel=2,
            )
            return
        self.sampler.load_state_dict(state["sampler"])


class StreamingTarget:
    """A weighted streaming dataset, fed through a :class:`~irdro_sampler.RoundFeedback`.

    The dataset draws a round of ``round_size`` samples from fixed probabilities; the feedback object
    keeps the loss table. At the end of every epoch (a round) the rule is fitted to the table and the
    next round's probabilities are pushed with ``dataset.set_weights``. ``dataset`` may be None and
    ``feedback`` is built at :meth:`attach` unless given (a target installed by hand, e.g. to load a
    checkpoint's table without a DataLoader).
    """

    name = "loss table / stream weights"
    wants_epoch_end = True
    tuple_index_last = False

    def __init__(self, dataset: Any, feedback: RoundFeedback | None = None) -> None:
        self.dataset = dataset
        self.feedback = feedback

    @property
    def has_groups(self) -> bool:
        return self.feedback is not None and self.feedback.table.groups is not None

    @classmethod
    def find(cls, dataloader: Any) -> StreamingTarget | None:
        """The DataLoader's dataset if it speaks the weighted-stream protocol (duck typing: importing
        the streaming integration, and so ``streaming``, is not needed here)."""
        dataset = getattr(dataloader, "dataset", None)
        if callable(getattr(dataset, "set_weights", None)) and hasattr(dataset, "round_size"):
            if hasattr(dataset, "owned_ids"):
                raise ValueError(
                    f"dataset: {type(dataset).__name__} takes each rank's own weights, and IRDRO keeps an "
                    "unsharded loss table; drive it from a training loop with sharded_probabilities "
                    "(docs/streaming.md, 'Weights sharded over ranks'), or use WeightedStreamingDataset"
                )
            return cls(dataset)
        return None

    @classmethod
    def by_hand(
        cls, current: FeedbackTarget | None, rule: DROWeighting, *, table: LossTable | None = None, dataset: Any = None
    ) -> StreamingTarget:
        """A target installed by hand (``IRDRO.table = ...`` or ``IRDRO.dataset = ...`` before ``FIT_START``,
        e.g. to load a checkpoint's table without a DataLoader): ``table`` and/or ``dataset`` replace
        those of ``current`` (kept when not given, if ``current`` has them)."""
        feedback = getattr(current, "feedback", None) if table is None else RoundFeedback(table, rule)
        return cls(getattr(current, "dataset", None) if dataset is None else dataset, feedback)

    @staticmethod
    def check_state(state: Mapping[str, Any]) -> None:
        RoundFeedback.check_state_dict(state)

    @property
    def table(self) -> LossTable | None:
        return None if self.feedback is None else self.feedback.table

    def attach(self, options: FeedbackOptions, previous: FeedbackTarget | None) -> None:
        """Check importance mode can read the round's probabilities; keep the previous fit's feedback
        when it has this dataset's size (a second ``fit()`` continues its table), else build one."""
        dataset = self.dataset
        if options.mode == "importance" and not callable(getattr(dataset, "draw_probabilities", None)):
            raise ValueError(
                f"IRDRO(mode='importance') needs the draw probabilities of the round in progress, which "
                f"{type(dataset).__name__} does not expose (no draw_probabilities method); use "
                "WeightedStreamingDataset or mode='resample'"
            )
        num = int(dataset.num_samples)
        kept = getattr(previous, "feedback", None)
        if isinstance(kept, RoundFeedback) and kept.num_samples == num:
            self.feedback = kept
        else:
            self.feedback = RoundFeedback(LossTable(num, **options.table_options, groups=options.groups), options.rule)

    def _feedback(self) -> RoundFeedback:
        if self.feedback is None:
            raise RuntimeError("StreamingTarget: no loss table yet (attach() builds it at FIT_START)")
        return self.feedback

    def prime(self, initial_losses: Any) -> None:
        """A scoring pass's losses into the table (as feedback of step 0), and the first round's weights fitted on
        them pushed to the dataset before it plans that round (``IRDRO(initial_losses=...)``)."""
        feedback = self._feedback()
        prime_from(lambda indices, losses: feedback.update(indices, losses, step=0), initial_losses,
                   feedback.num_samples)
        self.dataset.set_weights(feedback.round_probabilities())

    def global_step(self, timestamp: Any) -> int:
        return int(timestamp.batch)

    def update(self, indices: np.ndarray, losses: np.ndarray, step: int) -> None:
        self._feedback().update(indices, losses, step)

    def importance_weights(self, indices: np.ndarray, step: int) -> np.ndarray:
        """From the round's frozen probabilities: a round of ``round_size`` draws holds sample ``i``
        ``round_size * p_i`` times in expectation (exactly for i.i.d. draws; for balanced draws over the
        seeded phase), so the weighted loss summed over a round estimates ``round_size`` x the uniform
        mean loss."""
        p = np.asarray(self.dataset.draw_probabilities(indices), dtype=np.float64)
        with np.errstate(divide="ignore"):  # p = 0 cannot have been drawn; inf is caught by the caller
            return 1.0 / (int(self.dataset.num_samples) * p)

    def screen(self, indices: np.ndarray, losses: Any, block_only: bool = False) -> np.ndarray:
        """:meth:`RoundFeedback.screen <irdro_sampler.RoundFeedback.screen>`: first visits the round's cut would
        take (``IRDRO(screen=True)``, or its block: ``'block'``; every rank holds the whole table, so no
        collective)."""
        return self._feedback().screen(indices, losses, block_only=block_only)

    def stats(self) -> dict[str, float]:
        """The table's seen fraction and mean loss (O(N) for the mean); the round's full diagnostics
        are returned by :meth:`epoch_end`."""
        table = self._feedback().table
        return {"seen_fraction": table.num_seen / table.dataset_size, "table_mean_loss": table.mean_loss()}

    def epoch_end(self, want_stats: bool) -> dict[str, float]:
        """Push the next round's probabilities to the dataset; their diagnostics if ``want_stats``."""
        feedback = self._feedback()
        p = feedback.round_probabilities()
        self.dataset.set_weights(p)
        return feedback.stats(p) if want_stats else {}

    def fingerprint(self) -> int:
        """The loss table, the rule and the dataset's own fingerprint (its weights), if it has one. O(N)."""
        stream_fp = getattr(self.dataset, "fingerprint", None)
        extra = int(stream_fp()).to_bytes(8, "little", signed=True) if callable(stream_fp) else b""
        return self._feedback().fingerprint(extra)

    def missing_index_help(self, index_key: str | int) -> str:
        key = index_key
        return (
            f", although {type(self.dataset).__name__} adds it to every sample in get_item: it was lost on the way. "
            "A subclass whose __getitem__ rebuilds the sample (llm-foundry's StreamingTextDataset "
            f"tokenises it and keeps only the tokens) must put {key!r} back into what it returns, and a "
            "collate function that drops unknown keys must be wrapped in "
            "irdro_sampler.IndexListCollate(collate_fn). For llm-foundry, use the `irdro_text` train "
            "loader (irdro_sampler.integrations.llmfoundry), which does both"
        )

    def state_dict(self) -> dict[str, Any]:
        """``{'table': ..., 'rule': ...}`` (the rule is read by ``irdro-sampler inspect``)."""
        return self._feedback().state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "table" not in state:
            warnings.warn(
                "IRDRO: the checkpoint holds no loss-table state; the streaming weights' table starts fresh",
                stacklevel=2,
            )
            return
        self._feedback().load_state_dict(state)


# ---------------------------------------------------------------------------------------------- registry
# Consulted in order at FIT_START; the first finder that returns a target wins. The sampler comes first:
# a DataLoader with an IRDROSampler is fed through it whatever its dataset is.
# The sharded sampler's target lives in .sharded_target (it subclasses SamplerTarget, so it is imported here,
# after SamplerTarget exists; that module imports Composer only inside its functions).
from .sharded_target import ShardedSamplerTarget  # noqa: E402

_FINDERS: list[TargetFinder] = [SamplerTarget.find, ShardedSamplerTarget.find, StreamingTarget.find]
_STATE_CHECKS: list[StateCheck] = [SamplerTarget.check_state, ShardedSamplerTarget.check_state,
                                   StreamingTarget.check_state]


def register_target(finder: TargetFinder, *, check_state: StateCheck | None = None, first: bool = False) -> TargetFinder:
    """Teach IRDRO a new data path: ``finder(dataloader)`` returns a :class:`FeedbackTarget` or None.

    ``check_state(state)`` (optional) checks the target's entries of a checkpoint when it is loaded,
    before any DataLoader exists (``ValueError`` on a bad one). Finders are consulted in registration
    order after the built-in ones, or before them with ``first=True``. Returns ``finder`` (so it can be
    used as a decorator). Registering the same finder twice is a ``ValueError``.
    """
    if not callable(finder):
        raise TypeError(f"finder must be callable (dataloader -> FeedbackTarget | None), got {finder!r}")
    if check_state is not None and not callable(check_state):
        raise TypeError(f"check_state must be callable (state -> None) or None, got {check_state!r}")
    if finder in _FINDERS:
        raise ValueError(f"target finder {finder!r} is registered already")
    _FINDERS.insert(0 if first else len(_FINDERS), finder)
    if check_state is not None:
        _STATE_CHECKS.append(check_state)
    return finder


def unregister_target(finder: TargetFinder, *, check_state: StateCheck | None = None) -> None:
    """Undo :func:`register_target` (``ValueError`` if ``finder`` is not registered)."""
    if finder not in _FINDERS:
        raise ValueError(f"target finder {finder!r} is not registered")
    _FINDERS.remove(finder)
    if check_state is not None and check_state in _STATE_CHECKS:
        _STATE_CHECKS.remove(check_state)


def find_target(dataloader: Any) -> FeedbackTarget | None:
    """The first registered finder's target for ``dataloader``, or None when none recognises it."""
    for finder in _FINDERS:
        target = finder(dataloader)
        if target is not None:
            return target
    return None


def check_target_states(state: Mapping[str, Any]) -> None:
    """Run every registered state check on a checkpoint's entries (``ValueError`` on a bad one)."""
    for check in _STATE_CHECKS:
        check(state)
