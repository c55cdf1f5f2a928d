"""The running losses as tilted masses: the fitted rule applied to the table, kept in a draw scheme.

:meth:`TiltedMasses.apply` moves due feedback into the :class:`LossTable` and the changed samples'
masses into the scheme (O(B log N)); :meth:`TiltedMasses.refresh_if_due` refits the rule (prior, cut
thresholds, temperature) and rewrites every mass (O(N), amortised over ``refresh_interval`` batches).
Every mass is :func:`~irdro_sampler.weights.masses` of the sample's current loss under the current
params, bit for bit, whichever path wrote it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .draws import DrawScheme
from .feedback import Record
from .fixed_weights import FixedWeights
from .loss_table import LossTable
from .weights import (
    DROWeighting,
    WeightParams,
    cut_transitions,
    first_losses_for,
    kept_mask,
    mixture_probabilities,
)

# Rebase (re-shift) the masses when their total leaves this range: far from overflow
# (N * e^600 < 1e308 for N < 2**31) and far from the subnormal range where masses lose precision.
TOTAL_RANGE = (1e-250, 1e280)
_REBUILD_CHUNK = 1 << 22


class TiltedMasses:
    """The masses of ``table`` under ``rule``'s fitted params, stored in ``scheme``.

    ``params`` is ``None`` until the first refresh. Counters: ``refreshes``, ``rebases`` (the shift
    re-chosen because the masses' total left a safe range), ``remeasured_cut`` (feedback on a sample
    that was cut) and ``readmitted`` (such a sample whose new loss is kept).
    """

    def __init__(self, table: LossTable, rule: DROWeighting | FixedWeights, scheme: DrawScheme) -> None:
        self.table, self.rule, self.scheme = table, rule, scheme
        self.params: WeightParams | None = None
        self.kept_count = 0
        self.refresh_block = -1  # b // refresh_interval at the last refresh
        self.refreshes = self.rebases = self.remeasured_cut = self.readmitted = 0

    @property
    def dataset_size(self) -> int:
        return self.table.dataset_size

    def groups_of(self, selection: Any) -> np.ndarray | None:
        return None if self.table.groups is None else self.table.groups[selection]

    # ---------------------------------------------------------------------------------- upkeep
    def apply(self, records: list[Record]) -> None:
        """Apply due feedback records (in the order given) to the table and the changed masses."""
        params = self.params
        touched = []
        for step, _, idx, val in records:
            uniq, old, new = self.table._apply(idx, val, step)
            if params is not None and uniq.size:
                # Records are applied in order, so each one's old/new kept flags give the exact change.
                grp, first = self.groups_of(uniq), first_losses_for(self.table, params, uniq)
                remeasured, readmitted = cut_transitions(old, new, params, grp, first)
                self.kept_count += int(np.count_nonzero(kept_mask(new, params, grp, first))) - (uniq.size - remeasured)
                self.remeasured_cut += remeasured
                self.readmitted += readmitted
                touched.append((uniq, new, grp, first))
        if params is None or not touched:
            return
        if len(touched) == 1:  # the common case: the arrays gathered above are those of the changed samples
            uniq, new, grp, first = touched[0]
            mass = self.rule.masses_at(self.table, uniq, params, gathered=(new, grp, first))[0]
        else:
            uniq = np.unique(np.concatenate([t[0] for t in touched]))
            mass = self.rule.masses_at(self.table, uniq, params)[0]
        if not np.all(np.isfinite(mass)):  # a loss far above the shift: re-choose the shift
            self.rebuild(rebase=True)
            return
        self.scheme.set_masses(uniq, mass)
        if not TOTAL_RANGE[0] <= self.scheme.total <= TOTAL_RANGE[1]:
            self.rebuild(rebase=True)

    def refresh_if_due(self, b: int, refresh_interval: int) -> None:
        """Refit and rebuild when batch ``b`` starts a new refresh block (or nothing is left kept)."""
        if self.params is None or b // refresh_interval != self.refresh_block or self.kept_count == 0:
            self.refresh_block = b // refresh_interval
            self.params = self.rule.fit(self.table)
            self.refreshes += 1
            self.rebuild(rebase=False)
        else:
            self.scheme.keep_fresh()

    def rebuild(self, *, rebase: bool, rekey: bool = True) -> None:
        """Recompute every mass from the table (O(N)); ``rebase`` re-chooses only the shift.

        ``rekey=False`` only when a restored state brings the draw scheme's own credits.
        """
        self.scheme.begin_rebuild(rekey=rekey)
        if rebase:
            self.params = self.rule.rebased(self.table, self.params)
            self.rebases += 1
        leaves = self.scheme.leaf_buffer()  # masses are written in place (no N-sized temporary)
        kept_count = 0
        for start in range(0, self.dataset_size, _REBUILD_CHUNK):
            part = slice(start, start + _REBUILD_CHUNK)
            mass, kept = self.rule.masses_at(self.table, part, self.params)
            kept_count += int(np.count_nonzero(kept))
            leaves[start : start + mass.size] = mass
        self.kept_count = kept_count
        self.scheme.end_rebuild(rekey=rekey)

    # ---------------------------------------------------------------------------------- queries
    def draw_probabilities(self, drawn: np.ndarray) -> np.ndarray:
        """``p_i`` of drawn samples from their stored masses (what the batch was drawn with)."""
        return mixture_probabilities(self.scheme.mass_of(drawn), self.scheme.total, self.dataset_size,
                                     self.rule.uniform_mix)

    def point_probabilities(self, indices: np.ndarray) -> np.ndarray:
        """``p_i`` of ``indices`` under the current params (recomputed from the table)."""
        mass = self.rule.masses_at(self.table, indices, self.params)[0]
        return mixture_probabilities(mass, self.scheme.total, self.dataset_size, self.rule.uniform_mix)

    def probabilities(self) -> np.ndarray:
        """The whole distribution (O(N)); before the first refresh, the rule's fresh fit of the table."""
        if self.params is None:
            return self.rule.probabilities(self.table)
        mass = self.rule.masses_at(self.table, slice(None), self.params)[0]
        return mixture_probabilities(mass, self.scheme.total, self.dataset_size, self.rule.uniform_mix)

    def fit_and_kept(self) -> tuple[WeightParams, int]:
        """The params in force and the number of kept samples (a fresh fit before the first refresh)."""
        if self.params is not None:
            return self.params, self.kept_count
        params = self.rule.fit(self.table)
        table = self.table
        return params, int(np.count_nonzero(kept_mask(table.losses, params, table.groups, table.first_losses)))
