"""IRDROSampler: draw training indices from closed-form KL-DRO weights of running losses (balanced or i.i.d.)."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from ._validation import (
    MAX_LOSS,
    MAX_STEP,
    as_indices,
    check_int,
    check_range,
    check_step,
    state_array,
    state_entry,
    state_int,
    validate_feedback,
)
from .fingerprint import EMPTY_DIGEST as _EMPTY_DIGEST
from .fingerprint import chain_digest as _chain_digest
from .fingerprint import digest_to_int, table_digest
from .loss_table import LossTable, check_table_state, count_groups
from .stride import StrideScheduler
from .sum_tree import FanoutSumTree, LeafMasses
from .weights import (
    DROWeighting,
    WeightParams,
    cut_transitions,
    distribution_stats,
    kept_mask,
    masses,
    max_kept_loss,
    mixture_probabilities,
)

STATE_FORMAT = "irdro_sampler.IRDROSampler"
STATE_VERSION = 1
# Rebase (re-shift) the masses when their total leaves this range: far from overflow
# (N * e^600 < 1e308 for N < 2**31) and far from the subnormal range where masses lose precision.
_TOTAL_RANGE = (1e-250, 1e280)
_REBUILD_CHUNK = 1 << 22
DRAW_SCHEMES = ("balanced", "iid")


class IRDROSampler(DistributedSampler):
    """Sample indices with probability given by closed-form KL-DRO weights of running losses.

    Usage::

        ds = IndexedDataset(my_dataset)            # samples carry their index as "sample_idx"
        sampler = IRDROSampler(ds, batch_size=32, groups=labels)  # groups: optional, e.g. class labels
        loader = DataLoader(ds, batch_size=32, sampler=sampler)
        for step, batch in enumerate(loader):
            per_sample = loss_fn(model(batch), reduction="none")
            per_sample.mean().backward(); ...
            sampler.update(batch["sample_idx"], per_sample.detach(), step=step)

    **Distribution.** Batch ``b`` is drawn from
    ``p_i(b) = (1 - uniform_mix) * softmax(l / tau)_i + uniform_mix / N`` (see :class:`DROWeighting`):
    ``l`` is each sample's running loss (:class:`LossTable`); seen samples whose loss is above the cut
    get no tilted mass, only the floor ``uniform_mix / N``, so they are measured again now and then
    and come back when their loss is ordinary (counted as ``remeasured_cut`` and ``readmitted`` in
    :meth:`stats`). :meth:`probabilities` returns the exact distribution the next batch is drawn from.

    **Draws.** ``draws="balanced"`` (default): each batch takes the samples most overdue, by stride
    scheduling on per-sample credits ``E_i - D_i + theta_i`` (owed draws ``E_i = sum_b G_b p_i(b)``,
    drawn ``D_i``, a seeded phase replaced at every draw; :mod:`irdro_sampler.stride`). With flat
    weights every epoch yields every sample exactly once, in a new seeded order per epoch (ranks'
    shares disjoint); with changing weights every cumulative count stays within 2 of ``E_i``
    (tested; 1.84 at worst); ``p_i(b)`` is still each sample's expected share of batch ``b``. ``draws="iid"``: i.i.d.
    draws with replacement from ``p(b)`` (a sample may repeat within a batch in both schemes when
    ``G_b p_i(b) > 1``).

    **Options.** ``**rule_options`` are :class:`DROWeighting`'s fields (``temperature``/``ess_fraction``/
    ``kl_radius``, ``truncate_zscore``, ``cut_rule``, ``truncate_quantile``, ``uniform_mix``), validated
    there; by default tau is calibrated to an effective sample size of 90% of the kept samples
    (scale-free). ``groups`` (one int in [0, 65536) per sample, e.g. class labels or data sources) makes
    the cut judge each sample against its own group; ``ema`` and ``prior`` configure the
    :class:`LossTable`.

    **Order contract.** Global batch ``b`` (counted from 0 over all epochs,
    ``b = epoch * batches_per_epoch + batch_in_epoch``) is drawn with a random stream keyed by
    ``(seed, b)`` from the weights after applying exactly the feedback of steps ``<= b - feedback_delay``
    (in step order, then call order) -- and, for balanced draws, from the credits the earlier batches
    left (batches a late-starting loop skipped are drawn first, internally). Hence the indices are a
    pure function of (seed, batch, feedback):
    independent of DataLoader workers and prefetching, and a sampler restored with
    :meth:`load_state_dict` continues with exactly the indices the uninterrupted run drew.
    ``feedback_delay`` (default 32) must exceed the number of batches the DataLoader draws ahead of the
    training step (``num_workers * prefetch_factor``; 2 x 2 = 4 by default): the default covers up to
    15 workers at prefetch factor 2. Feedback that arrives after its batch was drawn is applied before
    the next draw and counted as ``late_feedback`` in :meth:`stats` (the run stays valid but is then no
    longer bitwise reproducible).

    **Epochs.** An epoch yields ``num_samples`` indices on each rank (default ``ceil(N / num_replicas)``),
    in ``batches_per_epoch`` batches of ``batch_size`` (the last may be shorter), so learning-rate
    schedules keep their step counts. As with ``DistributedSampler``, call :meth:`set_epoch` before each
    epoch; every ``iter()`` starts the current epoch at its first batch (or at the batch given to
    :meth:`set_start_batch`, for loops that resume mid-epoch without replaying). Batches that were drawn
    before (a replay after a restore, as Composer does) are served again from a small buffer and never
    change the state; a replay older than the buffer is drawn from the current weights, without
    applying feedback, and counted as ``stale_replays``.

    **Multiple ranks.** All ranks draw the same global batch of ``batch_size * num_replicas`` and rank
    ``r`` yields positions ``[r * batch_size, (r + 1) * batch_size)``. The sampler never communicates:
    the caller must give every rank the same :meth:`update` calls (gather the feedback of all ranks).

    **Cost.** Updates and draws are O(B log N) through a sum tree whose leaves are the per-sample
    masses and whose nodes have ``block_size`` children (:class:`FanoutSumTree`; 1 counts as 2). Every
    ``refresh_interval`` global batches (default ``max(4, N // (16 * global_batch))``) the prior, cut
    threshold and temperature are recomputed and the tree is rebuilt, O(N). Memory: 12 bytes per
    sample for the table plus ``8 * block_size / (block_size - 1)`` for the tree (21.1 bytes in all at
    the default 8). Balanced draws keep no sum tree (nothing searches it): each sample's mass, credit
    offset and draw count share a 16-byte record, the masses' total is a running sum (saved in the
    state), and a batch descends a 4.6-byte-per-sample min-tree of due times (O(B log N) too; an O(N)
    re-key at each refresh and when the total drifts by more than 1/8): 32.6 bytes per sample in all.
    Measured costs at N = 1e5..1e8, both schemes: ``benchmarks/RESULTS_sampler.md``.

    **Bad input.** :meth:`update` raises ``ValueError``/``TypeError`` (and changes nothing) for indices
    out of range or not integers, and length mismatches; NaN/inf losses and finite ones beyond float32's
    range are skipped and counted (``skipped_nonfinite``). Constructor options are validated
    (non-positive temperature, conflicting ``temperature``/``kl_radius``/``ess_fraction``...).
    :meth:`load_state_dict` checks the whole state first and refuses (changing nothing) a malformed one
    or one from a data set of another size or another batch geometry (a malformed balanced-draws block
    included). ``draws`` other than ``'balanced'``/``'iid'`` raises ``ValueError``.

    **Ranks that agree** have equal :meth:`fingerprint` values; compare them across ranks now and then.
    """

    def __init__(
        self,
        data_source_or_size: Sized | int,
        batch_size: int,
        *,
        groups: Any = None,
        ema: float = 0.5,
        prior: float | str = "mean",
        feedback_delay: int = 32,
        refresh_interval: int | None = None,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        block_size: int = 8,
        draws: str = "balanced",
        **rule_options: Any,
    ) -> None:
        if isinstance(data_source_or_size, bool):
            raise TypeError(f"data_source_or_size must be a sized data set or an int, got {data_source_or_size!r}")
        if isinstance(data_source_or_size, int):
            size = check_int(data_source_or_size, "data_source_or_size", minimum=1)
            data_source: Sized = range(size)
        else:
            data_source = data_source_or_size
            size = len(data_source)
            if size < 1:
                raise ValueError(f"data_source_or_size must not be empty, got a data set of length {size}")
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        num_replicas = check_int(num_replicas, "num_replicas", minimum=1)
        rank = check_int(rank, "rank", minimum=0)
        if rank >= num_replicas:
            raise ValueError(f"rank must lie in [0, {num_replicas}), got {rank}")
        seed = check_int(seed, "seed", minimum=0)
        if not isinstance(draws, str) or draws not in DRAW_SCHEMES:
            raise ValueError(f"draws must be 'balanced' or 'iid', got {draws!r}")
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)

        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        per_rank = math.ceil(size / num_replicas) if num_samples is None else num_samples
        self.num_samples = check_int(per_rank, "num_samples", minimum=1)
        self.total_size = self.num_samples * num_replicas
        self.batches_per_epoch = math.ceil(self.num_samples / self.batch_size)
        self.global_batch_size = self.batch_size * num_replicas

        self.rule = DROWeighting(**rule_options)
        self.table = LossTable(size, ema=ema, prior=prior, groups=groups)
        self.feedback_delay = check_int(feedback_delay, "feedback_delay", minimum=1)
        if refresh_interval is None:
            # Recalibrate after ~1/16 of the data set has been drawn, at least every 4 batches: the
            # O(N) refresh then costs a fraction of a step, and prior/cut/temperature move slowly.
            refresh_interval = max(4, size // (16 * self.global_batch_size))
        self.refresh_interval = check_int(refresh_interval, "refresh_interval", minimum=1)
        self.block_size = check_int(block_size, "block_size", minimum=1)
        self._tree, self._stride = _draw_structures(
            size, self.block_size, self.global_batch_size, self.rule.uniform_mix, self.seed,
            balanced=draws == "balanced",
        )
        self._reset_schedule()

    @property
    def draws(self) -> str:
        """The draw scheme: ``'balanced'`` (stride scheduling on credits) or ``'iid'``."""
        return "iid" if self._stride is None else "balanced"

    # ------------------------------------------------------------------------------------ schedule
    def _reset_schedule(self) -> None:
        self._params: WeightParams | None = None
        self._n_kept = 0
        self._pending: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # (step, seq, idx, loss)
        self._seq = 0
        self._next_auto_step = 0
        self._applied_through = -1  # feedback of steps <= this is in the table
        self._last_drawn = -1
        self._refresh_block = -1  # b // refresh_interval at the last refresh
        self._max_reported_step = -1
        self._drawn: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # b -> (indices, probabilities)
        self._start_batch = 0
        self._counters = dict.fromkeys(
            ("late_feedback", "skipped_nonfinite", "stale_replays", "refreshes", "rebases", "remeasured_cut",
             "readmitted"),
            0,
        )
        self._feedback_digest = _EMPTY_DIGEST  # chained over every applied feedback record

    @property
    def dataset_size(self) -> int:
        return self.table.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch the next ``iter()`` yields (as ``DistributedSampler.set_epoch``)."""
        self.epoch = check_int(epoch, "epoch", minimum=0)

    def set_start_batch(self, batch_in_epoch: int) -> None:
        """Make the next ``iter()`` (only) start at ``batch_in_epoch`` of the current epoch.

        For training loops that resume mid-epoch without replaying the batches already trained.
        Composer replays them, so it does not need this.
        """
        start = check_int(batch_in_epoch, "batch_in_epoch", minimum=0)
        if start > self.batches_per_epoch:
            raise ValueError(f"batch_in_epoch must be <= {self.batches_per_epoch}, got {batch_in_epoch}")
        self._start_batch = start

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self._start_batch
        self._start_batch = 0
        already_trained = (epoch + 1) * self.batches_per_epoch - 1 <= self._max_reported_step
        for j in range(start, self.batches_per_epoch):
            n = min(self.batch_size, self.num_samples - j * self.batch_size)
            indices, _ = self._batch(epoch * self.batches_per_epoch + j, n * self.num_replicas)
            yield from indices[self.rank * n : (self.rank + 1) * n].tolist()
        if already_trained:
            # A whole epoch re-iterated after it was trained: the loop forgot set_epoch(), and the
            # feedback of later steps never comes due. (Composer's spin over finished epochs on
            # resume reads only their first batches, so it does not get here.)
            warnings.warn(
                f"IRDROSampler: epoch {epoch} was iterated again after it was trained (feedback "
                f"reported up to step {self._max_reported_step}); call sampler.set_epoch(epoch) "
                "before each epoch",
                stacklevel=2,
            )

    # ------------------------------------------------------------------------------------ feedback
    def update(self, indices: Any, losses: Any, step: int | None = None) -> None:
        """Report per-sample losses of the samples trained at global batch ``step``.

        ``indices`` and ``losses`` are 1-D (lists, numpy arrays or tensors on any device) of equal
        length; an index may repeat (draws are with replacement). ``step`` defaults to the previous
        step + 1. The feedback is buffered and applied just before drawing batch
        ``step + feedback_delay``. Raises (changing nothing) on bad input; see the class docstring.
        """
        idx, val, skipped = validate_feedback(indices, losses, self.dataset_size)
        step = self._next_auto_step if step is None else check_step(step)
        self._counters["skipped_nonfinite"] += skipped
        self.table.num_skipped += skipped
        if step <= self._applied_through:
            self._counters["late_feedback"] += 1
        self._pending.append((step, self._seq, idx, val))
        self._seq += 1
        self._next_auto_step = max(self._next_auto_step, step + 1)
        self._max_reported_step = max(self._max_reported_step, step)
        # Batches up to the last reported step have been trained: they will not be replayed.
        for b in [b for b in self._drawn if b < self._max_reported_step]:
            del self._drawn[b]

    def flush(self) -> None:
        """Apply all buffered feedback now, whatever its step (for analysis and offline use).

        Draws after a flush are still a pure function of the call sequence, but differ from a run
        without the flush.
        """
        self._ensure_params()
        self._apply_feedback(math.inf)

    def _apply_feedback(self, through: float) -> None:
        due = [e for e in self._pending if e[0] <= through]
        if not due:
            return
        self._pending = [e for e in self._pending if e[0] > through]
        due.sort(key=lambda e: (e[0], e[1]))
        params = self._params
        touched = []
        for step, _, idx, val in due:
            self._feedback_digest = _chain_digest(self._feedback_digest, step, idx, val)
            uniq, old, new = self.table._apply(idx, val, step)
            if params is not None and uniq.size:
                # Entries are applied in order, so each one's old/new kept flags give the exact change.
                grp = self._groups_of(uniq)
                remeasured, readmitted = cut_transitions(old, new, params, grp)
                self._n_kept += int(np.count_nonzero(kept_mask(new, params, grp))) - (uniq.size - remeasured)
                self._counters["remeasured_cut"] += remeasured
                self._counters["readmitted"] += readmitted
                touched.append((uniq, new))
        if params is None or not touched:
            return
        if len(touched) == 1:
            uniq, new = touched[0]
        else:
            uniq = np.unique(np.concatenate([u for u, _ in touched]))
            new = self.table.losses[uniq]
        mass = masses(new, params, self._groups_of(uniq))[0]
        if not np.all(np.isfinite(mass)):  # a loss far above the shift: re-choose the shift
            self._rebuild(rebase=True)
            return
        stride = self._stride
        if stride is None:
            self._tree._set(uniq, mass)  # sorted distinct in-range indices, finite masses >= 0: checked
        else:
            old = self._tree.levels[0][uniq]
            rekey = not stride.mass_changed(uniq, old, mass)
            if rekey:
                stride.rekey()  # fold every credit under the old masses
            self._tree._set(uniq, mass, old)
            if rekey:
                stride.set_reference(self._tree.total)
            else:
                stride.keys_changed(uniq)
        if not _TOTAL_RANGE[0] <= self._tree.total <= _TOTAL_RANGE[1]:
            self._rebuild(rebase=True)

    def _advance_to(self, b: int) -> None:
        """Bring the weights to the state batch ``b`` is drawn from (idempotent for the same ``b``)."""
        self._apply_feedback(b - self.feedback_delay)
        self._applied_through = max(self._applied_through, b - self.feedback_delay)
        # Also refresh when every sample became cut since the last refresh (nothing left to draw from).
        if self._params is None or b // self.refresh_interval != self._refresh_block or self._n_kept == 0:
            self._refresh_block = b // self.refresh_interval
            self._params = self.rule.fit(self.table)
            self._counters["refreshes"] += 1
            self._rebuild(rebase=False)
        elif self._stride is not None and self._stride.needs_rekey(self._tree.total):
            # The total drifted from the one the keys assume: re-key so that due times stay accurate.
            self._stride.rekey()
            self._stride.set_reference(self._tree.total)

    def _ensure_params(self) -> None:
        if self._params is None:
            self._advance_to(self._last_drawn + 1)

    # ------------------------------------------------------------------------------------ structure
    def _rebuild(self, *, rebase: bool, rekey: bool = True) -> None:
        """Recompute every mass from the table (O(N)); ``rebase`` re-chooses only the shift.

        Balanced draws: the credits are first folded under the old masses and every key is rebuilt
        after (``rekey=False`` only when a restored state brings its own credits).
        """
        if self._stride is not None and rekey:
            self._stride.rekey()
        if rebase:
            shift = max_kept_loss(self.table.losses, self._params, self.table.groups)
            self._params = self._params._replace(shift=shift)
            self._counters["rebases"] += 1
        leaves = self._tree.leaf_buffer()  # masses are written in place (no N-sized temporary)
        n_kept = 0
        for start in range(0, self.dataset_size, _REBUILD_CHUNK):
            part = slice(start, start + _REBUILD_CHUNK)
            mass, kept = masses(self.table.losses[part], self._params, self._groups_of(part))
            n_kept += int(np.count_nonzero(kept))
            leaves[start : start + mass.size] = mass
        self._n_kept = n_kept
        self._tree.refresh()
        if self._stride is not None and rekey:
            self._stride.set_reference(self._tree.total)

    # ------------------------------------------------------------------------------------ drawing
    def _batch(self, b: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (global batch) and their draw probabilities for global batch ``b``."""
        if b in self._drawn:
            return self._drawn[b]
        if b <= self._last_drawn:
            if b > self._max_reported_step:  # not yet trained, yet no longer buffered
                self._counters["stale_replays"] += 1
            self._ensure_params()
            return self._draw(b, size, commit=False)
        if self._stride is not None:
            # Balanced draws depend on every earlier batch: draw skipped ones first (a loop that
            # starts late with set_start_batch / set_epoch gets the batches an uninterrupted run gets).
            for skipped in range(self._last_drawn + 1, b):
                self._batch(skipped, self._global_size(skipped))
        self._advance_to(b)
        out = self._draw(b, size)
        self._drawn[b] = out
        self._last_drawn = b
        # Keep only what a restore may need to replay: drawn batches not yet reported as trained.
        for old in [x for x in self._drawn if x <= b - self.feedback_delay - 2]:
            del self._drawn[old]
        return out

    def _global_size(self, b: int) -> int:
        """The global batch size of global batch ``b`` (the last batch of an epoch may be shorter)."""
        j = b % self.batches_per_epoch
        return min(self.batch_size, self.num_samples - j * self.batch_size) * self.num_replicas

    def _draw(self, b: int, size: int, *, commit: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Draw global batch ``b``; ``commit=False`` (a stale replay) leaves the balanced credits as they are."""
        rng = np.random.default_rng([self.seed, b])
        if self._stride is not None:
            return self._draw_balanced(rng, size, commit)
        mix = self.rule.uniform_mix
        out = np.empty(size, dtype=np.int64)
        total = self._tree.total
        if total <= 0:  # no tilted mass (cannot happen after a refresh, which keeps the median): all floor
            from_floor = np.ones(size, dtype=bool)
        else:
            from_floor = rng.random(size) < mix if 0.0 < mix < 1.0 else np.full(size, mix >= 1.0)
        n_floor = int(np.count_nonzero(from_floor))
        if n_floor == size:
            out[:] = rng.integers(0, self.dataset_size, size=size)
        elif n_floor:
            out[from_floor] = rng.integers(0, self.dataset_size, size=n_floor)
            out[~from_floor] = self._draw_tilted(rng, size - n_floor)
        else:
            out[:] = self._draw_tilted(rng, size)
        # A drawn sample's tree leaf is bitwise masses() of its loss (0 for a cut one).
        probs = mixture_probabilities(self._tree.leaves()[out], total, self.dataset_size, mix)
        return out, probs

    def _draw_balanced(self, rng: np.random.Generator, size: int, commit: bool) -> tuple[np.ndarray, np.ndarray]:
        """The ``size`` most overdue draws (stride scheduling, :mod:`irdro_sampler.stride`), shuffled."""
        stride, total = self._stride, self._tree.total
        if commit:
            stride.advance(size, total)
        idx, counts = stride.select(size)
        if commit:
            stride.commit()
        out = np.repeat(idx, counts)
        rng.shuffle(out)  # ranks take slices: spread the most overdue (and repeats) over them
        probs = mixture_probabilities(self._tree.levels[0][out], total, self.dataset_size, self.rule.uniform_mix)
        return out, probs

    def _draw_tilted(self, rng: np.random.Generator, m: int) -> np.ndarray:
        """``m`` draws proportional to the tilted masses (one tree search; never a sample of mass 0)."""
        return self._tree.find(rng.random(m) * self._tree.total)

    def _groups_of(self, selection: Any) -> np.ndarray | None:
        return None if self.table.groups is None else self.table.groups[selection]

    def _point_probabilities(self, indices: np.ndarray) -> np.ndarray:
        mass = masses(self.table.losses[indices], self._params, self._groups_of(indices))[0]
        return mixture_probabilities(mass, self._tree.total, self.dataset_size, self.rule.uniform_mix)

    # ------------------------------------------------------------------------------------ queries
    def probabilities(self) -> np.ndarray:
        """The distribution (float64, length N, sums to 1) the most recent batch was drawn from.

        Before the first draw: the distribution the first batch would be drawn from given the
        feedback applied so far. Read-only: querying never changes the sample order. O(N).
        """
        if self._params is None:
            return self.rule.probabilities(self.table)
        mass = masses(self.table.losses, self._params, self.table.groups)[0]
        return mixture_probabilities(mass, self._tree.total, self.dataset_size, self.rule.uniform_mix)

    def importance_weights(self, indices: Any, step: int | None = None) -> np.ndarray:
        """``1 / (N p_i)`` for ``indices``: multiply per-sample losses by these to train the ERM objective.

        With ``step`` (the global batch the indices were drawn in, while it is still buffered) the
        probabilities the batch was actually drawn with are used; otherwise those of
        :meth:`probabilities`. Finite for every sample while ``uniform_mix > 0`` (the floor reaches cut
        samples too). Under balanced draws ``p_i(b)`` is still each sample's expected share of batch
        ``b`` (counts track ``sum_b G_b p_i(b)`` within 2), so the weighted mean over many batches
        estimates the uniform mean, with a deterministic error bounded through the count bound.
        """
        idx = as_indices(indices, self.dataset_size)
        if step is not None and check_step(step) in self._drawn:
            drawn, probs = self._drawn[step]
            order = np.argsort(drawn, kind="stable")
            pos = np.searchsorted(drawn[order], idx)
            pos = np.minimum(pos, drawn.size - 1)
            found = drawn[order][pos] == idx
            if found.all():
                return 1.0 / (self.dataset_size * probs[order][pos])
        p = self.probabilities()[idx] if self._params is None else self._point_probabilities(idx)
        with np.errstate(divide="ignore"):
            return 1.0 / (self.dataset_size * p)

    def stats(self) -> dict[str, float]:
        """Diagnostics of the current distribution (O(N)) and of the feedback stream."""
        p = self.probabilities()
        params = self._params or self.rule.fit(self.table)
        n_kept = self._n_kept if self._params else int(np.count_nonzero(kept_mask(self.table.losses, params, self.table.groups)))
        return {
            **distribution_stats(p),
            "seen_fraction": self.table.num_seen / self.dataset_size,
            "truncated_fraction": 1.0 - n_kept / self.dataset_size,
            "temperature": params.temperature,
            "threshold": params.threshold,
            "prior": params.prior,
            "table_mean_loss": self.table.mean_loss(),
            "pending_feedback": float(len(self._pending)),
            "rekeys": float(self._stride.rekeys if self._stride is not None else 0),
            "last_drawn_batch": float(self._last_drawn),
            **{k: float(v) for k, v in self._counters.items()},
        }

    def fingerprint(self) -> int:
        """A signed 64-bit digest of everything that decides the sample order; equal on ranks that agree.

        It covers the seed, the data set size and batch geometry, every option of the weighting rule,
        the loss table's ``ema``, ``prior`` and ``groups``, ``feedback_delay``, ``refresh_interval``, ``block_size``,
        and every feedback record applied to the table so far (step, indices, losses, in the order
        applied); not the rank. O(1) per call: the feedback part is a running blake2b digest extended
        by O(B) per applied record. It is saved in :meth:`state_dict`, so a resumed sampler has the
        fingerprint of the uninterrupted one; a state saved before fingerprints existed starts the chain
        from a digest of its loss table (O(N) once), so ranks loading the same old state still agree.
        Loading a table directly into ``sampler.table`` bypasses it. Compare it across ranks to catch
        diverging samplers: the Composer ``IRDRO`` algorithm does; in a plain loop,
        ``dist.all_gather_object(out, sampler.fingerprint())`` and compare.
        """
        options = (
            self.seed, self.dataset_size, self.num_samples, self.batch_size, self.num_replicas,
            self.feedback_delay, self.refresh_interval, self.block_size,
            sorted(self.rule.config().items()), self.table.ema, self.table.prior, self.table.groups_digest(), self.draws,
        )  # fmt: skip
        return digest_to_int(repr(options).encode(), key=self._feedback_digest)

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the future sample order: tensors and primitives only."""
        pend = sorted(self._pending, key=lambda e: (e[0], e[1]))
        drawn = sorted(self._drawn.items())
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "dataset_size": self.dataset_size,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "seed": self.seed,
            "epoch": self.epoch,
            "feedback_delay": self.feedback_delay,
            "refresh_interval": self.refresh_interval,
            "block_size": self.block_size,
            "rule": self.rule.config(),
            "table": self.table.state_dict(),
            "params": None if self._params is None else list(self._params[:4]),
            "group_threshold": None if self._params is None or self._params.group_threshold is None
            else torch.from_numpy(self._params.group_threshold.copy()),
            "schedule": {
                "seq": self._seq,
                "next_auto_step": self._next_auto_step,
                "applied_through": self._applied_through,
                "last_drawn": self._last_drawn,
                "refresh_block": self._refresh_block,
                "max_reported_step": self._max_reported_step,
                "start_batch": self._start_batch,
            },
            "counters": dict(self._counters),
            "feedback_digest": self._feedback_digest.hex(),
            "pending": _pack([(e[0], e[1]) for e in pend], [e[2] for e in pend], [e[3] for e in pend]),
            "drawn": _pack([(b, 0) for b, _ in drawn], [v[0] for _, v in drawn], [v[1] for _, v in drawn]),
            # The draw scheme and, for balanced draws, the credits that decide the next batches.
            "balanced": None if self._stride is None else {
                **self._stride.state_dict(), "mass_total": self._tree.total, "mass_moved": self._tree.moved,
            },
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, rank: int = 0) -> IRDROSampler:
        """A sampler rebuilt from :meth:`state_dict` alone (for inspection, or to resume on ``rank``).

        The state is checked in full before anything is allocated: its sizes must match its arrays,
        so a small file cannot claim a huge data set.
        """
        checked = _check_state(state)
        sampler = cls(
            checked["dataset_size"],
            checked["batch_size"],
            num_samples=checked["num_samples"],
            num_replicas=checked["num_replicas"],
            rank=rank,
            block_size=checked["block_size"],
        )
        sampler._commit_state(checked)
        return sampler

    @staticmethod
    def check_state_dict(state: Any) -> None:
        """Raise ``ValueError`` naming the entry unless ``state`` is a well-formed :meth:`state_dict`
        (every entry checked, as :meth:`load_state_dict` does, except the match with a sampler)."""
        _check_state(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; the run then continues exactly.

        Every option that decides the order (seed, weighting rule, delays, refresh interval, the draw
        scheme and the balanced credits under ``state['balanced']``) is taken from the state; a state
        without that key (saved before balanced draws existed) resumes i.i.d. draws. The whole state is
        checked before anything changes (types, ranges, shapes, finite losses, indices in range; the data
        set size and the batch geometry must match this sampler's): ``ValueError`` naming the entry, and
        the sampler is left exactly as it was. To keep only the learned losses under new options, load
        ``state["table"]`` into ``sampler.table`` instead.
        """
        checked = _check_state(state)
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
        self._commit_state(checked)

    def _commit_state(self, checked: dict[str, Any]) -> None:
        """Apply a state checked by :func:`_check_state` (nothing here can fail but allocation, done first)."""
        block_size = checked["block_size"]
        balanced = checked["balanced"]  # None in states from before balanced draws: those drew i.i.d.
        if balanced is None and isinstance(self._tree, FanoutSumTree) and block_size == self.block_size:
            tree, stride = self._tree, None  # rebuilt from the table below
        else:
            tree, stride = _draw_structures(self.dataset_size, block_size, self.global_batch_size,
                                            checked["rule"].uniform_mix, checked["seed"],
                                            balanced=balanced is not None, initial_phases=False)
        table = LossTable(self.dataset_size)
        table._assign(checked["table"])  # checked by _check_state: no second pass over the arrays
        self.table, self.rule, self.block_size = table, checked["rule"], block_size
        self._tree, self._stride = tree, stride
        for key in ("seed", "epoch", "feedback_delay", "refresh_interval"):
            setattr(self, key, checked[key])
        self._reset_schedule()
        sched = checked["schedule"]
        self._seq = sched["seq"]
        self._next_auto_step = sched["next_auto_step"]
        self._applied_through = sched["applied_through"]
        self._last_drawn = sched["last_drawn"]
        self._refresh_block = sched["refresh_block"]
        self._max_reported_step = sched["max_reported_step"]
        self._start_batch = sched["start_batch"]
        self._counters.update({k: v for k, v in checked["counters"].items() if k in self._counters})
        self._pending = checked["pending"]
        self._drawn = checked["drawn"]
        self._feedback_digest = checked["feedback_digest"] or table_digest(table)
        if checked["params"] is not None:
            self._params = checked["params"]
            self._rebuild(rebase=False, rekey=False)
        if self._stride is not None:
            if "mass_total" in balanced:  # the running total the saved run drew with (LeafMasses)
                self._tree.restore_total(balanced["mass_total"], balanced["mass_moved"])
            self._stride.load_state_dict(balanced)  # after the masses: the keys are built from both


def _draw_structures(
    size: int, block_size: int, global_batch: int, uniform_mix: float, seed: int, *,
    balanced: bool, initial_phases: bool = True,
) -> tuple[FanoutSumTree | LeafMasses, StrideScheduler | None]:
    """Where the masses live, and the balanced draws' scheduler. I.i.d. draws search a sum tree;
    balanced draws only read the masses and their total, so the masses are bare leaves (no sums to
    keep up to date) stored in the scheduler's records, beside each sample's credit."""
    if not balanced:
        return FanoutSumTree(size, fanout=max(2, block_size)), None
    stride = StrideScheduler(size, global_batch, uniform_mix, seed, initial_phases=initial_phases)
    return LeafMasses(size, leaves=stride.masses), stride


def _check_balanced_state(balanced: Any, size: int) -> None:
    """Refuse a malformed ``state['balanced']`` before anything changes."""
    if not isinstance(balanced, dict):
        raise ValueError(f"state_dict['balanced'] must be None or a dict, got {type(balanced).__name__}")
    for key, dtype in (("offsets", torch.float32), ("draws", torch.int32)):
        value = balanced.get(key)
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or tuple(value.shape) != (size,):
            got = f"{value.dtype}{tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"state_dict['balanced']['{key}'] must be a {dtype} tensor of shape ({size},), got {got}")
    if not torch.isfinite(balanced["offsets"]).all():
        raise ValueError("state_dict['balanced']['offsets'] holds non-finite credits")
    for key in ("clock", "drift1", "drift2", "ref_total", "alpha", "beta", "rekeys"):
        value = balanced.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"state_dict['balanced']['{key}'] must be a finite number, got {value!r}")
    # The masses' running total (states saved before it was kept have neither: it is recomputed).
    if ("mass_total" in balanced) != ("mass_moved" in balanced):
        raise ValueError("state_dict['balanced'] must hold both 'mass_total' and 'mass_moved' or neither")
    for key in ("mass_total", "mass_moved"):
        value = balanced.get(key, 0.0)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (is_number and math.isfinite(value) and value >= 0):
            raise ValueError(f"state_dict['balanced']['{key}'] must be a finite number >= 0, got {value!r}")


def _check_state(state: Any) -> dict[str, Any]:
    """Validate an :meth:`IRDROSampler.state_dict` completely; return its entries converted.

    Raises ``ValueError`` naming the entry. Allocates nothing beyond copies of the state's own arrays.
    """
    w = "state_dict"
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise ValueError("state is not an IRDROSampler state_dict (missing format marker)")
    version = state_int(state, "version", w, minimum=1)
    if version > STATE_VERSION:
        raise ValueError(f"state version {version} is newer than supported ({STATE_VERSION})")
    out: dict[str, Any] = {
        key: state_int(state, key, w, minimum=1)
        for key in ("dataset_size", "num_samples", "batch_size", "num_replicas", "feedback_delay",
                    "refresh_interval", "block_size")
    }  # fmt: skip
    out["seed"] = state_int(state, "seed", w, minimum=0)
    out["epoch"] = state_int(state, "epoch", w, minimum=0)
    n = out["dataset_size"]
    rule = state_entry(state, "rule", w)
    if not isinstance(rule, Mapping):
        raise ValueError(f"{w}['rule'] must be a dict of DROWeighting options, got {type(rule).__name__}")
    try:
        out["rule"] = DROWeighting(**rule)  # validates its own fields, whatever they are
    except (TypeError, ValueError) as e:
        raise ValueError(f"{w}['rule'] is not a valid DROWeighting config: {e}") from None
    out["table"] = table = check_table_state(state_entry(state, "table", w), n, f"{w}['table']")
    losses, groups = table["losses"], table["groups"]
    out["params"] = params = _check_params(state_entry(state, "params", w), state.get("group_threshold"), groups)
    if params is not None:
        # A saved run keeps its largest mass within about e^+-600 (it rebases otherwise); beyond e^700 the
        # masses would overflow or vanish, so such params were not saved by a sampler.
        top = (max_kept_loss(losses, params, groups) - params.shift) / params.temperature
        if not -700.0 <= top <= 700.0:
            raise ValueError(
                f"{w}['params'] do not fit the table: the largest kept loss gives log-mass {top:.4g} "
                f"(shift {params.shift!r}, temperature {params.temperature!r})"
            )
    batches_per_epoch = math.ceil(out["num_samples"] / out["batch_size"])
    out["schedule"] = sched = _check_schedule(state_entry(state, "schedule", w), batches_per_epoch)
    counters = state_entry(state, "counters", w)
    if not isinstance(counters, Mapping):
        raise ValueError(f"{w}['counters'] must be a dict, got {type(counters).__name__}")
    out["counters"] = {str(k): state_int(counters, k, f"{w}['counters']", minimum=0) for k in counters}
    pending = _check_records(state_entry(state, "pending", w), f"{w}['pending']", n, -MAX_LOSS, MAX_LOSS)
    for (step, seq), _, _ in pending:
        if not (0 <= step <= MAX_STEP and 0 <= seq < sched["seq"]):
            raise ValueError(f"{w}['pending'] holds a record with step {step}, seq {seq}: outside [0, {MAX_STEP}] / "
                             f"[0, {sched['seq']})")
    out["pending"] = [(k[0], k[1], i, v) for k, i, v in pending]
    drawn = _check_records(state_entry(state, "drawn", w), f"{w}['drawn']", n, 0.0, 1.0 + 1e-9)
    for (b, _), _, _ in drawn:
        if not 0 <= b <= sched["last_drawn"]:
            raise ValueError(f"{w}['drawn'] holds batch {b}, outside [0, last_drawn={sched['last_drawn']}]")
    out["drawn"] = {k[0]: (i, p) for k, i, p in drawn}
    digest = state.get("feedback_digest")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 32 and _is_hex(digest)):
        raise ValueError(f"{w}['feedback_digest'] must be 32 hex digits, got {digest!r}")
    out["feedback_digest"] = None if digest is None else bytes.fromhex(digest)
    out["balanced"] = balanced = state.get("balanced")
    if balanced is not None:
        _check_balanced_state(balanced, n)
    return out


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _check_params(params: Any, group_threshold: Any, groups: np.ndarray | None) -> WeightParams | None:
    if params is None:
        return None
    if not isinstance(params, (list, tuple)) or len(params) != 4:
        raise ValueError(f"state_dict['params'] must be None or 4 numbers, got {params!r}")
    values = []
    for name, x in zip(WeightParams._fields[:4], params, strict=True):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise ValueError(f"state_dict['params'] {name} must be a number, got {x!r}")
        values.append(float(x))
    tau, threshold, prior, shift = values
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"state_dict['params'] temperature must be finite and > 0, got {tau!r}")
    if math.isnan(threshold) or not (math.isfinite(prior) and math.isfinite(shift)):
        raise ValueError(f"state_dict['params'] must hold a threshold (not NaN), a finite prior and shift; got {params!r}")
    if group_threshold is None:
        return WeightParams(*values)
    num_groups = count_groups(groups)
    per_group = state_array(group_threshold, "state_dict['group_threshold']", kind="float", shape=(num_groups,))
    if groups is None or np.isnan(per_group).any():
        raise ValueError("state_dict['group_threshold'] needs a table with groups and holds no NaN")
    return WeightParams(*values, group_threshold=per_group.astype(np.float64))


