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
    p = rule.probabilities(table, params)
    assert _value(out, "truncated fraction") == pytest.approx(float(np.mean(p == 0)), abs=1e-4)


def test_inspect_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect"])
    assert e.value.code == 2
    assert main(["inspect", "x.pt", "--top", "0"]) == 2
