"""A fixed-seed digest of everything the map-style sampler and the streaming planner produce.

Run as a script (``python tests/_draw_digest.py tests/data``) to write the expected digests and legacy states; ``tests/test_draw_digest.py`` compares them with the values
committed in ``tests/data/draw_digest.json``, which were taken on the code *before* the sampler was
split into one concern per file. Equal digests mean the split changed no draw, probability, stat or
saved state, bit for bit.

Each scenario runs the public protocol (``iter``, ``update``, ``probabilities``, ``importance_weights``,
``stats``, ``state_dict``, ``load_state_dict``) for a few epochs with synthetic losses, on 1 or 2 ranks
(two samplers fed the same feedback), and folds every output into one blake2b digest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from typing import Any

import numpy as np
import torch
from _core_helpers import iter_batches

from irdro_sampler import IRDROSampler, balanced_counts, initial_carry

N = 600
BATCH = 16
EPOCHS = 3


def _fold(h: Any, obj: Any) -> None:
    """Feed ``obj`` (nested dicts/lists of tensors, arrays and primitives) into ``h``, canonically."""
    if isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _fold(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for x in obj:
            _fold(h, x)
        h.update(b"]")
    elif isinstance(obj, torch.Tensor):
        _fold(h, obj.detach().cpu().numpy())
    elif isinstance(obj, np.ndarray):
        h.update(f"{obj.dtype.str}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, float):
        h.update(repr(float(obj)).encode())
    else:
        h.update(repr(obj).encode())


def _losses(idx: list[int], step: int, noisy: np.ndarray) -> np.ndarray:
    i = np.asarray(idx, dtype=np.int64)
    base = (i * 2654435761 % 1000) / 400.0 + 0.05 * np.sin(0.3 * step + i)
    return np.where(noisy[i], base + 6.0, base) + 0.01


def run_scenario(*, draws: str, groups: bool, cut: str, ranks: int, replay: bool) -> str:
    """One scenario's digest: draws, probabilities, importance weights, stats and states."""
    h = hashlib.blake2b(digest_size=16)
    labels = (np.arange(N) * 7 % 5).astype(np.int64) if groups else None
    noisy = (np.arange(N) % 17) == 3
    # Pinned to the rule that was the default when the digests were taken (issue 18 changed the default to
    # "zscore-mode", gated the cut on the first losses, scaled the tilt by the groups' share of the loss
    # spread, faded it with the cut's share and did not count a block of unlearnable samples in that fade; the
    # rule is part of the state).
    rule: dict[str, Any] = {"cut_rule": "zscore", "cut_learned_ratio": None, "group_tilt_share": None,
                            "tilt_fade_cut": None, "tilt_fade_skip_block": False}
    if cut == "none":
        rule["truncate_zscore"] = None
    elif cut == "quantile":
        rule["truncate_quantile"] = 0.9
    elif cut == "kl":
        rule["kl_radius"] = 0.3
        rule["ess_fraction"] = None
    kwargs = dict(groups=labels, draws=draws, seed=11, feedback_delay=3, refresh_interval=5, **rule)
    samplers = [IRDROSampler(N, BATCH, num_replicas=ranks, rank=r, **kwargs) for r in range(ranks)]
    step = 0
    saved = None
    for epoch in range(EPOCHS):
        for s in samplers:
            s.set_epoch(epoch)
        iters = [iter_batches(s) for s in samplers]
        for parts in zip(*iters, strict=True):
            idx = [i for p in parts for i in p]
            _fold(h, idx)
            loss = _losses(idx, step, noisy)
            for s in samplers:
                s.update(idx, torch.from_numpy(loss), step=step)
            if step % 7 == 0:
                _fold(h, samplers[0].probabilities())
                _fold(h, samplers[0].importance_weights(idx, step=step))
                _fold(h, samplers[-1].importance_weights(idx[:5]))
            if step == 20:
                saved = [s.state_dict() for s in samplers]
            step += 1
        _fold(h, samplers[0].stats())
        _fold(h, samplers[-1].state_dict())
    # Resume from the state saved at step 20 and continue: the continuation must equal the run above.
    assert saved is not None
    resumed = [IRDROSampler(N, BATCH, num_replicas=ranks, rank=r, **kwargs) for r in range(ranks)]
    for s, st in zip(resumed, saved, strict=True):
        s.load_state_dict(st)
    epoch = 21 // samplers[0].batches_per_epoch
    b_in = 21 % samplers[0].batches_per_epoch
    for s in resumed:
        s.set_epoch(epoch)
        if not replay:
            s.set_start_batch(b_in)
    iters = [iter_batches(s) for s in resumed]
    step = 21 if not replay else epoch * samplers[0].batches_per_epoch
    for parts in itertools.islice(zip(*iters, strict=True), 12):
        idx = [i for p in parts for i in p]
        _fold(h, idx)
        if step >= 21:
            loss = _losses(idx, step, noisy)
            for s in resumed:
                s.update(idx, torch.from_numpy(loss), step=step)
        step += 1
    _fold(h, resumed[0].stats())
    _fold(h, resumed[-1].state_dict())
    return h.hexdigest()


