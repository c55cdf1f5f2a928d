"""``irdro-sampler inspect``: real sampler states, a real Composer checkpoint, and bad inputs."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from irdro_sampler import IRDROSampler
from irdro_sampler.cli import load_inspection, main


def _trained_sampler(n: int = 500, seed: int = 0, **kw) -> IRDROSampler:
    s = IRDROSampler(n, 16, seed=seed, **kw)
    rng = np.random.default_rng(seed)
    it = iter(s)
    for step in range(20):
        idx = np.array([next(it) for _ in range(16)])
        s.update(idx, rng.gamma(2.0, 1.0, size=16) + (idx % 50 == 0) * 10.0, step=step)
    return s


def _value(out: str, name: str) -> float:
    m = re.search(rf"^\s*{re.escape(name)}\s+(\S+)", out, flags=re.M)
    assert m, f"{name!r} not in output:\n{out}"
    return math.inf if m.group(1) == "none" else float(m.group(1))


def test_inspect_saved_sampler_state(tmp_path, capsys):
    s = _trained_sampler(truncate_quantile=0.9)
    path = tmp_path / "sampler.pt"
    torch.save(s.state_dict(), path)
    assert main(["inspect", str(path), "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "buffered updates applied" in out  # 20 steps < feedback_delay: all feedback still buffered
    s.flush()  # inspect reports the state with the buffered feedback applied
    st = s.stats()
    assert _value(out, "ESS fraction") == pytest.approx(st["ess_fraction"], abs=1e-4)
    assert _value(out, "KL to uniform") == pytest.approx(st["kl_to_uniform"], abs=1e-4)
    assert _value(out, "temperature") == pytest.approx(st["temperature"], rel=1e-3)
    assert _value(out, "cut threshold") == pytest.approx(st["threshold"], abs=1e-4)
    assert _value(out, "seen fraction") == pytest.approx(st["seen_fraction"], abs=1e-4)
    assert "loss quantiles (seen)" in out
    # The listed top sample ids are the largest probabilities of the sampler itself.
    rows = re.findall(r"^\s+(\d+)\s+(\S+e[-+]\d+)\s", out, flags=re.M)
    assert len(rows) == 5
    p = s.probabilities()
    ids = [int(r[0]) for r in rows]
    assert np.allclose([p[i] for i in ids], np.sort(p)[::-1][:5])


def test_inspect_plot_writes_png(tmp_path, capsys):
    s = _trained_sampler(truncate_zscore=2.0)
    path = tmp_path / "sampler.pt"
    torch.save(s.state_dict(), path)
    png = tmp_path / "hist.png"
    assert main(["inspect", str(path), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000


def test_inspect_loads_exactly(tmp_path):
    """The rebuilt sampler's probabilities are the original's, bit for bit."""
    s = _trained_sampler(truncate_quantile=0.8)
    path = tmp_path / "s.pt"
    torch.save(s.state_dict(), path)
    ins = load_inspection(path)
    s.flush()
    assert np.array_equal(ins.probs, s.probabilities())
    assert np.array_equal(np.isnan(ins.losses), np.isnan(s.table.losses))


@pytest.mark.parametrize("kind", ["missing", "directory", "not_torch", "no_state", "empty", "bad_state"])
def test_inspect_bad_inputs_one_line_exit_2(tmp_path, kind):
    if kind == "missing":
        path = tmp_path / "nope.pt"
    elif kind == "directory":
        path = tmp_path
    elif kind == "not_torch":
        path = tmp_path / "x.txt"
        path.write_text("hello, not a checkpoint\n")
    elif kind == "no_state":
        path = tmp_path / "x.pt"
        torch.save({"state": {"model": {"w": torch.zeros(3)}, "algorithms": []}}, path)
    elif kind == "empty":
        path = tmp_path / "x.pt"
        path.write_bytes(b"")
    else:
        s = _trained_sampler()
        sd = s.state_dict()
        sd["table"] = {**sd["table"], "losses": torch.zeros(7)}  # wrong length
        path = tmp_path / "x.pt"
        torch.save(sd, path)
    proc = subprocess.run(
        [sys.executable, "-m", "irdro_sampler.cli", "inspect", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("irdro-sampler inspect: error:")
    assert proc.stdout == ""


def test_inspect_composer_checkpoint(tmp_path, capsys):
    """A real Composer checkpoint of a run with the IRDRO algorithm and an IRDROSampler."""
    pytest.importorskip("composer")
    from composer import Trainer
    from composer.models import ComposerModel
    from torch.utils.data import DataLoader, TensorDataset

    from irdro_sampler import IndexedDataset
    from irdro_sampler.integrations.composer import IRDRO

    class Tiny(ComposerModel):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

        def forward(self, batch):  # batch = (x, y, sample index) from IndexedDataset
            return self.net(batch[0])

        def loss(self, outputs, batch):
            return torch.nn.functional.cross_entropy(outputs, batch[1])

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = (x[:, 0] > 0).long()
    ds = IndexedDataset(TensorDataset(x, y))
    sampler = IRDROSampler(ds, 16, truncate_quantile=0.9, seed=0)
    loader = DataLoader(ds, batch_size=16, sampler=sampler)
    model = Tiny()
    trainer = Trainer(model=model, train_dataloader=loader, max_duration="12ba", algorithms=[IRDRO(log_interval=0)],
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                      device="cpu", progress_bar=False, log_to_console=False, loggers=[], seed=0)
    trainer.fit()
    ckpt = tmp_path / "ckpt.pt"
    trainer.save_checkpoint(str(ckpt))
    trainer.close()
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "IRDROSampler state" in out
    sampler.flush()
    assert _value(out, "seen fraction") == pytest.approx(sampler.stats()["seen_fraction"], abs=1e-4)
    assert _value(out, "cut threshold") == pytest.approx(sampler.stats()["threshold"], abs=1e-4)


def test_inspect_streaming_table_state(tmp_path, capsys):
    """The streaming path's algorithm state (a loss table + the rule in the repr)."""
    from irdro_sampler import DROWeighting, LossTable

    table = LossTable(300)
    rng = np.random.default_rng(1)
    table.update(np.arange(200), rng.gamma(2.0, 1.0, 200), step=0)
    state = {"repr": "IRDRO(temperature=1.0, truncate_zscore=2.0, uniform_mix=0.1, mode='resample')",
             "version": 1, "mode": "resample", "table": table.state_dict()}
    path = tmp_path / "alg.pt"
    torch.save({"state": {"algorithms": [("IRDRO", state)]}}, path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    rule = DROWeighting(temperature=1.0, truncate_zscore=2.0, uniform_mix=0.1)
    params = rule.fit(table)
    assert _value(out, "cut threshold") == pytest.approx(params.threshold, abs=1e-4)
    assert _value(out, "seen fraction") == pytest.approx(200 / 300, abs=1e-4)
    # Cut samples keep the uniform floor (p = u / N), so the cut fraction is that of the kept mask.
    cut = float(np.mean(table.losses > params.threshold))  # NaN (unseen) compares False: never cut
    assert cut > 0
    assert _value(out, "truncated fraction") == pytest.approx(cut, abs=1e-4)


@pytest.mark.parametrize("cut_rule", ["log-zscore", "mixture"])
def test_inspect_streaming_table_uses_every_rule_option_of_the_repr(tmp_path, cut_rule):
    """Every DROWeighting option in the IRDRO repr (cut_rule and calibration_size included) decides the report."""
    from irdro_sampler import DROWeighting, LossTable

    table = LossTable(400)
    rng = np.random.default_rng(2)
    table.update(np.arange(400), np.where(rng.random(400) < 0.1, 8.0, 1.0) * rng.gamma(2.0, 1.0, 400), step=0)
    opts = dict(temperature=1.0, truncate_zscore=2.0, cut_rule=cut_rule, calibration_size=64)
    state = {"repr": f"IRDRO({', '.join(f'{k}={v!r}' for k, v in opts.items())}, mode='resample')",
             "version": 1, "mode": "resample", "table": table.state_dict()}
    path = tmp_path / "alg.pt"
    torch.save(state, path)
    ins = load_inspection(path)
    rule = DROWeighting(**opts)
    assert ins.stats["threshold"] == rule.fit(table).threshold
    assert ins.stats["threshold"] != DROWeighting(temperature=1.0, truncate_zscore=2.0).fit(table).threshold
    np.testing.assert_array_equal(ins.probs, rule.probabilities(table))


def test_inspect_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect"])
    assert e.value.code == 2
    assert main(["inspect", "x.pt", "--top", "0"]) == 2


# ------------------------------------------------------------------- untrusted files (issue 12, item 1)
class _Evil:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _inspect_subprocess(path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "irdro_sampler.cli", "inspect", str(path)],
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _composer_checkpoint(tmp_path):
    """A real Composer checkpoint (a tiny Trainer run with IRDRO)."""
    from composer import Trainer
    from composer.models import ComposerModel
    from torch.utils.data import DataLoader, TensorDataset

    from irdro_sampler import IndexedDataset
    from irdro_sampler.integrations.composer import IRDRO

    class Tiny(ComposerModel):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 2)

        def forward(self, batch):
            return self.net(batch[0])

        def loss(self, outputs, batch):
            return torch.nn.functional.cross_entropy(outputs, batch[1])

    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    ds = IndexedDataset(TensorDataset(x, (x[:, 0] > 0).long()))
    loader = DataLoader(ds, batch_size=8, sampler=IRDROSampler(ds, 8, seed=0))
    model = Tiny()
    trainer = Trainer(model=model, train_dataloader=loader, max_duration="6ba", algorithms=[IRDRO(log_interval=0)],
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                      device="cpu", progress_bar=False, log_to_console=False, loggers=[], seed=0)
    trainer.fit()
    ckpt = tmp_path / "ckpt.pt"
    trainer.save_checkpoint(str(ckpt))
    trainer.close()
    return ckpt


