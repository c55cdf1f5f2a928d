"""ShardedIRDROSampler: the loss table spread over the ranks of a process group (experimental).

Each rank keeps the rows of its virtual shards only (:mod:`irdro_sampler.virtual_shards`): the running
losses (:class:`LossTable` over its id range) and the draw structure of its ids, a scheme of
:mod:`irdro_sampler.sharded_schemes` chosen by name (``draws="iid"``: one sum tree of masses per shard;
``draws="balanced"``: the stride scheme's credits). Per-rank memory is the unsharded sampler's bytes
per sample times N / world. Every rank still receives the gathered feedback of all ranks (as with
:class:`IRDROSampler`) and applies the part it owns; the refresh fits the rule with
:func:`~irdro_sampler.distributed_fit.fit_sharded` (exactly the unsharded fit) and the scheme draws
the global batch. So global batch ``b`` is a pure function of (seed, ``b``, applied feedback) and of
nothing about the world size: the same run on 1, 2 or 4 ranks draws the same global batches (tested,
both schemes), which is what makes an elastic restart exact.

Every draw and refresh is a collective: all ranks iterate in step (as DataLoaders over a sampler do).
So are :meth:`~ShardedIRDROSampler.importance_weights` (without a buffered ``step``),
:meth:`~ShardedIRDROSampler.stats` and :meth:`~ShardedIRDROSampler.local_probabilities`
(:mod:`irdro_sampler.sharded_queries`). Composer: :mod:`irdro_sampler.integrations.composer` (``ShardedSamplerTarget``);
the Hugging Face Trainer: :mod:`irdro_sampler.integrations.hf_sharded` (``IRDROTrainer(irdro=dict(sharded=True))``);
Lightning: :mod:`irdro_sampler.integrations.lightning_sharded`.
The streaming path has its own sharded form (:mod:`irdro_sampler.sharded_rounds`,
``integrations.streaming_sharded``); what is not built yet is listed in ``docs/sharding.md``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import sharded_queries, sharded_state
from ._validation import check_int
from .distributed_fit import fit_sharded
from .drawn_batches import DrawnBatches
from .feedback import FeedbackQueue, Record
from .fingerprint import options_fingerprint
from .layout import BatchLayout
from .loss_table import DEFAULT_EMA, DEFAULT_PRIOR, LossTable
from .screening import check_block_only
from .sharded_draws import reduce_totals
from .sharded_schemes import ShardedDrawScheme, sharded_draw_scheme
from .tilted_masses import TOTAL_RANGE
from .virtual_shards import VirtualShards, default_num_shards
from .weights import (
    DROWeighting,
    WeightParams,
    cut_transitions,
    finish_max_kept,
    first_losses_for,
    max_kept_parts,
)


class ShardedIRDROSampler(torch.utils.data.Sampler[int]):
    """IR-DRO draws with the loss table sharded over the ranks of ``group``.

    Args:
        dataset_size: N, the samples of the whole data set.
        batch_size: per rank; the global batch is ``batch_size * world``.
        num_shards: virtual shards (a power of two, fixed for the run; default
            :func:`~irdro_sampler.virtual_shards.default_num_shards`).
        groups: ``None``, or a callable ``(start, stop) -> group ids of samples [start, stop)`` (so a
            rank never holds the ids of samples it does not own).
        group: the process group (default: the world).
        draws: ``"iid"`` (default) or ``"balanced"`` (:mod:`irdro_sampler.sharded_schemes`; the unsharded
            sampler's default is ``"balanced"``, whose per-step cost here is still being measured).
        the rest: as :class:`IRDROSampler` (``seed``, ``feedback_delay``, ``refresh_interval``,
            ``num_samples`` per rank per epoch, ``ema``, ``prior`` and :class:`DROWeighting`'s options).
    """

    def __init__(
        self, dataset_size: int, batch_size: int, *, num_shards: int | None = None, groups: Any = None,
        group: Any = None, draws: str = "iid", seed: int = 0, feedback_delay: int = 32,
        refresh_interval: int | None = None, num_samples: int | None = None, ema: float = DEFAULT_EMA, prior: float | str = DEFAULT_PRIOR,
        **rule_options: Any,
    ) -> None:
        n = check_int(dataset_size, "dataset_size", minimum=1)
        scheme_cls = sharded_draw_scheme(draws)
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.shards = VirtualShards(n, default_num_shards(n) if num_shards is None else num_shards)
        self.start, self.stop = self.shards.ids_of_rank(self.rank, self.world)
        # Checked for every rank on every rank, so that all raise together (none waits in a collective).
        empty = [r for r in range(self.world) if not np.subtract(*self.shards.ids_of_rank(r, self.world))]
        if empty:
            raise ValueError(f"num_shards={self.shards.num_shards} leaves rank {empty[0]} of {self.world} no samples "
                             f"of dataset_size={n}: use at least as many non-empty shards as ranks")
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        per_rank = -(-n // self.world) if num_samples is None else check_int(num_samples, "num_samples", minimum=1)
        self.layout = BatchLayout(per_rank, self.batch_size, self.world, self.rank)
        self.seed = check_int(seed, "seed", minimum=0)
        self.feedback_delay = check_int(feedback_delay, "feedback_delay", minimum=1)
        if refresh_interval is None:
            refresh_interval = max(4, n // (16 * self.layout.global_batch_size))
        self.refresh_interval = check_int(refresh_interval, "refresh_interval", minimum=1)
        self.rule = DROWeighting(**rule_options)
        local_groups = None if groups is None else groups(self.start, self.stop)
        self.table = LossTable(self.stop - self.start, ema=ema, prior=prior, groups=local_groups,
                               track_first_losses=self.rule.reads_first_losses)
        self.scheme: ShardedDrawScheme = scheme_cls(
            self.shards, self.rank, self.world, global_batch=self.layout.global_batch_size,
            uniform_mix=self.rule.uniform_mix, seed=self.seed, group=group)
        self.feedback = FeedbackQueue(n)
        self.drawn = DrawnBatches()
        self.params: WeightParams | None = None
        self.refresh_block = -1
        self.last_drawn = -1
        self.epoch = 0
        self.rebases = 0  # shifts re-chosen because a mass overflowed or the total left its range
        self.refreshes = 0  # refits (every rank alike)
        # Feedback on this rank's samples that were cut, and of those the ones kept again (summed in stats()).
        self.remeasured_cut = self.readmitted = 0
        self.start_batch = 0  # where the next iter() starts (set_start_batch), saved in common.pt

    @property
    def dataset_size(self) -> int:
        return self.shards.dataset_size

    @property
    def draws(self) -> str:
        """The draw scheme's name (``'iid'`` or ``'balanced'``)."""
        return self.scheme.name

    @property
    def batches_per_epoch(self) -> int:
        return self.layout.batches_per_epoch

    def __len__(self) -> int:
        return self.layout.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int(epoch, "epoch", minimum=0)

    def set_start_batch(self, batch_in_epoch: int) -> None:
        """Make the next ``iter()`` (only) start at ``batch_in_epoch`` of the current epoch, as
        :meth:`IRDROSampler.set_start_batch` (for loops that resume mid-epoch without replaying the batches
        already trained). Local: call it on every rank alike. Saved by :meth:`save`."""
        start = check_int(batch_in_epoch, "batch_in_epoch", minimum=0)
        if start > self.batches_per_epoch:
            raise ValueError(f"batch_in_epoch must be <= {self.batches_per_epoch}, got {batch_in_epoch}")
        self.start_batch = start

    def __iter__(self) -> Iterator[int]:
        for batch in self.iter_batches():
            yield from batch.tolist()

    def iter_batches(self) -> Iterator[np.ndarray]:
        """This rank's batches of the current epoch from :meth:`set_start_batch`'s (each drawn when requested;
        a collective). A history-dependent scheme draws the batches skipped first, as :meth:`batch` does."""
        start, self.start_batch = self.start_batch, 0
        for j in range(start, self.batches_per_epoch):
            b = self.epoch * self.batches_per_epoch + j
            yield self.batch(b)[0][self.layout.rank_slice(b)]

    def update(self, indices: Any, losses: Any, step: int | None = None) -> None:
        """The gathered feedback of all ranks (every rank makes the same call), as :meth:`IRDROSampler.update`."""
        self.feedback.add(indices, losses, step)
        self.drawn.forget_trained(self.feedback.max_reported_step)

    def prime(self, indices: Any, losses: Any) -> None:
        """Losses measured before training (a scoring pass), as :meth:`IRDROSampler.prime`: applied at once,
        the first batch drawn from the rule fitted on them. Same contract as :meth:`update`: every rank makes
        the same calls with the same arrays (each keeps the rows it owns; a data set too large for one call
        is passed in chunks, in the same order on every rank), and the chained digest of what was applied is
        compared at the next draw. Only before the first draw (``ValueError`` after, and on bad input,
        changing nothing)."""
        if self.last_drawn >= 0:
            raise ValueError(f"prime() takes losses measured before training, but batch {self.last_drawn} was "
                             "already drawn: report losses of trained batches with update()")
        record, _ = self.feedback.prime(indices, losses)  # non-finite losses dropped, counted by the queue
        self._apply([record], update_masses=False)
        self.params = None  # refitted at the first draw, from the primed table

    # ------------------------------------------------------------------------------------ drawing
    def batch(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Global batch ``b``: ids of all ranks and their draw probabilities (a collective)."""
        buffered = self.drawn.get(b)
        if buffered is not None:
            return buffered
        replay = b <= self.last_drawn  # no longer buffered: drawn again from the current weights, no state change
        if replay and b > self.feedback.max_reported_step:  # not yet trained, yet no longer buffered
            self.drawn.stale_replays += 1
        if not replay and self.scheme.depends_on_history:
            for skipped in range(self.last_drawn + 1, b):  # as IRDROSampler: a late start draws them first
                self.batch(skipped)
        totals = None if replay else self._advance_to(b)
        out = self.scheme.draw(b, self.layout.global_size(b), totals, commit=not replay)
        if not replay:
            self.drawn.put(b, out, self.feedback_delay)
            self.last_drawn = b
        return out

    def _advance_to(self, b: int) -> np.ndarray:
        """Apply the feedback due at ``b`` (refit at a new refresh block); the reduced shard totals."""
        due = self.feedback.take_due(b - self.feedback_delay)
        self.feedback.mark_applied(b - self.feedback_delay)
        refit = self.params is None or b // self.refresh_interval != self.refresh_block
        if refit:
            self._apply(due, update_masses=False)
            self.refresh_block = b // self.refresh_interval
            self.refreshes += 1
            self.params = fit_sharded(self.rule, self.table, self.start, self.dataset_size, self.group)
            self._rebuild()
            bad = False
        else:
            bad = self._apply(due, update_masses=True)
        # One collective: the shard totals, whether any rank saw a mass overflow (both decide a rebase on
        # every rank alike) and whether all ranks applied the same feedback so far.
        totals, overflowed, agree = reduce_totals(self.scheme, float(bad), self.feedback.digest, self.group)
        if not agree:
            raise RuntimeError(
                f"ShardedIRDROSampler: the ranks applied different feedback by batch {b} (a record dropped, "
                "duplicated or changed on some rank): every rank must call update() with the same gathered "
                "feedback of all ranks")
        rebase = not refit and (overflowed > 0 or not TOTAL_RANGE[0] <= float(totals.sum()) <= TOTAL_RANGE[1])
        self.scheme.settle(discard=rebase)  # every rank alike: a mass change applied nowhere or everywhere
        if rebase:
            self._rebase()
            totals = reduce_totals(self.scheme, group=self.group)[0]
        return totals

    def _apply(self, records: list[Record], *, update_masses: bool) -> bool:
        """Apply the owned part of due records to the local table (and masses); True if a mass overflowed."""
        touched: list[tuple] = []
        for step, _, idx, val in records:
            own = (idx >= self.start) & (idx < self.stop)
            if own.any():
                uniq, old, new = self.table._apply(idx[own] - self.start, val[own], step)
                gathered = None
                if self.params is not None:
                    grp = None if self.table.groups is None else self.table.groups[uniq]
                    first = first_losses_for(self.table, self.params, uniq)
                    remeasured, readmitted = cut_transitions(old, new, self.params, grp, first)
                    self.remeasured_cut += remeasured
                    self.readmitted += readmitted
                    gathered = (new, grp, first)
                touched.append((uniq, gathered))
        if not update_masses or not touched:
            return False
        if len(touched) == 1:  # the common case: the arrays gathered above are those of the changed samples
            local, gathered = touched[0]
        else:
            local, gathered = np.unique(np.concatenate([u for u, _ in touched])), None
        mass = self.rule.masses_at(self.table, local, self.params, gathered=gathered)[0]
        if not np.all(np.isfinite(mass)):
            return True
        self.scheme.set_masses(local + self.start, mass)
        return False

    def _rebase(self) -> None:
        best, unseen = max_kept_parts(self.table.losses, self.params, self.table.groups, first=self.table.first_losses)
        both = torch.tensor([best, float(unseen)], dtype=torch.float64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        shift = finish_max_kept(float(both[0]), bool(both[1]), self.params.prior)
        self.params = self.params._replace(shift=shift)
        self.rebases += 1
        self._rebuild()

    def _rebuild(self) -> None:
        """Every owned mass from the table under the current params (O(N / world))."""
        start = self.start
        self.scheme.fill(lambda a, z: self.rule.masses_at(self.table, slice(a - start, z - start), self.params)[0])

    # ------------------------------------------------------------------------------------ queries
    def importance_weights(self, indices: Any, step: int | None = None) -> np.ndarray:
        """``1 / (N p_i)`` for ``indices`` (this rank's; any global ids, any number per rank), as
        :meth:`IRDROSampler.importance_weights`.

        With ``step`` (a global batch still buffered, the same on every rank) ``p_i`` is the probability the
        batch drew the id with: local, no communication; an id the batch did not draw is a ``ValueError``.
        Otherwise (no ``step``, or not buffered) ``p_i`` is the current distribution's, which needs the
        owners' masses: **a collective**, every rank calls it (O(ids of all ranks + S) traffic; bad indices
        on one rank raise on every rank). Finite while ``uniform_mix > 0``.
        """
        return sharded_queries.importance_weights(self, indices, step)

    def screen(self, indices: Any, losses: Any, *, block_only: bool = False) -> np.ndarray:
        """Which of this rank's samples of a batch to learn from, as :meth:`IRDROSampler.screen`: ``False`` for a
        first visit (no loss of it in its owner's rows) whose loss the cut of the last refit would take.

        **A collective**: every rank calls it, once per micro-batch, in the same order (O(ids of all ranks)
        traffic: each owner judges the ids it holds). Same contract as the unsharded screen: read-only, all
        ``True`` before the first refit and for non-finite losses; bad input on any rank raises on every rank.
        ``block_only`` (the same on every rank) as :meth:`IRDROSampler.screen`: only first visits inside the
        refit's block of unlearnable samples.
        """
        return sharded_queries.screen(self, indices, losses, check_block_only(block_only))

    def local_probabilities(self) -> np.ndarray:
        """The current distribution over this rank's ids ``[start, stop)`` (float64; the ranks' parts
        together are :meth:`IRDROSampler.probabilities`). A collective (O(S) traffic), O(N / world)."""
        return sharded_queries.local_probabilities(self)

    def stats(self) -> dict[str, float]:
        """The diagnostics of :meth:`IRDROSampler.stats`, all keys, for the global distribution (a
        collective: O(S) + O(1) reduced numbers, O(N / world) work; see :func:`sharded_queries.stats`).
        ``remeasured_cut`` and ``readmitted`` are summed over ranks; :meth:`save` keeps every counter (their
        totals), so they continue after :meth:`load` on any world size."""
        return sharded_queries.stats(self)

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's O(N / world) structures: its table rows and its draw scheme's."""
        return self.table.nbytes + self.scheme.nbytes

    def save(self, folder: str | os.PathLike) -> None:
        """Save into ``folder``, one row file per rank plus ``common.pt`` (a collective; see
        :mod:`irdro_sampler.sharded_state`)."""
        sharded_state.save(self, folder)

    def load(self, folder: str | os.PathLike) -> None:
        """Restore from ``folder`` saved on any number of ranks over the same shards (a collective)."""
        sharded_state.load(self, folder)

    def fingerprint(self) -> int:
        """Equal on ranks that agree, and across world sizes: options and every applied feedback record."""
        options = (self.seed, self.dataset_size, self.shards.num_shards, self.layout.num_samples * self.world,
                   self.feedback_delay, self.refresh_interval, self.rule.identity(), self.table.ema, self.table.prior,
                   self.scheme.name)
        return options_fingerprint(options, key=self.feedback.digest)
