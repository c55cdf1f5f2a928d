"""The drift guard's checker: uses of streaming's or Composer's private names in a module's source.

Private names of the installed ``streaming`` and ``composer`` packages are collected from their sources
(AST, no import of their optional dependencies): per class, the private names its body defines and the
``self._x`` attributes its methods assign; per module, the private names defined at top level. A
module of ours is then checked for

* attribute access ``x._name`` (read, write or delete) where ``x`` is a streaming/Composer module or
  ``_name`` is a private name of any streaming/Composer class or module;
* ``self._name``/``cls._name`` in a subclass of a streaming/Composer class: flagged when one of its
  streaming/Composer ancestors defines ``_name``, or when our own classes never define it (then it can
  only be inherited); the same for names our subclass defines in its body (an override of a private
  hook, or a collision with one);
* ``super()._name`` of such a name;
* ``getattr``/``setattr``/``hasattr``/``delattr`` with a constant private name (or a variable bound
  only to constants, one of them private) or a name built at run time (``"_" + k``, an f-string,
  ``%``, ``.format``/``.join``, directly or through a variable); not on ``self`` of our own classes, on
  imported modules other than streaming's and Composer's, or on a module from
  ``importlib.import_module`` (a user-given ``"package.module:function"`` path);
* imports of private names or private modules from streaming/Composer.

It does not see private names reached through ``vars(x)``/``x.__dict__``, reflection with a name that
arrives as data (a parameter, a loop over a dict), or ``x._name`` on an object of unknown type when no
streaming/Composer class or module defines ``_name``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

FOREIGN_PACKAGES = ("streaming", "composer")
REFLECTION_CALLS = ("getattr", "setattr", "hasattr", "delattr")


def is_private(name: str) -> bool:
    """A leading underscore, not a dunder (``_x`` and ``__x`` are private, ``__init__`` is not)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_foreign(dotted: str) -> bool:
    return dotted.split(".")[0] in FOREIGN_PACKAGES


# ---------------------------------------------------------------------- the foreign names
def _assigned_names(target: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


def _body_names(body: list[ast.stmt]) -> set[str]:
    """Names a class or module body defines: functions, classes, assignment targets."""
    names: set[str] = set()
    for st in body:
        if isinstance(st, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(st.name)
        elif isinstance(st, ast.Assign):
            for t in st.targets:
                names |= _assigned_names(t)
        elif isinstance(st, ast.AnnAssign | ast.AugAssign):
            names |= _assigned_names(st.target)
    return names


def self_attributes(cls: ast.AST) -> set[str]:
    """``self.X`` attributes assigned (or ``setattr(self, "X", ...)``) anywhere in ``cls`` (a class or function)."""
    names: set[str] = set()
    for n in ast.walk(cls):
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            if isinstance(n.value, ast.Name) and n.value.id == "self":
                names.add(n.attr)
        elif (
            isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "setattr"
            and len(n.args) >= 2 and isinstance(n.args[0], ast.Name) and n.args[0].id == "self"
            and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str)
        ):
            names.add(n.args[1].value)
    return names


def class_defined_names(cls: ast.ClassDef) -> set[str]:
    """Every name a class defines: its body and its methods' ``self`` attributes."""
    return _body_names(cls.body) | self_attributes(cls)


@dataclass(frozen=True)
class ForeignNames:
    """Private names of the installed foreign packages."""

    per_class: dict[str, frozenset[str]]  # "module.Qualname" -> private names the class defines
    per_module: dict[str, frozenset[str]]  # "module" -> private top-level names
    all_names: frozenset[str]  # the union of both


@lru_cache(maxsize=1)
def foreign_names() -> ForeignNames:
    per_class: dict[str, frozenset[str]] = {}
    per_module: dict[str, frozenset[str]] = {}
    for package in FOREIGN_PACKAGES:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            parts = (package, *path.relative_to(root).with_suffix("").parts)
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            tree = ast.parse(path.read_text(encoding="utf-8"))
            per_module[module] = frozenset(n for n in _body_names(tree.body) if is_private(n))

            # Classes at any depth of nesting, keyed like f"{cls.__module__}.{cls.__qualname__}".
            pending: list[tuple[list[ast.stmt], str]] = [(tree.body, "")]
            while pending:
                body, prefix = pending.pop()
                for st in body:
                    if isinstance(st, ast.ClassDef):
                        qual = f"{prefix}{st.name}"
                        per_class[f"{module}.{qual}"] = frozenset(n for n in class_defined_names(st) if is_private(n))
                        pending.append((st.body, qual + "."))
    all_names = frozenset().union(*per_class.values(), *per_module.values())
    return ForeignNames(per_class, per_module, all_names)


def foreign_private_of(cls: type) -> frozenset[str]:
    """Private names defined by the streaming/Composer classes in ``cls``'s MRO."""
    names = foreign_names()
    out: set[str] = set()
    for c in cls.__mro__:
        if is_foreign(c.__module__):
            out |= names.per_class.get(f"{c.__module__}.{c.__qualname__}", frozenset())
    return frozenset(out)


def own_defined_of(cls: type) -> frozenset[str]:
    """Names the non-foreign classes in ``cls``'s MRO (ours) define, read from their source."""
    out: set[str] = set()
    for c in cls.__mro__:
        if is_foreign(c.__module__) or c.__module__ == "builtins":
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(c)))
        except (OSError, TypeError):
            continue
        out |= class_defined_names(next(n for n in tree.body if isinstance(n, ast.ClassDef)))
    return frozenset(out)