@pytest.mark.slow
def test_inspect_never_runs_code_from_the_file(tmp_path):
    import pickle

    pytest.importorskip("composer")
    marker = tmp_path / "PWNED"
    state = _trained_sampler().state_dict()
    ckpt = _composer_checkpoint(tmp_path)
    # The real checkpoint inspects fine with the restricted loader.
    proc = _inspect_subprocess(ckpt)
    assert proc.returncode == 0, proc.stderr
    assert "IRDROSampler state" in proc.stdout

    evil = _Evil(marker)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(evil, protocol=2))
    raw5 = tmp_path / "raw5.pkl"
    raw5.write_bytes(pickle.dumps(evil, protocol=5))  # opcodes torch's restricted unpickler does not read
    assert "nothing in it was run" in _one_error_line(_inspect_subprocess(raw5))
    alone = tmp_path / "alone.pt"
    torch.save(evil, alone)
    in_state = tmp_path / "in_state.pt"
    torch.save({**state, "extra": evil}, in_state)
    trusted = torch.load(ckpt, weights_only=False)  # our own file: fine to load fully here
    trusted["state"]["algorithms"][0][1]["note"] = evil
    in_ckpt = tmp_path / "in_ckpt.pt"
    torch.save(trusted, in_ckpt)
    for path in (raw, alone, in_state, in_ckpt):
        line = _one_error_line(_inspect_subprocess(path))
        assert "refused" in line and "system" in line, line
        assert not marker.exists(), f"{path.name}: code from the file ran"
    # The files are armed: a full unpickle does create the marker (so the checks above can fail).
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(in_state)!r}, weights_only=False)"],
                   check=True, capture_output=True, timeout=120)
    assert marker.exists()


