"""The sampler's saved state: its format, version, packing and the complete check before a load.

``IRDROSampler.state_dict()`` holds only tensors and primitives; :func:`check_state` validates every
entry (types, ranges, shapes, finite losses, indices in range, the draw scheme's own part) before
anything changes, so a refused state leaves the sampler bitwise as it was. The ``inspect`` command and
the integrations read states through this module too.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ._validation import MAX_LOSS, MAX_STEP, check_range, state_array, state_entry, state_int
from .draws import scheme_for_state_entry
from .fingerprint import table_digest
from .fixed_weights import FixedWeights, rule_from_config
from .loss_table import LossTable, check_table_state, count_groups
from .weights import DROWeighting, WeightParams, max_kept_loss

STATE_FORMAT = "irdro_sampler.IRDROSampler"
STATE_VERSION = 1
W = "state_dict"  # how error messages name the state


def is_sampler_state(obj: Any) -> bool:
    """Whether ``obj`` carries the sampler state's format marker (it may still be malformed)."""
    return isinstance(obj, Mapping) and obj.get("format") == STATE_FORMAT


def pack_state(sampler: Any) -> dict[str, Any]:
    """``sampler.state_dict()`` of an :class:`~irdro_sampler.IRDROSampler`: everything that decides the
    future sample order. (Typed ``Any`` so that this module, which the sampler imports, imports no sampler.)"""
    order = sampler.order
    pend = order.feedback.sorted_pending()
    drawn = order.drawn.sorted_items()
    params = order.weights.params
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "dataset_size": sampler.dataset_size,
        "num_samples": sampler.num_samples,
        "batch_size": sampler.batch_size,
        "num_replicas": sampler.num_replicas,
        "seed": sampler.seed,
        "epoch": sampler.epoch,
        "feedback_delay": order.feedback_delay,
        "refresh_interval": order.refresh_interval,
        "block_size": sampler.block_size,
        "rule": sampler.rule.config(),
        "table": sampler.table.state_dict(),
        **params_state(params),
        "schedule": {
            **order.feedback.schedule(),
            "last_drawn": order.last_drawn,
            "refresh_block": order.weights.refresh_block,
            "start_batch": sampler.start_batch,
        },
        "counters": order.counters(),
        "feedback_digest": order.feedback.digest.hex(),
        "pending": pack_records([(e[0], e[1]) for e in pend], [e[2] for e in pend], [e[3] for e in pend]),
        "drawn": pack_records([(b, 0) for b, _ in drawn], [v[0] for _, v in drawn], [v[1] for _, v in drawn]),
        "balanced": sampler.draw_scheme.state_entry(),  # the draw scheme's own part (None for i.i.d.)
    }


def params_state(params: WeightParams | None) -> dict[str, Any]:
    """The state entries of the params in force: ``params`` (4 numbers), ``group_threshold`` and, only
    when the params cap the tilt (``tilt_cap``), ``tilt_cap`` = ``{"cap": float | None, "group_cap":
    tensor | None}``, and only when they cut at a gated split (``cut_rule="zscore-mode-split-gated"`` with
    groups), ``group_split`` (a tensor), and only when the refit found a block of unlearnable samples,
    ``block_valley`` (a float: what ``screen(..., block_only=True)`` judges by): states without them are those of
    versions without them (a state saved before ``block_valley`` existed screens no block until the next refit)."""
    out: dict[str, Any] = {
        "params": None if params is None else list(params[:4]),
        "group_threshold": None if params is None or params.group_threshold is None
        else torch.from_numpy(params.group_threshold.copy()),
    }
    if params is not None and (params.cap is not None or params.group_cap is not None):
        out["tilt_cap"] = {"cap": params.cap,
                           "group_cap": None if params.group_cap is None else torch.from_numpy(params.group_cap.copy())}
    if params is not None and params.group_split is not None:
        out["group_split"] = torch.from_numpy(params.group_split.copy())
    if params is not None and math.isfinite(params.block_valley):
        out["block_valley"] = params.block_valley
    return out


