"""The drift guard: only the compat modules use private names of streaming or Composer objects.

``_streaming_compat.py`` and ``_composer_compat.py`` pin the sources of the private internals they
touch (``CHECKED_SOURCES``); that pin is worth something only if no other module reaches past them.
The checker (``tests/_private_names.py``) reads every module of ``irdro_sampler`` as an AST and flags
attribute access, reflection with private or built names, overrides and imports of streaming's and
Composer's private names. The planted violations below show that it sees each kind.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("streaming")
pytest.importorskip("composer")

from _private_names import (  # noqa: E402
    check_source,
    class_defined_names,
    foreign_names,
    is_private,
    self_attributes,
)

PACKAGE = Path(__file__).resolve().parents[1] / "irdro_sampler"
COMPAT_MODULES = ("integrations/_streaming_compat.py", "integrations/_composer_compat.py")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def checked_modules() -> list[Path]:
    compat = {PACKAGE / c for c in COMPAT_MODULES}
    return [p for p in sorted(PACKAGE.rglob("*.py")) if p not in compat]


def test_no_module_outside_the_compat_modules_uses_a_private_streaming_or_composer_name():
    found = [
        f"{path.relative_to(PACKAGE.parent)} {v}"
        for path in checked_modules()
        for v in check_source(path.read_text(encoding="utf-8"), module_name(path))
    ]
    assert not found, "use an accessor of _streaming_compat / _composer_compat instead:\n" + "\n".join(found)


# A module as someone might write it: every marked line is one violation the guard must report.
PLANTED = '''
import importlib
import composer.models.huggingface as hf_module
from composer.core import Algorithm
from streaming import StreamingDataset
from streaming.base.shared.prefix import _get_path  # VIOLATION _get_path

from irdro_sampler.integrations.streaming import WeightedStreamingDataset


def helper(ds, stream, x, y, k, barrier):
    prefix = ds._shm_prefix_int  # VIOLATION _shm_prefix_int
    mixing = getattr(stream, "_" + k)  # VIOLATION '_' + k
    setattr(x, "_lock", y)  # VIOLATION _lock
    ds._shared_barrier.lock = y  # VIOLATION _shared_barrier
    x._next_epoch = 3  # VIOLATION _next_epoch
    del x._iterator  # VIOLATION _iterator
    if hasattr(barrier, f"_{k}"):  # VIOLATION f'_{k}'
        pass
    name = "_repeat_" + k
    getattr(stream, name)  # VIOLATION name
    for attr in ("_proportion", "remote"):
        getattr(stream, attr)  # VIOLATION _proportion
    hf_module._is_registered_causal_lm = lambda model: True  # VIOLATION _is_registered_causal_lm
    importlib.import_module("composer.models.huggingface")._is_registered_causal_lm  # VIOLATION _is_registered_causal_lm
    return prefix, mixing


class Planner(StreamingDataset):
    def __init__(self):
        super().__init__()
        self._hdr = None  # ours: defined here, no streaming class defines it

    def _get_work(self, epoch, sample_in_epoch):  # VIOLATION _get_work
        self._shared_barrier(2)  # VIOLATION _shared_barrier
        getattr(self, "_unique_worker_world")  # VIOLATION _unique_worker_world
        super()._resume(None, 0)  # VIOLATION _resume
        return self._hdr, self._inherited_from_somewhere  # VIOLATION _inherited_from_somewhere


class OurSubclass(WeightedStreamingDataset):
    def peek(self):
        return self._unique_worker_world  # VIOLATION _unique_worker_world


class MyAlgorithm(Algorithm):
    def __init__(self):
        self._seen = 0

    def apply(self, event, state, logger):
        self._seen += 1
        return self._not_ours  # VIOLATION _not_ours
'''


def planted_lines() -> dict[int, str]:
    return {
        i: line.split("# VIOLATION ")[1].strip()
        for i, line in enumerate(PLANTED.splitlines(), start=1)
        if "# VIOLATION " in line
    }


def test_the_guard_reports_every_planted_violation_and_nothing_else():
    found = check_source(PLANTED, "irdro_sampler.planted")
    by_line: dict[int, set[str]] = {}
    for v in found:
        by_line.setdefault(v.line, set()).add(v.name)
    expected = planted_lines()
    assert len(expected) == 19
    missed = {line: name for line, name in expected.items() if name not in by_line.get(line, set())}
    assert not missed, f"the guard misses: {missed}"
    extra = [str(v) for v in found if v.line not in expected]
    assert not extra, f"flagged although fine: {extra}"


@pytest.mark.parametrize(
    "line",
    [
        "prefix = ds._shm_prefix_int",
        "value = getattr(stream, '_' + k)",
        "setattr(x, '_lock', y)",
    ],
)
def test_each_planted_access_alone_fails_the_guard(line):
    """The brief's three examples, one module each: each alone is enough to fail."""
    source = f"def f(ds, stream, x, y, k):\n    {line}\n"
    assert len(check_source(source, "irdro_sampler.planted")) == 1


