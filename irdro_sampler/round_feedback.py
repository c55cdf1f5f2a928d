"""Loss feedback for round-based data: a loss table turned into the next round's probabilities.

A *round-based* data source (a weighted streaming dataset, or any dataset that fixes its sampling
distribution for a whole round of draws) asks for new probabilities only between rounds, while the
training loop reports per-sample losses after every batch. :class:`RoundFeedback` is what sits in
between, with no knowledge of any trainer or data format: the Composer ``IRDRO`` algorithm uses it for
``WeightedStreamingDataset``, and any other trainer integration can reuse it the same way::

    feedback = RoundFeedback(LossTable(len(dataset)), DROWeighting(truncate_zscore=3.0))
    for step, (indices, losses) in enumerate(batches):  # one call per global batch, every rank alike
        feedback.update(indices, losses, step)
        if round_finished:
            dataset.set_weights(feedback.round_probabilities())

Importing this module imports numpy and torch only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._validation import as_indices, batch_losses, to_numpy
from .diagnostics import weighting_diagnostics
from .fingerprint import digest_to_int, table_digest
from .loss_table import LossTable, check_table_state
from .sampler_state import _check_params, params_state
from .screening import check_block_only, screen_table_rows
from .weights import DROWeighting, WeightParams, cut_transitions, first_losses_for

__all__ = ["RoundFeedback"]


class RoundFeedback:
    """The decisions of round-based IR-DRO: a loss table, a rule, and the cut in force for the round.

    Contract:

    * :meth:`update` records one batch's losses in the table (every rank must apply the same calls in
      the same order; the Composer integration gathers them first). While a round's cut is in force it
      also counts *transitions*: ``remeasured_cut`` (updated samples that were cut before the update)
      and ``readmitted`` (of those, the ones kept after it).
    * :meth:`round_probabilities` fits the rule to the table, makes that fit the cut in force for the
      counters, and returns the next round's probabilities (float64, length N, sums to 1). Calling it
      is what starts a round.
    * :meth:`stats` reports the round's diagnostics with the one diagnostics builder,
      :func:`irdro_sampler.diagnostics.weighting_diagnostics`, plus the two counters.
    * :meth:`state_dict` is ``{'table': ..., 'rule': ...}``: the table's state and the rule's options.
      The cut in force and the counters are not saved (they describe the round in progress and are
      diagnostics): a fresh object that loads a state counts from its first :meth:`round_probabilities`.

    Args:
        table: the running per-sample losses (its size is the data set's size).
        rule: how the table becomes probabilities (default: ``DROWeighting()``, the library defaults).
    """

    def __init__(self, table: LossTable, rule: DROWeighting | None = None) -> None:
        if not isinstance(table, LossTable):
            raise TypeError(f"table must be a LossTable, got {type(table).__name__}")
        if rule is None:
            rule = DROWeighting()
        if not isinstance(rule, DROWeighting):
            raise TypeError(f"rule must be a DROWeighting, got {type(rule).__name__}")
        if rule.reads_first_losses:
            table.track_first_losses()  # the gate reads them (from now on, for samples seen before)
        self.table = table
        self.rule = rule
        #: The fit of the round in force (``None`` before the first round, and after a load).
        self.params: WeightParams | None = None
        self.remeasured_cut = 0
        self.readmitted = 0

    def __repr__(self) -> str:
        return f"RoundFeedback(num_samples={self.num_samples}, rule={self.rule!r})"

    @property
    def num_samples(self) -> int:
        """The data set's size N (the table's)."""
        return self.table.dataset_size

    # ------------------------------------------------------------------------------ feedback
    def update(self, indices: Any, losses: Any, step: int) -> None:
        """Record per-sample ``losses`` of the samples ``indices`` observed at global batch ``step``.

        ``indices`` are ints in ``[0, N)``, ``losses`` real numbers of the same length (non-finite ones are
        skipped by the table and counted in ``table.num_skipped``), ``step`` an int ``>= 0``. Everything
        is checked before anything changes; errors name the argument and show its value. Under a cut in
        force, every distinct index of the call (also one whose loss was skipped) counts as re-measured
        if it was cut before the call.
        """
        idx = as_indices(indices, self.num_samples, "indices")
        uniq = np.unique(idx)
        old = self.table.losses[uniq]
        self.table.update(idx, losses, step=step)  # validates losses and step; changes nothing on error
        if self.params is not None:
            groups = None if self.table.groups is None else self.table.groups[uniq]
            first = first_losses_for(self.table, self.params, uniq)
            remeasured, readmitted = cut_transitions(old, self.table.losses[uniq], self.params, groups, first)
            self.remeasured_cut += remeasured
            self.readmitted += readmitted

    def screen(self, indices: Any, losses: Any, *, block_only: bool = False) -> np.ndarray:
        """Which samples of a trained batch to learn from: ``False`` for a first visit (no loss in the table)
        whose loss the round's cut would take (with ``block_only``: that lies inside the round's block of
        unlearnable samples), as :meth:`IRDROSampler.screen <irdro_sampler.IRDROSampler.screen>` (all ``True``
        before the first round). Read-only; same input contract as :meth:`update`."""
        block_only = check_block_only(block_only)
        idx, val = batch_losses(indices, losses, self.num_samples)
        return screen_table_rows(self.table, idx, val, self.params, block_only)

    # ------------------------------------------------------------------------------ rounds
    def round_probabilities(self) -> np.ndarray:
        """Fit the rule to the table, make the fit the cut in force, return the round's probabilities.

        O(N). Float64, length N, sums to 1: what the data source draws the next round from.
        """
        self.params = params = self.rule.fit(self.table)
        return self.rule.probabilities(self.table, params)

    def stats(self, probabilities: Any = None) -> dict[str, float]:
        """Diagnostics of the round: :func:`~irdro_sampler.diagnostics.weighting_diagnostics` plus
        ``remeasured_cut`` and ``readmitted``.

        ``probabilities`` are the round's (what :meth:`round_probabilities` returned; pass them to save
        recomputing them). Without them they are recomputed from the table under the cut in force, or
        under a fresh fit before the first round (nothing is remembered then). O(N).
        """
        params = self.params if self.params is not None else self.rule.fit(self.table)
        if probabilities is None:
            p = self.rule.probabilities(self.table, params)
        else:
            p = to_numpy(probabilities, "probabilities").astype(np.float64, copy=False)
            if p.size != self.num_samples:
                raise ValueError(
                    f"probabilities must have one entry per sample ({self.num_samples}), got {p.size}"
                )
        return {
            **weighting_diagnostics(p, self.table, params),
            "remeasured_cut": float(self.remeasured_cut),
            "readmitted": float(self.readmitted),
        }

    def fingerprint(self, extra: bytes = b"") -> int:
        """Signed 64-bit digest of the table's contents and the rule's options, extended by ``extra``
        (e.g. the data source's own fingerprint); equal on ranks that agree. O(N)."""
        if not isinstance(extra, bytes):
            raise TypeError(f"extra must be bytes, got {type(extra).__name__}")
        rule = repr(sorted(self.rule.config().items())).encode()
        return digest_to_int(table_digest(self.table) + rule + extra)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{'table': table.state_dict(), 'rule': rule.config()}``, and once a round is in force its cut's
        params (``params``, ``group_threshold``, ...: what :meth:`screen` judges by): tensors and primitives only.

        The rule is saved so that tools (``irdro-sampler inspect``) can show the weights the way they
        were trained; loading does not apply it (see :meth:`load_state_dict`).
        """
        out = {"table": self.table.state_dict(), "rule": self.rule.config()}
        if self.params is not None:
            out.update(params_state(self.params))
        return out

    @staticmethod
    def check_state_dict(state: Any) -> None:
        """``ValueError`` (naming the entry) unless ``state`` could be a :meth:`state_dict`: everything
        that can be checked without knowing N. Both entries are optional here."""
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a dict, got {type(state).__name__}")
        if "table" in state:
            check_table_state(state["table"], None, "state['table']")
        _check_rule_state(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the table from ``state['table']`` (same N); ``ValueError`` and no change on a bad state.

        The rule stays the one given to the constructor (a run may resume with other rule options; a
        saved ``'rule'`` is checked, not applied). The cut of the round in force (what :meth:`screen` judges
        by) is restored when the state holds one and was saved under this same rule (otherwise none is in force
        until the next round); the counters are left as they are. The round's probabilities are the data
        source's, which resumes them from its own state.
        """
        if not isinstance(state, Mapping) or "table" not in state:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"state must be a dict with a 'table' entry, got {got}")
        _check_rule_state(state)
        table = check_table_state(state["table"], self.num_samples)
        params = None
        if state.get("params") is not None and state.get("rule") == self.rule.config():
            # The round in force was cut under this very rule: its params judge the screen until the next round.
            params = _check_params(state["params"], state.get("group_threshold"), table["groups"],
                                  state.get("tilt_cap"), self.rule, state.get("group_split"), state.get("block_valley"))
        self.table._assign(table)  # everything was checked before anything changed
        self.params = params


def _check_rule_state(state: Mapping[str, Any]) -> None:
    if "rule" in state:
        if not isinstance(state["rule"], Mapping):
            raise ValueError(f"state['rule'] must be a dict of DROWeighting options, got {state['rule']!r}")
        DROWeighting.from_config(state["rule"])