def restore_state(sampler: Any, checked: dict[str, Any]) -> None:
    """Apply a state checked by :func:`check_state` to ``sampler`` (an ``IRDROSampler``): nothing here can
    fail but allocation, done first."""
    scheme_cls, block_size = checked["draws"], checked["block_size"]
    scheme = sampler.draw_scheme
    if type(scheme) is not scheme_cls or not scheme.reusable_for(block_size):
        scheme = scheme_cls(sampler.dataset_size, global_batch=sampler.global_batch_size, block_size=block_size,
                            uniform_mix=checked["rule"].uniform_mix, seed=checked["seed"], initial_phases=False)
    table = LossTable(sampler.dataset_size, track_first_losses=False)
    table._assign(checked["table"])  # checked by check_state: no second pass over the arrays
    if isinstance(checked["rule"], DROWeighting) and checked["rule"].reads_first_losses:
        table.track_first_losses()  # kept in the state; from a state without them, from now on
    sampler.seed, sampler.epoch, sched = checked["seed"], checked["epoch"], checked["schedule"]
    sampler._assemble(table, checked["rule"], scheme, checked["feedback_delay"], checked["refresh_interval"])
    sampler.start_batch = sched["start_batch"]
    order = sampler.order
    order.feedback.restore(sched, checked["pending"], checked["feedback_digest"] or table_digest(table))
    order.restore_counters(checked["counters"])
    order.last_drawn = sched["last_drawn"]
    order.drawn.batches = checked["drawn"]
    order.weights.refresh_block = sched["refresh_block"]
    if checked["params"] is not None:
        order.weights.params = checked["params"]
        order.weights.rebuild(rebase=False, rekey=False)
    scheme.load_state_entry(checked["balanced"])


def check_state(state: Any) -> dict[str, Any]:
    """Validate an :meth:`IRDROSampler.state_dict` completely; return its entries converted.

    ``out["draws"]`` is the draw scheme class the state belongs to. Raises ``ValueError`` naming the
    entry. Allocates nothing beyond copies of the state's own arrays.
    """
    if not is_sampler_state(state):
        raise ValueError("state is not an IRDROSampler state_dict (missing format marker)")
    version = state_int(state, "version", W, minimum=1)
    if version > STATE_VERSION:
        raise ValueError(f"state version {version} is newer than supported ({STATE_VERSION})")
    out: dict[str, Any] = {
        key: state_int(state, key, W, minimum=1)
        for key in ("dataset_size", "num_samples", "batch_size", "num_replicas", "feedback_delay",
                    "refresh_interval", "block_size")
    }  # fmt: skip
    out["seed"] = state_int(state, "seed", W, minimum=0)
    out["epoch"] = state_int(state, "epoch", W, minimum=0)
    n = out["dataset_size"]
    out["rule"] = rule = _check_rule(state_entry(state, "rule", W), n)
    out["table"] = table = check_table_state(state_entry(state, "table", W), n, f"{W}['table']")
    out["params"] = _check_params_fit(state, table, rule)
    batches_per_epoch = math.ceil(out["num_samples"] / out["batch_size"])
    out["schedule"] = sched = _check_schedule(state_entry(state, "schedule", W), batches_per_epoch)
    counters = state_entry(state, "counters", W)
    if not isinstance(counters, Mapping):
        raise ValueError(f"{W}['counters'] must be a dict, got {type(counters).__name__}")
    out["counters"] = {str(k): state_int(counters, k, f"{W}['counters']", minimum=0) for k in counters}
    out["pending"], out["drawn"] = _check_buffers(state, n, sched)
    digest = state.get("feedback_digest")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 32 and _is_hex(digest)):
        raise ValueError(f"{W}['feedback_digest'] must be 32 hex digits, got {digest!r}")
    out["feedback_digest"] = None if digest is None else bytes.fromhex(digest)
    out["balanced"] = balanced = state.get("balanced")
    out["draws"] = scheme = scheme_for_state_entry(balanced)
    scheme.check_state_entry(balanced, n)
    return out


def _check_rule(rule: Any, dataset_size: int) -> DROWeighting | FixedWeights:
    if not isinstance(rule, Mapping):
        raise ValueError(f"{W}['rule'] must be a dict of DROWeighting options, got {type(rule).__name__}")
    try:
        out = rule_from_config(dict(rule))  # validates its own fields, whatever they are
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{W}['rule'] is not a valid DROWeighting or fixed-weights config: {e}") from None
    if isinstance(out, FixedWeights) and out.weights.size != dataset_size:
        raise ValueError(f"{W}['rule']['fixed_weights'] has {out.weights.size} weights for dataset_size={dataset_size}")
    return out


def _check_params_fit(state: Mapping[str, Any], table: dict[str, Any], rule: Any) -> WeightParams | None:
    losses, groups = table["losses"], table["groups"]
    params = _check_params(state_entry(state, "params", W), state.get("group_threshold"), groups, state.get("tilt_cap"),
                           rule, state.get("group_split"), state.get("block_valley"))
    if params is not None and isinstance(rule, DROWeighting):
        # A saved run keeps its largest mass within about e^+-600 (it rebases otherwise); beyond e^700 the
        # masses would overflow or vanish, so such params were not saved by a sampler.
        first = table["first_losses"] if table["first_losses"] is not None else losses  # (as the table will track)
        top = (max_kept_loss(losses, params, groups, first=first) - params.shift) / params.temperature
        if not -700.0 <= top <= 700.0:
            raise ValueError(
                f"{W}['params'] do not fit the table: the largest kept loss gives log-mass {top:.4g} "
                f"(shift {params.shift!r}, temperature {params.temperature!r})"
            )
    return params


