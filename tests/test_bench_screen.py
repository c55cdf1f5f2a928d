"""benchmarks/bench_screen.py stays runnable: its --quick run prints a row per sampler and world size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_prints_every_row():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_screen.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "Sampler" in line]
    assert [r.split("|")[1:3] for r in rows] == [[" IRDROSampler ", " 1 "], [" ShardedIRDROSampler ", " 1 "],
                                                [" ShardedIRDROSampler ", " 2 "]]
    ratios = [float(r.split("|")[5]) for r in rows]
    assert all(x > 0 for x in ratios)