OURS = '''
import importlib
import signal

from streaming import StreamingDataset

from irdro_sampler._validation import state_int


class Dataset(StreamingDataset):
    def __init__(self):
        super().__init__()
        self._round_state = state_int

    def read(self):
        return self._round_state, self.num_samples, super().state_dict(0, True)


class Plain:
    def __init__(self):
        self._cache = {}

    def get(self, name):
        return getattr(self, name), getattr(self, "_" + name), self._cache


def resolve(path):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def handlers():
    names = [n for n in ("SIGTERM", "SIGINT") if hasattr(signal, n)]
    return {n: getattr(signal, n) for n in names}


def options(obj, table):
    return {k: getattr(obj, k) for k in table}
'''


def test_the_guard_allows_our_own_private_names():
    assert [str(v) for v in check_source(OURS, "irdro_sampler.ours")] == []


def test_the_scan_sees_the_installed_private_names():
    """The static scan of the installed packages agrees with the classes at run time and knows every
    private name the compat modules use."""
    from streaming import Stream, StreamingDataset

    from irdro_sampler.integrations import _streaming_compat as compat

    names = foreign_names()
    for cls in (StreamingDataset, Stream):
        scanned = set().union(
            *(names.per_class.get(f"{c.__module__}.{c.__qualname__}", set()) for c in cls.__mro__)
        )
        # Without the attributes Python's class machinery adds to every ABC/Protocol subclass.
        at_run_time = {n for n in dir(cls) if is_private(n)} - {"_abc_impl", "_is_protocol"}
        assert at_run_time <= scanned, sorted(at_run_time - scanned)
    assert set(compat.PRIVATE_ATTRIBUTES) <= names.per_class["streaming.base.dataset.StreamingDataset"]
    assert set(compat.STREAM_PRIVATE_ATTRIBUTES) <= names.per_class["streaming.base.stream.Stream"]
    assert "_is_registered_causal_lm" in names.per_module["composer.models.huggingface"]


def _defined_in(obj: object) -> set[str]:
    """Names a checked object's source defines: its own name, the ``self`` attributes it assigns and,
    for a class, its body's names."""
    node = ast.parse(textwrap.dedent(inspect.getsource(obj))).body[0]
    names = {getattr(obj, "__name__", "")} | self_attributes(node)
    if isinstance(node, ast.ClassDef):
        names |= class_defined_names(node)
    return names


@pytest.mark.parametrize("compat_path", COMPAT_MODULES)
def test_the_pinned_sources_cover_every_private_name_a_compat_module_uses(compat_path):
    """Each private name a compat module uses is defined in a source its CHECKED_SOURCES hash pins, so a
    release that moves or renames it fails test_streaming_compat / test_composer_compat."""
    path = PACKAGE / compat_path
    module = importlib.import_module(module_name(path))
    used = {v.name for v in check_source(path.read_text(encoding="utf-8"), module_name(path))}
    assert used, "the checker sees nothing in a compat module: it is broken"
    pinned = set().union(*(_defined_in(obj) for obj in module._checked_objects().values()))
    assert used <= pinned, f"{compat_path} uses {sorted(used - pinned)} outside its CHECKED_SOURCES"
