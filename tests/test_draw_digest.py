"""Same behaviour, bit for bit: the sampler's draws, probabilities, stats and states equal the digests
taken before the sampler was split into one concern per file (tests/data/draw_digest.json), and
states saved by that code resume with the same continuation (tests/data/legacy_states/).

The digests were taken on an x86-64 CPU without AVX-512. numpy picks its float64 ``exp``/``log``/``power``
loops by CPU at import, and its AVX-512 loops round differently in the last bit; so does the OpenBLAS
numpy ships (its SkylakeX kernels against Haswell ones: 13 of the 16 scenarios moved on an AVX-512 Xeon
with numpy's loops pinned alone). The digests are computed in a subprocess with all of these held to
AVX2 (``NPY_DISABLE_CPU_FEATURES``, ``OPENBLAS_CORETYPE``, and torch's ``ATEN_CPU_CAPABILITY`` and MKL
likewise): the comparison is between code versions, not between machines."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import _draw_digest as dd
import pytest
import torch

HERE = Path(__file__).parent
DATA = HERE / "data"
EXPECTED = json.loads((DATA / "draw_digest.json").read_text())


def _pinned_env(disable: str = "AVX512") -> dict[str, str]:
    """The environment with numpy's dispatched features whose names start with ``disable`` switched off
    (naming one numpy does not dispatch only warns, so the names come from numpy itself)."""
    env = dict(os.environ)
    if platform.machine().lower() in ("x86_64", "amd64"):
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(f for f in dd.numpy_umath().__cpu_dispatch__ if f.startswith(disable))
        env["ATEN_CPU_CAPABILITY"] = "avx2"
        env["MKL_ENABLE_INSTRUCTIONS"] = "AVX2"
        if disable == "AVX512":
            env["OPENBLAS_CORETYPE"] = "Haswell"
    return env


@pytest.fixture(scope="module")
def digests() -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(HERE / "_draw_digest.py"), "--print", str(DATA)],
        env=_pinned_env(), cwd=HERE, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("disable", ["AVX512", "AVX2"])
def test_the_pin_switches_numpy_loops_off(disable: str) -> None:
    """The pin is real: numpy in a pinned process uses none of the named features (AVX2 shows that the
    switch works on a machine that has no AVX-512 to switch off)."""
    env = _pinned_env(disable)
    if "NPY_DISABLE_CPU_FEATURES" not in env:
        pytest.skip("not x86-64: numpy has no AVX loops to switch off")
    # The dispatch targets only: sub-features such as AVX512BW are reported as the CPU has them, but numpy
    # picks its loops by target.
    code = ("import json, _draw_digest as dd\nm = dd.numpy_umath()\n"
            "print(json.dumps(sorted(k for k in m.__cpu_dispatch__ if m.__cpu_features__[k])))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=HERE, capture_output=True, text=True, check=True)
    used = json.loads(out.stdout.strip().splitlines()[-1])
    assert not [f for f in used if f.startswith(disable)], used
    if disable == "AVX512":
        pytest.importorskip("threadpoolctl")
        code = ("import json, numpy, threadpoolctl\nprint(json.dumps([i.get('architecture') for i in "
                "threadpoolctl.threadpool_info() if i['internal_api'] == 'openblas']))")
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=HERE, capture_output=True, text=True, check=True)
        assert set(json.loads(out.stdout.strip().splitlines()[-1])) <= {"Haswell"}


@pytest.mark.parametrize("name", sorted(dd.SCENARIOS))
def test_scenario_digest_unchanged(name: str, digests: dict[str, Any]) -> None:
    assert digests["scenarios"][name] == EXPECTED["scenarios"][name]


def test_streaming_plan_digest_unchanged(digests: dict[str, Any]) -> None:
    assert digests["streaming-plan"] == EXPECTED["streaming-plan"]


@pytest.mark.parametrize("draws", ["balanced", "iid"])
def test_legacy_state_resumes_unchanged(draws: str, digests: dict[str, Any]) -> None:
    assert digests["legacy-continuation"][draws] == EXPECTED["legacy-continuation"][draws]


@pytest.mark.parametrize("draws", ["balanced", "iid"])
def test_legacy_state_equals_a_fresh_run(draws: str) -> None:
    """The committed file is what the current code saves too (the state format did not move), but for the
    balanced draws' key-tree keys, which states keep since deferred keys (without them a state draws
    without deferral, as before); the fresh state does not differ otherwise."""
    saved = torch.load(DATA / "legacy_states" / f"{draws}.pt", weights_only=True)
    fresh = dd.legacy_state(draws)
    if draws == "balanced":
        assert "keys" in fresh["balanced"] and "keys" not in saved["balanced"]
        del fresh["balanced"]["keys"]
    assert dd.continuation_digest(saved) == dd.continuation_digest(fresh)