def _check_schedule(sched: Any, batches_per_epoch: int) -> dict[str, int]:
    w = "state_dict['schedule']"
    limits = {
        "seq": (0, None),
        "next_auto_step": (0, MAX_STEP + 1),
        "applied_through": (-1, MAX_STEP),
        "last_drawn": (-1, None),
        "refresh_block": (-1, None),
        "max_reported_step": (-1, MAX_STEP),
        "start_batch": (0, batches_per_epoch),
    }
    return {k: state_int(sched, k, w, minimum=lo, maximum=hi) for k, (lo, hi) in limits.items()}


def _check_records(packed: Any, name: str, n: int, low: float, high: float) -> list[tuple[tuple[int, int], np.ndarray, np.ndarray]]:
    """Validate packed ragged records (see :func:`_pack`) and unpack them."""
    keys = state_array(state_entry(packed, "keys", name), f"{name}['keys']", kind="int")
    if keys.ndim != 2 or keys.shape[1] != 2:
        raise ValueError(f"{name}['keys'] must have shape (k, 2), got {tuple(keys.shape)}")
    offsets = state_array(state_entry(packed, "offsets", name), f"{name}['offsets']", kind="int", shape=(keys.shape[0] + 1,))
    indices = state_array(state_entry(packed, "indices", name), f"{name}['indices']", kind="int")
    if indices.ndim != 1:
        raise ValueError(f"{name}['indices'] must be 1-D, got shape {tuple(indices.shape)}")
    values = state_array(state_entry(packed, "values", name), f"{name}['values']", kind="float", shape=indices.shape)
    if offsets[0] != 0 or offsets[-1] != indices.size or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{name}['offsets'] must rise from 0 to {indices.size}, got {offsets.tolist()[:8]}...")
    check_range(indices, f"{name}['indices']", 0, n - 1)
    values = values.astype(np.float64)
    check_range(values, f"{name}['values']", low, high)
    return [_unpack_one(keys, offsets, indices, values, i) for i in range(keys.shape[0])]


def _pack(keys: list[tuple[int, int]], indices: list[np.ndarray], values: list[np.ndarray]) -> dict[str, Any]:
    """Ragged (key, indices, values) records as flat tensors."""
    sizes = [a.size for a in indices]
    return {
        "keys": torch.tensor(keys, dtype=torch.int64).reshape(-1, 2),
        "offsets": torch.tensor(np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]), dtype=torch.int64),
        "indices": torch.from_numpy(np.concatenate(indices) if indices else np.zeros(0, np.int64)),
        "values": torch.from_numpy(np.concatenate(values) if values else np.zeros(0, np.float64)),
    }


def _unpack_one(
    keys: np.ndarray, offsets: np.ndarray, indices: np.ndarray, values: np.ndarray, i: int
) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    lo, hi = offsets[i], offsets[i + 1]
    return (int(keys[i, 0]), int(keys[i, 1])), indices[lo:hi].astype(np.int64), values[lo:hi].copy()