def streaming_plan_digest() -> str:
    """The streaming path's per-round counts (carried rounding) over a few rounds of changing weights."""
    h = hashlib.blake2b(digest_size=16)
    rng = np.random.default_rng(5)
    carry = initial_carry(N, 3)
    for _ in range(6):
        p = rng.random(N) ** 3
        p /= p.sum()
        counts, carry = balanced_counts(carry, p, 400)
        _fold(h, counts)
        _fold(h, carry)
    return h.hexdigest()


SCENARIOS = {
    f"{draws}-{'groups' if groups else 'nogroups'}-{cut}-{ranks}rank{'-replay' if replay else ''}": dict(
        draws=draws, groups=groups, cut=cut, ranks=ranks, replay=replay
    )
    for draws in ("balanced", "iid")
    for groups in (False, True)
    for cut, ranks, replay in (("zscore", 1, False), ("quantile", 2, True), ("none", 1, True), ("kl", 2, False))
}




def legacy_state(draws: str) -> dict[str, Any]:
    """A state saved mid-run (step 30) by the scenario sampler: committed once as a file from old code."""
    labels = (np.arange(N) * 7 % 5).astype(np.int64) if draws == "balanced" else None
    noisy = (np.arange(N) % 17) == 3
    s = IRDROSampler(N, BATCH, groups=labels, draws=draws, seed=4, feedback_delay=3, refresh_interval=5,
                     cut_rule="zscore", cut_learned_ratio=None,
                     group_tilt_share=None, tilt_fade_cut=None,
                     tilt_fade_skip_block=False)  # the defaults when the legacy states were saved
    step = 0
    for epoch in range(3):
        s.set_epoch(epoch)
        for idx in iter_batches(s):
            s.update(idx, _losses(idx, step, noisy), step=step)
            step += 1
            if step == 30:
                return s.state_dict()
    raise AssertionError("unreachable")


def continuation_digest(state: dict[str, Any]) -> str:
    """Resume ``state`` in a fresh sampler and run 40 more batches: digest of draws, stats, state."""
    h = hashlib.blake2b(digest_size=16)
    noisy = (np.arange(N) % 17) == 3
    s = IRDROSampler.from_state_dict(state)
    step = 30
    epoch, start = divmod(step, s.batches_per_epoch)
    for e in range(epoch, epoch + 2):
        s.set_epoch(e)
        if e == epoch:
            s.set_start_batch(start)
        for idx in iter_batches(s):
            _fold(h, idx)
            s.update(idx, _losses(idx, step, noisy), step=step)
            step += 1
    _fold(h, s.probabilities())
    _fold(h, s.stats())
    _fold(h, s.state_dict())
    return h.hexdigest()


def numpy_umath() -> Any:
    """numpy's ufunc core module, which reports the CPU features it dispatches and uses."""
    try:
        import numpy._core._multiarray_umath as umath  # numpy 2
    except ImportError:  # numpy 1.x
        import numpy.core._multiarray_umath as umath
    return umath


def current_digests(data_dir: str) -> dict[str, Any]:
    """Every digest the committed file holds, computed by the code under test (the legacy
    continuations from the committed state files)."""
    import os

    legacy = {}
    for draws in ("balanced", "iid"):
        state = torch.load(os.path.join(data_dir, "legacy_states", f"{draws}.pt"), weights_only=True)
        legacy[draws] = continuation_digest(state)
    return {
        "scenarios": {name: run_scenario(**cfg) for name, cfg in SCENARIOS.items()},
        "streaming-plan": streaming_plan_digest(),
        "legacy-continuation": legacy,
    }


def write_expected(data_dir: str) -> None:
    """Write draw_digest.json and the legacy state files (run once, on the code before the split)."""
    import os

    os.makedirs(os.path.join(data_dir, "legacy_states"), exist_ok=True)
    for draws in ("balanced", "iid"):
        torch.save(legacy_state(draws), os.path.join(data_dir, "legacy_states", f"{draws}.pt"))
    out = current_digests(data_dir)
    with open(os.path.join(data_dir, "draw_digest.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--print"]:  # what tests/test_draw_digest.py compares, as JSON on stdout
        print(json.dumps(current_digests(sys.argv[2])))
    else:
        write_expected(sys.argv[1] if len(sys.argv) > 1 else "tests/data")
