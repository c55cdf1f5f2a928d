"""The installed mosaicml-streaming is one whose internals the integration was checked against.

A new streaming release that changes any function WeightedStreamingDataset copies or overrides fails
here (in CI), not in a user's training run.
"""

from __future__ import annotations

import ast
import importlib
import os
import tempfile
import warnings
from pathlib import Path

import pytest

streaming = pytest.importorskip("streaming")
from _streaming_data import fresh_local, write_mds  # noqa: E402

from irdro_sampler.integrations import _streaming_compat as compat  # noqa: E402

INTEGRATIONS = Path(__file__).resolve().parents[1] / "irdro_sampler" / "integrations"


def test_installed_streaming_is_a_tested_version():
    assert streaming.__version__ in compat.TESTED_VERSIONS, (
        f"mosaicml-streaming {streaming.__version__} is not among the checked versions {compat.TESTED_VERSIONS}: "
        "read the changed internals (see _streaming_compat), then add the version"
    )


def test_copied_internals_are_the_checked_ones():
    now = compat.source_hashes()
    assert set(now) == set(compat.CHECKED_SOURCES)
    changed = compat.changed_internals()
    assert not changed, (
        f"mosaicml-streaming {streaming.__version__} changed {changed}: WeightedStreamingDataset copies or "
        "overrides them; re-check irdro_sampler/integrations/streaming.py against the new source, then "
        f"update CHECKED_SOURCES ({ {k: now[k] for k in changed} })"
    )


def test_private_attributes_exist_on_a_real_dataset(tmp_path):
    from irdro_sampler.integrations.streaming import WeightedStreamingDataset

    remote = write_mds(str(tmp_path), 40, 10)
    ds = WeightedStreamingDataset(round_size=8, remote=remote, local=fresh_local(str(tmp_path)), batch_size=4)
    assert len(list(ds)) == 8  # the worker worlds are set when iteration starts
    missing = [name for name in compat.PRIVATE_ATTRIBUTES if not hasattr(ds, name)]
    assert not missing
    stream = ds.streams[0]
    assert all(hasattr(stream, name) for name in compat.STREAM_PRIVATE_ATTRIBUTES)


def test_no_integration_module_imports_private_streaming_names_itself():
    """Every private name of streaming goes through _streaming_compat (one place to re-check)."""
    offenders = []
    for path in INTEGRATIONS.glob("*.py"):
        if path.name == "_streaming_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("streaming"):
                names = [a.name for a in node.names]
                if node.module != "streaming" or any(n.startswith("_") for n in names):
                    offenders.append(f"{path.name}: from {node.module} import {', '.join(names)}")
    assert not offenders, offenders


@pytest.mark.parametrize("version, warns", [("0.99.0", True), ("0.12.0", False), ("0.13.0", False)])
def test_warns_only_on_untested_versions(monkeypatch, version, warns):
    monkeypatch.setattr(streaming, "__version__", version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.reload(compat)
    messages = [str(w.message) for w in caught if "mosaicml-streaming" in str(w.message)]
    assert bool(messages) == warns, messages
    if warns:
        assert version in messages[0] and "0.12.0, 0.13.0" in messages[0]
        assert "internals it copies are unchanged" in messages[0]  # same sources, only the version is new


def test_pyproject_allows_exactly_the_tested_range():
    text = (INTEGRATIONS.parents[1] / "pyproject.toml").read_text()
    assert text.count('"mosaicml-streaming>=0.12,<0.14"') == 2  # the streaming and demo extras
    assert "mosaicml-streaming==" not in text
    assert os.path.exists(INTEGRATIONS / "_streaming_compat.py")


def test_nothing_sweeps_other_processes_shared_memory():
    """streaming's clean_stale_shared_memory() unlinks every block of prefixes 0, 1, ... that exists,
    including those of *live* datasets in other processes: a demo running next to the test suite then
    ended with 1 + 6 resource_tracker warnings per swept dataset (19 for its three datasets). Tests use
    fresh local folders instead, so nothing here may call it."""
    root = INTEGRATIONS.parents[1]
    name = "clean_stale_" + "shared_memory"
    callers = [
        str(p.relative_to(root))
        for folder in ("irdro_sampler", "tests", "benchmarks", "examples")
        for p in (root / folder).rglob("*.py")
        if p.name != "test_streaming_compat.py" and name in p.read_text()
    ]
    assert not callers, callers


@pytest.mark.skipif(not os.path.isdir(compat.SHM_FOLDER), reason="shared memory is not under /dev/shm here")
def test_an_empty_block_left_by_a_killed_run_does_not_break_later_datasets(tmp_path):
    """A process stopped between creating a streaming block and sizing it leaves a 0-byte block; streaming's
    search for a free prefix then fails on it. Our datasets remove such blocks (older than a few seconds)
    before streaming searches; a block being created right now (fresh) is left alone."""
    import time

    from streaming.base.constant import SHM_TO_CLEAN

    from irdro_sampler.integrations.streaming import WeightedStreamingDataset

    assert "cache_usage" in SHM_TO_CLEAN  # streaming attaches to this block of every prefix it passes
    remote = write_mds(str(tmp_path), 100, 50)

    def make(cls, **kw):
        return cls(remote=remote, local=fresh_local(str(tmp_path)), batch_size=10, **kw)

    def plant(prefixes, age_s):
        planted = []
        for p in prefixes:
            path = os.path.join(compat.SHM_FOLDER, compat.shm_name(p, "cache_usage"))
            if not os.path.exists(path):
                open(path, "wb").close()
                os.utime(path, (time.time() - age_s,) * 2)
                planted.append(path)
        return planted

    # Below every free prefix the search could pick: it skips prefixes with file locks in the temp folder, and
    # runs killed earlier on this machine may have left such locks behind (thousands of them on a busy one).
    locked = [int(name.split("_", 1)[0]) for name in os.listdir(tempfile.gettempdir())
              if name.endswith("_filelock") and name.split("_", 1)[0].isdigit()]
    stale = plant(range(0, max(locked, default=-1) + 2000), age_s=60)
    fresh = plant([999_999], age_s=0)
    try:
        with pytest.raises(ValueError, match="empty file"):  # the hazard, in streaming itself
            make(streaming.StreamingDataset)
        ds = make(WeightedStreamingDataset, round_size=50)
        # (the new dataset's own block may now have one of the names, sized)
        assert not [p for p in stale if os.path.exists(p) and os.path.getsize(p) == 0]
        assert all(os.path.exists(p) for p in fresh)
        ds.close()
    finally:
        for p in stale + fresh:
            if os.path.exists(p) and os.path.getsize(p) == 0:
                os.unlink(p)
