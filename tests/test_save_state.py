"""save_state: a process killed mid-save never costs the last good state (issue 12, item 5)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _core_helpers import assert_state_equal

from irdro_sampler import IRDROSampler, save_state

ROOT = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent(
    """
    import sys
    import torch
    from irdro_sampler import save_state

    path, start = sys.argv[1], int(sys.argv[2])
    big = torch.arange(3_000_000, dtype=torch.float32)  # ~12 MB: a save takes long enough to be hit
    print("ready", flush=True)
    i = start
    while True:
        save_state({"i": i, "payload": big + i}, path)
        print(i, flush=True)  # reported only after save_state returned
        i += 1
    """
)


def test_save_state_round_trip_and_permissions(tmp_path):
    s = IRDROSampler(50, 5, seed=3)
    s.update([1, 2], [0.5, 1.5], step=0)
    path = tmp_path / "sampler.pt"
    save_state(s.state_dict(), path)
    save_state(s.state_dict(), str(path))  # over an existing file
    assert_state_equal(torch.load(path, weights_only=True), s.state_dict())
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["sampler.pt"]  # no temporary left
    with pytest.raises(IsADirectoryError):
        save_state({}, tmp_path)
    with pytest.raises(FileNotFoundError, match="folder"):
        save_state({}, tmp_path / "missing" / "x.pt")


def test_failed_save_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "s.pt"
    save_state({"i": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_state({"bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"i": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


@pytest.mark.slow
def test_sigkill_mid_save_never_loses_the_last_good_state(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "state.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rng = np.random.default_rng(0)
    last_reported = -1
    start = 0
    kills_mid_write = 0
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(start)], stdout=subprocess.PIPE,
                                text=True, env=env)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 0.6)))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        done = [int(x) for x in out.split()]
        if done:
            last_reported = done[-1]
        kills_mid_write += any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
        if last_reported < 0:
            continue  # killed before its first save completed: nothing to lose yet
        state = torch.load(path, weights_only=True)  # always a complete file
        # The file holds the last reported save or the one after it (killed after os.replace, before print).
        assert state["i"] in (last_reported, last_reported + 1)
        assert torch.equal(state["payload"][:5], torch.arange(5, dtype=torch.float32) + state["i"])
        start = state["i"] + 1
        last_reported = state["i"]
    assert last_reported >= 0
    assert kills_mid_write >= 1, "no kill landed inside a save: the test proved nothing"
    # The next save removes the temporaries of the killed writers.
    save_state({"i": -1}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt", "writer.py"]
