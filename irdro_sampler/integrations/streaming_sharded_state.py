"""The checkpoint entry of a :class:`ShardedWeightedStreamingDataset`: one per rank, loadable on any world size.

Each rank's ``state_dict`` holds streaming's resume state and, under :data:`STATE_KEY`, the planned rounds
(frozen and pending: the same on every rank) and the rows of its own ids ``[first, stop)``: the balanced
draws' carry at the pending round's start and after it, and the weights it was planned from. Loading
takes this rank's state (same world size) or a list of every rank's states (any world size: each rank
cuts the rows of its own ids out of them; ``torch.load(..., mmap=True)`` keeps them out of memory, but
every state's rows are read once for the finiteness check, so each rank reads O(N) from disk). Everything
is checked before anything is restored; a mismatch is a
``ValueError`` naming the state and the field.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["STATE_KEY", "STATE_VERSION", "SavedRounds", "read_states", "sharded_entry"]

STATE_KEY = "irdro_sharded"
STATE_VERSION = 1
#: The fields every state must share with the loading dataset.
IDENTITY = ("num_samples", "round_size", "seed", "draws", "num_shards")
_ROWS = ("carry_start", "carry_after", "weights")


class SavedRounds(NamedTuple):
    """Checked saved state: ``(round, ids, probabilities)`` or None per planned round, and the loading
    rank's rows (None where the saving run had none: i.i.d. draws, or the seeded phases)."""

    frozen: tuple | None
    pending: tuple | None
    carry_start: np.ndarray | None
    carry_after: np.ndarray | None
    weights: np.ndarray | None


def sharded_entry(identity: dict[str, Any], first: int, stop: int, frozen: tuple | None, pending: tuple | None,
                  rows: dict[str, np.ndarray | None]) -> dict[str, Any]:
    """The :data:`STATE_KEY` entry: ``frozen``/``pending`` as ``(round, ids, probabilities)`` or None,
    ``rows`` the arrays of :data:`_ROWS` over ids ``[first, stop)``."""

    def tensor(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.array(a))

    def planned(r: tuple | None) -> dict[str, Any] | None:
        return None if r is None else {"round": int(r[0]), "ids": tensor(r[1]), "probabilities": tensor(r[2])}

    return {"version": STATE_VERSION, **identity, "first": int(first), "stop": int(stop),
            "frozen": planned(frozen), "pending": planned(pending), **{k: tensor(rows[k]) for k in _ROWS}}


def _array(value: Any, where: str, size: int, dtype: Any) -> np.ndarray | None:
    if value is None:
        return None
    arr = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.shape != (size,) or arr.dtype != np.dtype(dtype):
        raise ValueError(f"{where}: expected {size} {np.dtype(dtype)}, got {arr.dtype}{arr.shape}")
    return arr


def _planned(entry: dict[str, Any], name: str, where: str, identity: dict[str, Any]) -> tuple | None:
    value = entry.get(name)
    if value is None:
        return None
    r, n = identity["round_size"], identity["num_samples"]
    ids = _array(value.get("ids"), f"{where}[{name!r}]['ids']", r, np.int64)
    p = _array(value.get("probabilities"), f"{where}[{name!r}]['probabilities']", r, np.float64)
    if ids is None or p is None or not isinstance(value.get("round"), int) or value["round"] < 0:
        raise ValueError(f"{where}[{name!r}]: incomplete planned round")
    if ids.size and (ids.min() < 0 or ids.max() >= n or np.any(np.diff(ids) < 0)):
        raise ValueError(f"{where}[{name!r}]: ids out of range or not ascending")
    if not (np.isfinite(p).all() and (p > 0).all()):
        raise ValueError(f"{where}[{name!r}]: probabilities must be finite and positive")
    return value["round"], ids, p


def _checked(entry: Any, where: str, identity: dict[str, Any]) -> tuple[int, int, tuple | None, tuple | None]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: missing; this state was not saved by ShardedWeightedStreamingDataset")
    if entry.get("version") != STATE_VERSION:
        raise ValueError(f"{where}['version']: expected {STATE_VERSION}, got {entry.get('version')!r}")
    for key in IDENTITY:
        if entry.get(key) != identity[key]:
            raise ValueError(f"{where}[{key!r}]: saved {entry.get(key)!r}, this dataset has {identity[key]!r}; exact "
                             "resumption needs the same")
    first, stop = entry.get("first"), entry.get("stop")
    if not (isinstance(first, int) and isinstance(stop, int) and 0 <= first <= stop <= identity["num_samples"]):
        raise ValueError(f"{where}['first'], ['stop']: not an id range of {identity['num_samples']} samples "
                         f"(got {first!r}, {stop!r})")
    for key in _ROWS:
        rows = _array(entry.get(key), f"{where}[{key!r}]", stop - first, np.float64)
        if rows is not None and not np.isfinite(rows).all():
            raise ValueError(f"{where}[{key!r}]: holds NaN or inf")
    frozen, pending = _planned(entry, "frozen", where, identity), _planned(entry, "pending", where, identity)
    if frozen is None and pending is None:
        raise ValueError(f"{where}: holds no planned round")
    return first, stop, frozen, pending


def _same_plan(a: tuple | None, b: tuple | None) -> bool:
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


def read_states(obj: Any, identity: dict[str, Any], start: int, stop: int) -> tuple[dict[str, Any], SavedRounds]:
    """Streaming's part of the (first) state and the checked :class:`SavedRounds` for ids ``[start, stop)``.

    ``obj``: one state dict, or a list of the states of every rank of the saving run.
    """
    states = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    if not states or not all(isinstance(s, dict) for s in states):
        raise TypeError("obj: expected the dict returned by state_dict, or a list of every rank's")
    names = ["obj"] if len(states) == 1 else [f"obj[{i}]" for i in range(len(states))]
    checked = [_checked(s.get(STATE_KEY), f"{names[i]}[{STATE_KEY!r}]", identity) for i, s in enumerate(states)]
    for i, c in enumerate(checked[1:], 1):
        if not (_same_plan(c[2], checked[0][2]) and _same_plan(c[3], checked[0][3])):
            raise ValueError(f"{names[i]}: its planned rounds differ from {names[0]}'s (states of different steps "
                             "or runs)")
    rows: dict[str, list] = {k: [] for k in _ROWS}
    cursor = start
    for i in sorted(range(len(states)), key=lambda i: checked[i][0]):
        first, end = checked[i][:2]
        if first <= cursor < end:
            take = slice(cursor - first, min(end, stop) - first)
            for key in _ROWS:
                value = states[i][STATE_KEY].get(key)
                rows[key].append(None if value is None else _array(value, "", end - first, np.float64)[take])
            cursor = min(end, stop)
    if cursor < stop:
        raise ValueError(f"obj: ids [{cursor}, {stop}) of this rank are in none of the states given; to resume on "
                         "another world size pass the list of every rank's states")
    combined = {}
    for key, parts in rows.items():
        if any(p is None for p in parts) and not all(p is None for p in parts):
            raise ValueError(f"obj: {key!r} is saved by some states and not by others")
        combined[key] = None if not parts or parts[0] is None else np.concatenate(parts).astype(np.float64)
    streaming_state = {k: v for k, v in states[0].items() if k != STATE_KEY}
    frozen, pending = checked[0][2], checked[0][3]
    return streaming_state, SavedRounds(_copied(frozen), _copied(pending), **combined)


def _copied(planned: tuple | None) -> tuple | None:
    return None if planned is None else (planned[0], planned[1].copy(), planned[2].copy())
