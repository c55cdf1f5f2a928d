"""IRDROSampler: draw training indices from closed-form KL-DRO weights of running losses.

The sampler is the ``torch.utils.data`` face of the library: epochs, ranks and the public API. What a
global batch holds is decided by :class:`~irdro_sampler.batch_order.BatchOrder` (the order contract)
from its pieces, each in its own module: the :class:`~irdro_sampler.feedback.FeedbackQueue`, the
:class:`~irdro_sampler.loss_table.LossTable`, :class:`~irdro_sampler.tilted_masses.TiltedMasses` and a
draw scheme of :mod:`irdro_sampler.draws`. The state is packed and checked by
:mod:`irdro_sampler.sampler_state`; diagnostics come from :mod:`irdro_sampler.diagnostics`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from ._validation import as_indices, batch_losses, check_int, check_step
from .batch_order import BatchOrder
from .diagnostics import weighting_diagnostics
from .distributed import process_group_up
from .draws import draw_scheme_class, draw_scheme_names
from .fingerprint import options_fingerprint
from .fixed_weights import FixedWeights, weighted_sampler
from .layout import BatchLayout
from .loss_table import DEFAULT_EMA, DEFAULT_PRIOR, LossTable
from .sampler_state import check_state, pack_state, restore_state
from .screening import check_block_only, screen_table_rows
from .weights import DROWeighting

__all__ = ["DRAW_SCHEMES", "IRDROSampler"]

#: The registered draw schemes' names, the default first.
DRAW_SCHEMES = draw_scheme_names()


class IRDROSampler(DistributedSampler):
    """Sample indices with probability given by closed-form KL-DRO weights of running losses.

    Usage::

        ds = IndexedDataset(my_dataset)            # samples carry their index as "sample_idx"
        sampler = IRDROSampler(ds, batch_size=32, groups=labels)  # groups: optional, e.g. class labels
        loader = DataLoader(ds, batch_sampler=IRDROBatchSampler(sampler))   # or sampler=, batch_size=
        for step, batch in enumerate(loader):
            per_sample = loss_fn(model(batch), reduction="none")
            per_sample.mean().backward(); ...
            sampler.update(batch["sample_idx"], per_sample.detach(), step=step)

    **Distribution.** Batch ``b`` is drawn from ``p_i(b) = (1 - uniform_mix) * softmax(l / tau)_i +
    uniform_mix / N`` (:class:`DROWeighting`; seen samples above their cut get only the floor, so they
    are measured again now and then). :meth:`probabilities` returns it exactly. ``**rule_options`` are
    :class:`DROWeighting`'s fields; ``groups`` (one int in [0, 65536) per sample) makes the cut judge
    each sample against its group; ``ema`` and ``prior`` configure the :class:`LossTable`.

    **Draws.** ``draws`` names a scheme of :mod:`irdro_sampler.draws`: ``"balanced"`` (default; with
    flat weights every epoch yields every sample once, in a new seeded order, ranks' shares disjoint;
    with changing weights every count stays within 2 of ``sum_b G_b p_i(b)``) or ``"iid"``
    (independent draws through a sum tree of ``block_size`` children per node).

    **Order contract** (:class:`~irdro_sampler.batch_order.BatchOrder`). Global batch ``b`` is a pure
    function of (seed, ``b``, the feedback of steps ``<= b - feedback_delay``): independent of DataLoader
    workers, and a sampler restored with :meth:`load_state_dict` continues exactly. ``feedback_delay``
    (32) must exceed the batches the DataLoader draws ahead (``num_workers * prefetch_factor``); later
    feedback is applied at the next draw and counted as ``late_feedback``.

    **Epochs and ranks.** An epoch yields ``num_samples`` indices per rank (``ceil(N / num_replicas)``)
    in batches of ``batch_size`` (:class:`~irdro_sampler.layout.BatchLayout`); call :meth:`set_epoch`
    before each. Replays are served from a buffer without changing the state. Every rank draws the same
    global batch and yields its slice; the sampler never communicates, so give every rank the same
    :meth:`update` calls and compare :meth:`fingerprint` across ranks. Bad input raises naming the
    argument and changes nothing. Costs and the full contract: ``docs/design.md``.
    """

    def __init__(
        self,
        data_source_or_size: Sized | int,
        batch_size: int,
        *,
        groups: Any = None,
        ema: float = DEFAULT_EMA,
        prior: float | str = DEFAULT_PRIOR,
        feedback_delay: int = 32,
        refresh_interval: int | None = None,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        block_size: int | None = None,
        draws: str = DRAW_SCHEMES[0],
        **rule_options: Any,
    ) -> None:
        data_source, size = _as_data_source(data_source_or_size)
        num_replicas, rank = _world(num_replicas, rank)
        seed = check_int(seed, "seed", minimum=0)
        scheme_cls = draw_scheme_class(draws)
        scheme_options = scheme_cls.options(block_size=block_size)  # validated by the scheme
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        per_rank = -(-size // num_replicas) if num_samples is None else num_samples
        self._set_layout(check_int(per_rank, "num_samples", minimum=1))
        feedback_delay = check_int(feedback_delay, "feedback_delay", minimum=1)
        if refresh_interval is None:
            # Recalibrate after ~1/16 of the data set has been drawn, at least every 4 batches: the
            # O(N) refresh then costs a fraction of a step, and prior/cut/temperature move slowly.
            refresh_interval = max(4, size // (16 * self.global_batch_size))
        refresh_interval = check_int(refresh_interval, "refresh_interval", minimum=1)
        rule = DROWeighting(**rule_options)
        table = LossTable(size, ema=ema, prior=prior, groups=groups,
                          track_first_losses=rule.reads_first_losses)
        scheme = scheme_cls(size, global_batch=self.global_batch_size, uniform_mix=rule.uniform_mix, seed=seed,
                            **scheme_options)
        self._assemble(table, rule, scheme, feedback_delay, refresh_interval)

    def _set_layout(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.layout = BatchLayout(num_samples, self.batch_size, self.num_replicas, self.rank)
        self.total_size = num_samples * self.num_replicas
        self.batches_per_epoch = self.layout.batches_per_epoch
        self.global_batch_size = self.layout.global_batch_size

    def _assemble(self, table: LossTable, rule: DROWeighting | FixedWeights, scheme: Any, feedback_delay: int,
                  refresh_interval: int) -> None:
        """Fresh run-time state around ``table``, ``rule`` and ``scheme`` (``self.seed`` set first)."""
        self.table, self.rule, self.draw_scheme = table, rule, scheme
        self.order = BatchOrder(table, rule, scheme, self.layout, seed=self.seed, feedback_delay=feedback_delay,
                                refresh_interval=refresh_interval)
        self.start_batch = 0  # where the next iter() starts (set_start_batch), saved in the state

    @property
    def feedback_delay(self) -> int:
        """Feedback of step ``s`` is applied before drawing batch ``s + feedback_delay``."""
        return self.order.feedback_delay

    @property
    def refresh_interval(self) -> int:
        """Batches between the O(N) refits of prior, cut and temperature."""
        return self.order.refresh_interval

    @property
    def draws(self) -> str:
        """The draw scheme's name (``'balanced'`` or ``'iid'``)."""
        return self.draw_scheme.name

    @property
    def block_size(self) -> int:
        """The i.i.d. draws' sum-tree fanout (saved in the state; balanced draws keep no tree)."""
        return self.draw_scheme.block_size

    @property
    def nbytes(self) -> int:
        """Bytes of the sampler's O(N) memory: the loss table and the draw scheme's structures."""
        return self.table.nbytes + self.draw_scheme.nbytes

    @property
    def dataset_size(self) -> int:
        """N, the number of samples in the data set (``num_samples`` is the per-rank epoch length)."""
        return self.table.dataset_size

    # ------------------------------------------------------------------------------------ iteration
    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next ``iter()`` yields (as ``DistributedSampler.set_epoch``)."""
        self.epoch = check_int(epoch, "epoch", minimum=0)

    def set_start_batch(self, batch_in_epoch: int) -> None:
        """Make the next ``iter()`` (only) start at ``batch_in_epoch`` of the current epoch.

        For loops that resume mid-epoch without replaying the batches already trained (Composer replays).
        """
        start = check_int(batch_in_epoch, "batch_in_epoch", minimum=0)
        if start > self.batches_per_epoch:
            raise ValueError(f"batch_in_epoch must be <= {self.batches_per_epoch}, got {batch_in_epoch}")
        self.start_batch = start

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        for batch in self.iter_batches():
            yield from batch.tolist()

    def iter_batches(self) -> Iterator[np.ndarray]:
        """This rank's batches of the current epoch, one int64 array each (what ``iter()`` flattens).

        Batch ``j + 1`` is drawn only when requested, so feedback reported in between is in time.
        :class:`~irdro_sampler.IRDROBatchSampler` hands these to a DataLoader as ``batch_sampler``.
        """
        epoch, start = self.epoch, self.start_batch
        self.start_batch = 0
        max_reported = self.order.feedback.max_reported_step
        already_trained = (epoch + 1) * self.batches_per_epoch - 1 <= max_reported
        for j in range(start, self.batches_per_epoch):
            b = epoch * self.batches_per_epoch + j
            indices, _ = self.order.batch(b)
            yield indices[self.layout.rank_slice(b)]
        if already_trained:
            # A whole epoch re-iterated after it was trained: the loop forgot set_epoch(), and the
            # feedback of later steps never comes due. (Composer's spin over finished epochs on
            # resume reads only their first batches, so it does not get here.)
            warnings.warn(
                f"IRDROSampler: epoch {epoch} was iterated again after it was trained (feedback "
                f"reported up to step {max_reported}); call sampler.set_epoch(epoch) "
                "before each epoch",
                stacklevel=3,
            )

    # ------------------------------------------------------------------------------------ feedback
    def update(self, indices: Any, losses: Any, step: int | None = None) -> None:
        """Report per-sample losses of the samples trained at global batch ``step``.

        ``indices`` and ``losses`` are 1-D (lists, numpy arrays or tensors on any device) of equal
        length; an index may repeat (draws are with replacement). ``step`` defaults to the previous
        step + 1. The feedback is buffered and applied just before drawing batch
        ``step + feedback_delay``. Raises (changing nothing) on bad input.
        """
        feedback = self.order.feedback
        _, _, skipped = feedback.add(indices, losses, step)
        self.table.num_skipped += skipped
        self.order.drawn.forget_trained(feedback.max_reported_step)

    def screen(self, indices: Any, losses: Any, *, block_only: bool = False) -> np.ndarray:
        """Which samples of a batch to learn from: ``False`` for a first visit whose loss the cut would take.

        The cut steers the draws only once a sample's loss is in the table; its first visit is drawn blind and
        trained on, noise included. Call this in the step, after the forward pass, with the batch's indices and
        per-sample losses, and leave the ``False`` samples out of the loss (keep the batch's divisor)::

            keep = torch.as_tensor(sampler.screen(idx, per_sample.detach()), device=per_sample.device)
            (per_sample * keep).mean().backward()
            sampler.update(idx, per_sample.detach(), step=step)   # report every loss, screened ones too

        ``True`` for every sample the table holds a loss of (the draws already weigh it; a cut one drawn by the
        floor is trained on, so it can be re-admitted), while the last refit saw no loss (the first
        ``feedback_delay`` steps), for non-finite losses and under :meth:`from_weights`. A sample counts as unseen until its feedback is applied (``feedback_delay`` steps
        after it is reported). Read-only: the sample order and the state do not change. Same input contract as
        :meth:`update` (raises naming the argument on bad input). ``benchmarks/RESULTS_suite_screen.md``
        measures it on the task suite.

        ``block_only=True`` leaves out only first visits inside a block of unlearnable samples (a tight, far high
        mode of the last refit's seen losses, e.g. random documents; :mod:`irdro_sampler.screening`): it cannot
        starve a learnable minority the full screen can, and leaves out nothing where there is no such block
        (``benchmarks/RESULTS_suite_block_screen.md``).
        """
        block_only = check_block_only(block_only)
        idx, val = batch_losses(indices, losses, self.dataset_size)
        return screen_table_rows(self.table, idx, val, self.order.weights.params, block_only)

    def prime(self, indices: Any, losses: Any) -> None:
        """Report losses measured before training: a scoring pass of the starting model over the data set.

        They enter the table at once (as those samples' first losses) and the first batch is drawn from
        the rule fitted on them, so the cut and the tilt act from the first draw. Without it the table
        starts empty and only revisits can be steered: in continual training over one or two passes most
        draws are first visits, noise included. The price is a forward pass over the data (no backward).
        Same input contract as :meth:`update` (repeats averaged, non-finite losses dropped and counted);
        call it before the first batch is drawn (``ValueError`` after, and on bad input, changing
        nothing), on every rank with the same losses. The losses count as feedback applied before batch
        0: the sample order stays a function of (seed, batch, applied feedback) and is saved and resumed.
        """
        self.table.num_skipped += self.order.prime(indices, losses)

    def flush(self) -> None:
        """Apply all buffered feedback now, whatever its step (for analysis and offline use).

        Draws after a flush are still a pure function of the call sequence, but differ from a run
        without the flush.
        """
        self.order.flush()

    def drawn_batch(self, b: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Global batch ``b`` as ``(indices of all ranks, their draw probabilities)`` while it is buffered
        (drawn and not yet known to be trained); ``None`` otherwise. Read-only."""
        return self.order.drawn.get(check_step(b, "b"))

    # ------------------------------------------------------------------------------------ queries
    def probabilities(self) -> np.ndarray:
        """The distribution (float64, length N, sums to 1) the most recent batch was drawn from.

        Before the first draw: the distribution the first batch would be drawn from given the
        feedback applied so far. Read-only: querying never changes the sample order. O(N).
        """
        return self.order.weights.probabilities()

    def importance_weights(self, indices: Any, step: int | None = None) -> np.ndarray:
        """``1 / (N p_i)`` for ``indices``: multiply per-sample losses by these to train the ERM objective.

        With ``step`` (the global batch the indices were drawn in, while it is still buffered) the
        probabilities the batch was actually drawn with are used; otherwise those of
        :meth:`probabilities`. Finite for every sample while ``uniform_mix > 0``. Under balanced draws
        ``p_i(b)`` is still each sample's expected share of batch ``b``, so the weighted mean over many
        batches estimates the uniform mean, with an error bounded through the count bound.
        """
        idx = as_indices(indices, self.dataset_size)
        weights = self.order.weights
        p = None if step is None else self.order.drawn.probabilities_of(check_step(step), idx)
        if p is None:
            p = self.probabilities()[idx] if weights.params is None else weights.point_probabilities(idx)
        with np.errstate(divide="ignore"):
            return 1.0 / (self.dataset_size * p)

    def stats(self) -> dict[str, float]:
        """Diagnostics of the current distribution (O(N)) and of the feedback stream."""
        params, kept = self.order.weights.fit_and_kept()
        return {
            **weighting_diagnostics(self.probabilities(), self.table, params, kept_count=kept),
            "pending_feedback": float(len(self.order.feedback.pending)),
            "rekeys": float(self.draw_scheme.rekeys),
            "last_drawn_batch": float(self.order.last_drawn),
            **{k: float(v) for k, v in self.order.counters().items()},
        }

    def fingerprint(self) -> int:
        """A signed 64-bit digest of everything that decides the sample order; equal on ranks that agree.

        It covers the seed, the data set size and batch geometry, every option of the weighting rule and
        the loss table, ``feedback_delay``, ``refresh_interval``, the draw scheme and its options
        (``block_size`` under i.i.d. draws), and every feedback record applied so far (a running digest, O(1) per call,
        saved in :meth:`state_dict`); not the rank. Compare it across ranks to catch diverging samplers
        (the Composer ``IRDRO`` algorithm does; in a plain loop ``dist.all_gather_object``).
        """
        options = (
            self.seed, self.dataset_size, self.num_samples, self.batch_size, self.num_replicas,
            self.feedback_delay, self.refresh_interval, *self.draw_scheme.config().values(),
            self.rule.identity(), self.table.ema, self.table.prior, self.table.groups_digest(), self.draws,
        )  # fmt: skip
        return options_fingerprint(options, key=self.order.feedback.digest)

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the future sample order: tensors and primitives only."""
        return pack_state(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, rank: int = 0) -> IRDROSampler:
        """A sampler rebuilt from :meth:`state_dict` alone (for inspection, or to resume on ``rank``).

        The state is checked in full before anything is allocated: its sizes must match its arrays,
        so a small file cannot claim a huge data set.
        """
        checked = check_state(state)
        sampler = cls(checked["dataset_size"], checked["batch_size"], num_samples=checked["num_samples"],
                      num_replicas=checked["num_replicas"], rank=rank, draws=checked["draws"].name)
        restore_state(sampler, checked)
        return sampler

    @classmethod
    def from_weights(cls, weights: Any, batch_size: int, *, uniform_mix: float = 0.0, **options: Any) -> IRDROSampler:
        """A distributed, resumable weighted sampler with weights the user sets (no losses needed):
        ``p_i = (1 - uniform_mix) w_i / sum(w) + uniform_mix / N`` for every batch, drawn as always
        (balanced by default; ranks take disjoint shares; exact resumption; any N). ``options`` are the
        constructor's, without rule options. See :func:`~irdro_sampler.fixed_weights.weighted_sampler`.
        """
        return weighted_sampler(cls, weights, batch_size, uniform_mix=uniform_mix, **options)

    @staticmethod
    def check_state_dict(state: Any) -> None:
        """Raise ``ValueError`` naming the entry unless ``state`` is a well-formed :meth:`state_dict`
        (every entry checked, as :meth:`load_state_dict` does, except the match with a sampler)."""
        check_state(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the run then continues exactly.

        Every option that decides the order (seed, rule, delays, refresh interval, the draw scheme and
        its state under ``state['balanced']``; a state without it resumes i.i.d. draws) is taken from the
        state. The whole state is checked first (the data set size and batch geometry must match this
        sampler's): ``ValueError`` naming the entry, and the sampler is left exactly as it was. To keep
        only the learned losses under new options, load ``state["table"]`` into ``sampler.table`` instead.
        """
        checked = check_state(state)
        for key, mine in (
            ("dataset_size", self.dataset_size),
            ("num_samples", self.num_samples),
            ("batch_size", self.batch_size),
            ("num_replicas", self.num_replicas),
        ):
            if checked[key] != mine:
                raise ValueError(
                    f"state_dict['{key}'] is {checked[key]} but this sampler has {key}={mine}; "
                    "a sampler state only resumes a run over the same data set and batch geometry"
                )
        restore_state(self, checked)

def _as_data_source(data_source_or_size: Sized | int) -> tuple[Sized, int]:
    if isinstance(data_source_or_size, bool):
        raise TypeError(f"data_source_or_size must be a sized data set or an int, got {data_source_or_size!r}")
    if isinstance(data_source_or_size, int):
        size = check_int(data_source_or_size, "data_source_or_size", minimum=1)
        return range(size), size
    size = len(data_source_or_size)
    if size < 1:
        raise ValueError(f"data_source_or_size must not be empty, got a data set of length {size}")
    return data_source_or_size, size


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """``num_replicas`` and ``rank`` checked, from ``torch.distributed`` where not given."""
    initialized = process_group_up()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    num_replicas = check_int(num_replicas, "num_replicas", minimum=1)
    rank = check_int(rank, "rank", minimum=0)
    if rank >= num_replicas:
        raise ValueError(f"rank must lie in [0, {num_replicas}), got {rank}")
    return num_replicas, rank