def _check_buffers(state: Mapping[str, Any], n: int, sched: dict[str, int]) -> tuple[list, dict]:
    """The pending feedback records and the drawn-batch buffer."""
    pending = _check_records(state_entry(state, "pending", W), f"{W}['pending']", n, -MAX_LOSS, MAX_LOSS)
    for (step, seq), _, _ in pending:
        if not (0 <= step <= MAX_STEP and 0 <= seq < sched["seq"]):
            raise ValueError(f"{W}['pending'] holds a record with step {step}, seq {seq}: outside [0, {MAX_STEP}] / "
                             f"[0, {sched['seq']})")
    drawn = _check_records(state_entry(state, "drawn", W), f"{W}['drawn']", n, 0.0, 1.0 + 1e-9)
    for (b, _), _, _ in drawn:
        if not 0 <= b <= sched["last_drawn"]:
            raise ValueError(f"{W}['drawn'] holds batch {b}, outside [0, last_drawn={sched['last_drawn']}]")
    return [(k[0], k[1], i, v) for k, i, v in pending], {k[0]: (i, p) for k, i, p in drawn}


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _check_params(
    params: Any, group_threshold: Any, groups: np.ndarray | None, tilt_cap: Any = None, rule: Any = None,
    group_split: Any = None, block_valley: Any = None,
) -> WeightParams | None:
    """The saved params (with the tilt cap, the split's thresholds and the block's valley when saved), and the
    gates on the cut of ``rule`` (checked before: they are options of the rule, not saved with the params)."""
    out = _check_cut_params(params, group_threshold, groups)
    if out is not None and block_valley is not None:
        if isinstance(block_valley, bool) or not isinstance(block_valley, numbers.Real) or not math.isfinite(block_valley):
            raise ValueError(f"state_dict['block_valley'] must be a finite number, got {block_valley!r}")
        out = out._replace(block_valley=float(block_valley))
    if out is not None and group_split is not None:
        out = out._replace(group_split=_check_group_split(group_split, groups, rule))
    elif out is not None and groups is not None and isinstance(rule, DROWeighting) and rule.gates_split:
        raise ValueError("state_dict['group_split'] is missing: cut_rule='zscore-mode-split-gated' with groups saves it")
    if out is not None and isinstance(rule, DROWeighting):
        out = rule.gated(out)
    if out is None or tilt_cap is None:
        return out
    where = "state_dict['tilt_cap']"
    if not isinstance(tilt_cap, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(tilt_cap).__name__}")
    cap, group_cap = state_entry(tilt_cap, "cap", where), state_entry(tilt_cap, "group_cap", where)
    if (cap is None) == (group_cap is None):
        raise ValueError(f"{where} must hold exactly one of cap and group_cap, got {tilt_cap!r}")
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, numbers.Real) or math.isnan(cap):
            raise ValueError(f"{where}['cap'] must be a number (not NaN), got {cap!r}")
        return out._replace(cap=float(cap))
    return out._replace(group_cap=_per_group_values(group_cap, f"{where}['group_cap']", groups))


def _per_group_values(value: Any, where: str, groups: np.ndarray | None) -> np.ndarray:
    """A saved per-group vector (thresholds, caps, splits) as float64: one number per group, no NaN, and only
    for a table with groups."""
    per_group = state_array(value, where, kind="float", shape=(count_groups(groups),))
    if groups is None or np.isnan(per_group).any():
        raise ValueError(f"{where} needs a table with groups and holds no NaN")
    return per_group.astype(np.float64)


def _check_group_split(group_split: Any, groups: np.ndarray | None, rule: Any) -> np.ndarray:
    where = "state_dict['group_split']"
    per_group = _per_group_values(group_split, where, groups)
    if not (isinstance(rule, DROWeighting) and rule.gates_split):
        raise ValueError(f"{where} is saved by cut_rule='zscore-mode-split-gated', not by this state's rule")
    return per_group


def _check_cut_params(params: Any, group_threshold: Any, groups: np.ndarray | None) -> WeightParams | None:
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
    return WeightParams(*values, group_threshold=_per_group_values(group_threshold, "state_dict['group_threshold']",
                                                                   groups))


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
    """Validate packed ragged records (see :func:`pack_records`) and unpack them."""
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


def pack_records(keys: list[tuple[int, int]], indices: list[np.ndarray], values: list[np.ndarray]) -> dict[str, Any]:
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