def test_inspect_refuses_a_named_pipe_at_once(tmp_path):
    import os

    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    line = _one_error_line(_inspect_subprocess(fifo, timeout=60))  # would block forever if opened
    assert "not a regular file" in line


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda s: s.update(dataset_size=10**12), "dataset_size|num_samples"),
        (lambda s: s["table"].update(num_samples=10**12), "num_samples"),
        (lambda s: s["pending"]["indices"].__setitem__(0, 10**9), "pending"),
        (lambda s: s["pending"]["values"].__setitem__(0, 1e39), "pending"),
    ],
    ids=["dataset_size", "table_size", "pending_index", "pending_loss_1e39"],
)
def test_inspect_absurd_states_one_line(tmp_path, mutate, words):
    state = _trained_sampler().state_dict()
    mutate(state)
    path = tmp_path / "s.pt"
    torch.save(state, path)
    assert path.stat().st_size < 200_000
    line = _one_error_line(_inspect_subprocess(path))
    assert re.search(words, line), line


def test_inspect_absurd_streaming_table_one_line(tmp_path):
    from irdro_sampler import LossTable

    table = LossTable(30).state_dict()
    table["num_samples"] = 10**12
    path = tmp_path / "alg.pt"
    torch.save({"state": {"algorithms": [("IRDRO", {"repr": "IRDRO()", "table": table})]}}, path)
    line = _one_error_line(_inspect_subprocess(path))
    assert "loss-table state is malformed" in line and "shape" in line