# ---------------------------------------------------------------------- checking a module
@dataclass
class _ClassInfo:
    name: str
    foreign_private: frozenset[str]  # private names of its streaming/Composer ancestors
    own: frozenset[str]  # names our classes (it and its non-foreign ancestors) define
    derives_foreign: bool


@dataclass
class Violation:
    line: int
    name: str  # the private name used (or the built name's source text)
    what: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.what}"


@dataclass
class _Checker(ast.NodeVisitor):
    imports: dict[str, str]  # local name -> dotted target
    local_classes: dict[str, _ClassInfo] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    class_stack: list[_ClassInfo | None] = field(default_factory=list)
    func_stack: list[ast.AST] = field(default_factory=list)

    def flag(self, node: ast.AST, name: str, what: str) -> None:
        self.violations.append(Violation(getattr(node, "lineno", 0), name, what))

    # -- helpers
    def dotted(self, node: ast.AST) -> str | None:
        """The dotted import target an expression names (``alias.attr...``), if it starts at an import."""
        if isinstance(node, ast.Name):
            return self.imports.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def resolve_base(self, node: ast.AST) -> _ClassInfo | None:
        if isinstance(node, ast.Name) and node.id in self.local_classes:
            return self.local_classes[node.id]
        target = self.dotted(node)
        if not target:
            return None
        module, _, name = target.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            obj = None
        if isinstance(obj, type):
            derives = any(is_foreign(c.__module__) for c in obj.__mro__)
            return _ClassInfo(obj.__name__, foreign_private_of(obj), own_defined_of(obj), derives)
        if is_foreign(target):  # a foreign class we cannot import here: every foreign private name
            return _ClassInfo(name, foreign_names().all_names, frozenset(), True)
        return None

    def current_class(self) -> _ClassInfo | None:
        """The class whose method (or a function nested in it) we are in: ``self`` is its instance."""
        if not self.func_stack or not self.class_stack:
            return None
        return self.class_stack[-1]

    def check_self(self, node: ast.AST, name: str, how: str) -> None:
        info = self.current_class()
        if info is None or not info.derives_foreign:
            return
        if name in info.foreign_private:
            self.flag(node, name, f"{how}: `{name}` is a private name of a streaming/Composer base class of {info.name}")
        elif name not in info.own:
            self.flag(node, name, f"{how}: `{name}` is not defined by our class {info.name} (so it is inherited)")

    def check_other(self, node: ast.AST, obj: ast.AST, name: str, how: str) -> None:
        target = self.dotted(obj)
        if target and is_foreign(target):
            self.flag(node, name, f"{how}: private `{name}` of streaming/Composer's `{target}`")
        elif name in foreign_names().all_names:
            self.flag(node, name, f"{how}: `{name}` is a private name of a streaming/Composer class or module")

    # -- visitors
    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        bases = [self.resolve_base(b) for b in node.bases]
        known = [b for b in bases if b is not None]
        foreign = frozenset().union(*(b.foreign_private for b in known))
        own = class_defined_names(node) | frozenset().union(*(b.own for b in known))
        info = _ClassInfo(node.name, foreign, frozenset(own), any(b.derives_foreign for b in known))
        self.local_classes[node.name] = info
        if info.derives_foreign:
            for st in node.body:
                for name in sorted(_body_names([st]) & info.foreign_private):
                    self.flag(st, name, f"class {node.name} defines `{name}`, a private name of its streaming/Composer base")
        saved_funcs, self.func_stack = self.func_stack, []
        self.class_stack.append(info)
        self.generic_visit(node)
        self.class_stack.pop()
        self.func_stack = saved_funcs

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.func_stack.append(node)
        self.generic_visit(node)
        self.func_stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Attribute(self, node: ast.Attribute) -> None:
        name = node.attr
        if is_private(name):
            how = {ast.Store: "write", ast.Del: "delete"}.get(type(node.ctx), "read")
            obj = node.value
            if isinstance(obj, ast.Name) and obj.id in ("self", "cls") and self.current_class() is not None:
                self.check_self(node, name, f"{how} {obj.id}.{name}")
            elif isinstance(obj, ast.Call) and isinstance(obj.func, ast.Name) and obj.func.id == "super":
                info = self.current_class()
                if (info and name in info.foreign_private) or name in foreign_names().all_names:
                    self.flag(node, name, f"{how} super().{name}: a private name of a streaming/Composer class")
            else:
                self.check_other(node, obj, name, f"{how} .{name}")
        self.generic_visit(node)

    def bindings(self, name: str) -> list[tuple[ast.AST, bool]]:
        """What a variable of the enclosing function is bound to: (value, True) for an assignment,
        (iterable, False) for a ``for``/comprehension target."""
        if not self.func_stack:
            return []
        out: list[tuple[ast.AST, bool]] = []
        for n in ast.walk(self.func_stack[-1]):
            if isinstance(n, ast.Assign):
                out += [(n.value, True) for t in n.targets if isinstance(t, ast.Name) and t.id == name]
            elif isinstance(n, ast.For | ast.comprehension):
                if isinstance(n.target, ast.Name) and n.target.id == name:
                    out.append((n.iter, False))
        return out

    def constant_names(self, expr: ast.AST) -> list[str] | None:
        """The strings a name argument can be: a constant, or a variable bound only to constants in the
        enclosing function (assignment, ``for``/comprehension over a literal tuple/list/set)."""
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return [expr.value]
        if not isinstance(expr, ast.Name):
            return None
        bound = self.bindings(expr.id)
        values: list[str] = []
        for value, assigned in bound:
            items = [value] if assigned else getattr(value, "elts", [value])
            if assigned or isinstance(value, ast.Tuple | ast.List | ast.Set):
                if not all(isinstance(i, ast.Constant) and isinstance(i.value, str) for i in items):
                    return None
                values += [i.value for i in items]
            else:
                return None
        return values if bound else None

    def is_built(self, expr: ast.AST) -> bool:
        """Whether a name argument is a string built at run time (``"_" + k``, an f-string, ``%``,
        ``.format``/``.join``, ``str(...)``), directly or through a variable assigned one."""
        if isinstance(expr, ast.JoinedStr | ast.BinOp):
            return True
        if isinstance(expr, ast.Call):
            f = expr.func
            return (isinstance(f, ast.Attribute) and f.attr in ("format", "join")) or (
                isinstance(f, ast.Name) and f.id in ("str", "format")
            )
        if isinstance(expr, ast.Name):
            return any(assigned and self.is_built(value) for value, assigned in self.bindings(expr.id))
        return False

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in REFLECTION_CALLS and len(node.args) >= 2:
            self.check_reflection(node, func.id, node.args[0], node.args[1])
        self.generic_visit(node)

    def check_reflection(self, node: ast.Call, fn: str, obj: ast.AST, name_arg: ast.AST) -> None:
        on_self = isinstance(obj, ast.Name) and obj.id in ("self", "cls") and self.current_class() is not None
        info = self.current_class() if on_self else None
        if on_self and info is not None and not info.derives_foreign:
            return  # our own object: its private names are ours
        target = self.dotted(obj)
        if target and not is_foreign(target):
            return  # an imported module or object that is not streaming's or Composer's
        if isinstance(obj, ast.Call) and (self.dotted(obj.func) or "").endswith("import_module"):
            return  # a module from a user-given "package.module:function" path: the user's choice
        names = self.constant_names(name_arg)
        if names is None:
            if self.is_built(name_arg):
                self.flag(node, ast.unparse(name_arg), f"{fn} with a name built at run time: {ast.unparse(name_arg)}")
            return  # a variable holding data (a parameter, a loop over a dict): not judged here
        for name in filter(is_private, names):
            if on_self:
                self.check_self(node, name, f"{fn}({ast.unparse(obj)}, {name!r})")
            else:
                self.flag(node, name, f"{fn} of the private name {name!r}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if is_foreign(module):
            if any(is_private(p) for p in module.split(".")):
                self.flag(node, module, f"import from a private streaming/Composer module {module}")
            for alias in node.names:
                if is_private(alias.name):
                    self.flag(node, alias.name, f"import of the private {module}.{alias.name}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if is_foreign(alias.name) and any(is_private(p) for p in alias.name.split(".")):
                self.flag(node, alias.name, f"import of the private streaming/Composer module {alias.name}")


def _import_table(tree: ast.Module, module_name: str) -> dict[str, str]:
    """Local name -> dotted target, for every import anywhere in the module (relative ones resolved)."""
    table: dict[str, str] = {}
    package = module_name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                table[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            for a in node.names:
                table[a.asname or a.name] = f"{base}.{a.name}"
    return table


def check_source(source: str, module_name: str) -> list[Violation]:
    """Every use of a streaming/Composer private name in ``source`` (the text of module ``module_name``)."""
    tree = ast.parse(source)
    checker = _Checker(_import_table(tree, module_name))
    checker.visit(tree)
    return checker.violations
