"""Static analysis of a notebook's code: which tasks' answers use minimoe's own implementation.

The code cells are read in order, IPython syntax first turned into Python. For every top-level
name the scan keeps what its bindings refer to: an import, or `name = a.b`, binds it to a dotted
path; a def, a class or another assignment to the names and dotted paths its code uses (followed
in turn). A binding inside if / for / while / try / with adds to the name's earlier bindings
instead of replacing them, and so do `name.attr = ...`, `name[...] = ...`, `name.method(...)` and
a function's `global name`. Two kinds of finding:

- At a task's check cell, the scan follows the learner's function name through the bindings as
  they stand then. Reaching one of the task's implementations (`implementations.IMPLEMENTATIONS`)
  is a finding for the task, and so is reaching one of minimoe's private names (`_...`, such as
  minimoe.checks' internals) from the student's own code.
- In the student's own code (every code cell that is not a copy of a lesson cell of the
  reference), what the scan cannot follow, or what changes minimoe, is a finding for every task
  checked after it: indirect access (INDIRECT: exec, eval, compile, __import__, importlib,
  getattr / setattr / delattr with a computed name, globals, vars, sys.modules, pickle, gc's and
  inspect's object finders, types.FunctionType, get_ipython() other than for magics, ...),
  attributes in DUNDERS (__code__, __dict__, __file__, ...), assignments to attributes or items
  of minimoe objects, and magics other than QUIET_MAGICS and PYTHON_MAGICS (whose Python is read).
"""

import ast
import re
from dataclasses import dataclass, field

from IPython.core.inputtransformer2 import TransformerManager

from minimoe.grading.implementations import objects_along

BUILTIN = "<builtin>"  # the path of a name that no cell binds: a builtin, or undefined
EXPRESSION = "<expression>"  # the root of an attribute chain on a call or item, as in f().__code__

INDIRECT = (
    *(f"{BUILTIN}.{name}" for name in ("exec", "eval", "compile", "__import__", "globals", "vars", "getattr",
                                        "setattr", "delattr", "get_ipython", "__builtins__", "breakpoint")),
    "builtins", "importlib", "runpy", "pickle", "marshal", "copyreg", "dill", "cloudpickle", "ctypes", "pkgutil",
    "site", "code", "codeop", "ipykernel", "IPython.get_ipython", "IPython.core",
    "sys.modules", "sys.meta_path", "sys.path_hooks", "sys.path_importer_cache", "sys._getframe", "sys.settrace",
    "sys.setprofile", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    *(f"inspect.{name}" for name in ("getsource", "getsourcelines", "getsourcefile", "getfile", "getmembers",
                                      "getmodule", "getclosurevars", "getattr_static", "unwrap", "currentframe",
                                      "stack", "trace", "getouterframes", "getinnerframes")),
    "types.FunctionType", "types.LambdaType", "types.CodeType", "types.ModuleType", "operator.attrgetter",
    "operator.methodcaller",
)
DUNDERS = frozenset({
    "__code__", "__globals__", "__closure__", "__dict__", "__builtins__", "__file__", "__path__", "__spec__",
    "__loader__", "__cached__", "__subclasses__", "__wrapped__", "__func__", "__self__", "__getattribute__",
    "__mro__", "__bases__", "__base__", "__import__", "__reduce__", "__reduce_ex__", "__defaults__",
    "__kwdefaults__",
})
PYTHON_MAGICS = frozenset({"time", "timeit", "prun", "capture"})  # their Python is scanned like a cell's
QUIET_MAGICS = frozenset({"matplotlib", "pip", "env", "pwd", "who", "whos", "precision", "config", "load_ext",
                          "autoreload", "html", "markdown", "latex", "javascript", "js", "svg"})
MAGIC_CALLS = frozenset({"run_line_magic", "run_cell_magic"})
SHELL_CALLS = frozenset({"system", "getoutput"})  # what `!command` becomes
MAGIC_OPTIONS = re.compile(r"^(\s*-\w+(\s+-?\d+(\.\d*)?)?)*")  # %timeit -n 10 -r 3 ...

_transformer = TransformerManager()


@dataclass(frozen=True)
class Cell:
    """A code cell as the scan reads it: its source, whether it is the course's (a lesson or check
    cell of the reference, whose indirect access is not the student's) and the task it checks."""
    source: str
    trusted: bool
    checks: str | None = None


@dataclass(frozen=True)
class _Ref:
    root: str
    attrs: tuple[str, ...]
    where: str
    trusted: bool


@dataclass(frozen=True)
class _Path:
    path: str  # a dotted path that a name is bound to, as by an import
    where: str
    trusted: bool


@dataclass
class _Binding:
    paths: list[_Path] = field(default_factory=list)
    refs: list[_Ref] = field(default_factory=list)  # what the code bound to the name uses


def _chain(node: ast.AST) -> tuple[ast.AST, tuple[str, ...]]:
    """(base, attributes) of a.b.c: (Name a, ("b", "c"))."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return node, tuple(reversed(attrs))


def _constant_attr_call(node: ast.Call) -> bool:
    """getattr / hasattr / setattr / delattr with a constant string name: an attribute access."""
    return (isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str))


def _magic(node: ast.AST) -> tuple[str, str, tuple[str, ...]] | None:
    """(call, magic name, string arguments) for the get_ipython().run_line_magic(...) /
    run_cell_magic(...) / system(...) calls that IPython makes of magics and shell commands."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in MAGIC_CALLS | SHELL_CALLS and isinstance(node.func.value, ast.Call)
            and isinstance(node.func.value.func, ast.Name) and node.func.value.func.id == "get_ipython"):
        return None
    args = tuple(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return node.func.attr, (args[0] if args else ""), args[1:]


class _RefCollector(ast.NodeVisitor):
    """Every maximal attribute chain (and name) in a piece of code, as _Refs."""

    def __init__(self, where, trusted: bool):
        self.where, self.trusted, self.refs = where, trusted, []

    def _add(self, root: str, attrs: tuple[str, ...], node: ast.AST) -> None:
        self.refs.append(_Ref(root, attrs, self.where(node), self.trusted))

    def _visit_chain(self, node: ast.AST, extra: tuple[str, ...] = ()) -> None:
        base, attrs = _chain(node)
        if isinstance(base, ast.Name):
            self._add(base.id, attrs + extra, node)
        else:
            self.visit(base)
            if attrs + extra:
                self._add(EXPRESSION, attrs + extra, node)

    def visit_Name(self, node: ast.Name) -> None:
        self._add(node.id, (), node)

    def visit_arg(self, node: ast.arg) -> None:
        """A parameter: its annotation names a type, which runs nothing."""

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        for name, value in ast.iter_fields(node):
            if name != "returns":
                for child in value if isinstance(value, list) else [value]:
                    if isinstance(child, ast.AST):
                        self.visit(child)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.visit(node.target)
        if node.value is not None:
            self.visit(node.value)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._visit_chain(node)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "issubclass") and node.args:
            self.visit(node.args[0])  # the classes it tests against run nothing
            return
        if _magic(node) is not None:  # read by _Scan._statement
            for arg in node.args[1:] + [k.value for k in node.keywords]:
                self.visit(arg)
            return
        if _constant_attr_call(node):
            self._visit_chain(node.args[0], (node.args[1].value,))
            for arg in node.args[2:] + [k.value for k in node.keywords]:
                self.visit(arg)
            return
        self.generic_visit(node)


class _Scan:
    """The bindings of the cells read so far and the findings (see the module docstring)."""

    def __init__(self, learners: dict[str, str], implementations: dict[str, list]):
        self.learners, self.implementations = learners, implementations
        self.bindings: dict[str, _Binding] = {}
        self.pending: list[str] = []  # findings for every task checked from now on
        self.findings: dict[str, list[str]] = {task: [] for task in learners}
        self._object_cache: dict[str, list] = {}

    # ---- reading cells --------------------------------------------------------------------------

    def cell(self, number: int, cell: Cell) -> None:
        if cell.checks in self.findings:
            self._check(cell.checks)
        try:
            tree = ast.parse(_transformer.transform_cell(cell.source))
        except (SyntaxError, ValueError):
            return  # a cell that does not parse runs nothing
        for stmt in tree.body:
            self._statement(stmt, number, cell.trusted, conditional=False)

    def _refs(self, node: ast.AST, number: int, trusted: bool) -> list[_Ref]:
        collector = _RefCollector(lambda n: f"code cell {number}, line {getattr(n, 'lineno', '?')}", trusted)
        collector.visit(node)
        return collector.refs

    def _bind(self, name: str, conditional: bool, paths=(), refs=()) -> None:
        binding = self.bindings.get(name) if conditional else None
        if binding is None:
            binding = self.bindings[name] = _Binding()
        binding.paths += paths
        binding.refs += refs

    def _statement(self, stmt: ast.stmt, number: int, trusted: bool, conditional: bool) -> None:
        refs = self._refs(stmt, number, trusted)
        if not trusted:
            self._indirect(refs)
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            self._import(stmt, number, trusted, conditional)
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self._bind(stmt.name, conditional, refs=refs)
            for node in ast.walk(stmt):
                for name in node.names if isinstance(node, ast.Global) else ():
                    self._bind(name, True, refs=refs)
        elif isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            value_refs = self._refs(stmt.value, number, trusted) if stmt.value is not None else []
            for target in targets:
                self._assign(target, stmt.value, value_refs, number, trusted,
                             conditional or isinstance(stmt, ast.AugAssign))
        elif isinstance(stmt, ast.Delete):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    self.bindings.pop(target.id, None)
                elif not trusted:
                    self._changes_minimoe(target, number)
        elif isinstance(stmt, ast.Expr):
            self._expression(stmt.value, refs, number, trusted)
        else:  # if / for / while / try / with / match: their bodies bind conditionally
            self._compound(stmt, refs, number, trusted)

    def _import(self, stmt, number: int, trusted: bool, conditional: bool) -> None:
        where = f"code cell {number}, line {stmt.lineno}"
        if isinstance(stmt, ast.ImportFrom) and stmt.level:
            return  # a relative import names no module of the course
        for alias in stmt.names:
            if isinstance(stmt, ast.Import):
                full = alias.name
                name, path = (alias.asname, full) if alias.asname else (full.split(".")[0], full.split(".")[0])
                self._bind(name, conditional, paths=[_Path(path, where, trusted)])
            elif alias.name == "*":
                full = stmt.module
                for name in self._public_names(full):
                    self._bind(name, conditional, paths=[_Path(f"{full}.{name}", where, trusted)])
            else:
                full = f"{stmt.module}.{alias.name}"
                self._bind(alias.asname or alias.name, conditional, paths=[_Path(full, where, trusted)])
            if not trusted and self._indirect_path(full):
                self._pend(f"may use minimoe's implementation of the task: it imports {full}, which the grader "
                           f"cannot follow ({where})")

    def _public_names(self, module_path: str) -> list[str]:
        """What `from module_path import *` binds, for a minimoe module (other modules bind
        nothing that leads into minimoe)."""
        found = self._objects(module_path)
        if len(found) != module_path.count(".") + 1:
            return []
        module = found[-1]
        return list(getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")])

    def _assign(self, target, value, value_refs, number: int, trusted: bool, conditional: bool) -> None:
        if isinstance(target, ast.Name):
            paths = []
            base, attrs = _chain(value) if value is not None else (None, ())
            if isinstance(base, ast.Name) and base.id in self.bindings:  # an alias: name = a.b
                where = f"code cell {number}, line {target.lineno}"
                paths = [_Path(".".join((p.path, *attrs)), where, trusted and p.trusted)
                         for p in self.bindings[base.id].paths]
            self._bind(target.id, conditional, paths=paths, refs=value_refs)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for element in target.elts:
                self._assign(element, None, value_refs, number, trusted, conditional)
        elif isinstance(target, ast.Starred):
            self._assign(target.value, None, value_refs, number, trusted, conditional)
        else:  # name.attr = ... or name[...] = ...: a change to what name is bound to
            base, _ = _chain(target.value if isinstance(target, ast.Subscript) else target)
            if isinstance(base, ast.Name):
                self._bind(base.id, True, refs=value_refs)
            if not trusted:
                self._changes_minimoe(target, number)

    def _expression(self, value: ast.expr, refs: list[_Ref], number: int, trusted: bool) -> None:
        magic = _magic(value)
        if magic is not None:
            self._run_magic(*magic, number, trusted, value.lineno)
            return
        if isinstance(value, ast.Call):
            if _constant_attr_call(value) and value.func.id in ("setattr", "delattr"):
                target = ast.Attribute(value=value.args[0], attr=value.args[1].value, lineno=value.lineno)
                if not trusted:
                    self._changes_minimoe(target, number)
            base, attrs = _chain(value.args[0] if _constant_attr_call(value) else value.func)
            if isinstance(base, ast.Name) and (attrs or _constant_attr_call(value)):  # name.method(...)
                self._bind(base.id, True, refs=refs)

    def _compound(self, stmt: ast.stmt, refs: list[_Ref], number: int, trusted: bool) -> None:
        for target in [getattr(stmt, "target", None)] + [item.optional_vars for item in getattr(stmt, "items", [])]:
            if target is not None:
                self._assign(target, None, refs, number, trusted, conditional=True)
        bodies = [getattr(stmt, name, []) for name in ("body", "orelse", "finalbody")]
        bodies += [handler.body for handler in getattr(stmt, "handlers", [])]
        bodies += [case.body for case in getattr(stmt, "cases", [])]
        for body in bodies:
            for inner in body:
                self._statement(inner, number, trusted, conditional=True)

    def _run_magic(self, call: str, name: str, args: tuple[str, ...], number: int, trusted: bool, line: int) -> None:
        if call in SHELL_CALLS or name in QUIET_MAGICS or trusted and name not in PYTHON_MAGICS:
            return
        where = f"code cell {number}, line {line}"
        if name in PYTHON_MAGICS:
            code = args[-1] if call == "run_cell_magic" and args else MAGIC_OPTIONS.sub("", args[0] if args else "")
            try:
                body = ast.parse(_transformer.transform_cell(code)).body
            except (SyntaxError, ValueError):
                body = None
            if body is not None:
                for stmt in body:
                    self._statement(stmt, number, trusted, conditional=False)
                return
        self._pend(f"may use minimoe's implementation of the task: it runs %{name}, whose code the grader "
                   f"cannot read ({where})")

    # ---- findings -----------------------------------------------------------------------------

    def _pend(self, finding: str) -> None:
        if finding not in self.pending:
            self.pending.append(finding)

    def _paths_of(self, ref: _Ref) -> list[_Path]:
        """The dotted paths a ref names directly (through what its root is bound to), or
        BUILTIN.name for a name no cell binds."""
        if ref.root == EXPRESSION:
            return []
        binding = self.bindings.get(ref.root)
        if binding is None:
            return [_Path(".".join((BUILTIN, ref.root, *ref.attrs)), ref.where, ref.trusted)]
        return [_Path(".".join((p.path, *ref.attrs)), ref.where or p.where, ref.trusted and p.trusted)
                for p in binding.paths]

    @staticmethod
    def _indirect_path(path: str) -> bool:
        return any(path == p or path.startswith(p + ".") for p in INDIRECT)

    def _indirect(self, refs: list[_Ref]) -> None:
        for ref in refs:
            dunders = sorted(DUNDERS.intersection(ref.attrs))
            paths = [p.path for p in self._paths_of(ref) if self._indirect_path(p.path)]
            if dunders or paths:
                what = f".{dunders[0]}" if dunders else paths[0].removeprefix(BUILTIN + ".")
                self._pend(f"may use minimoe's implementation of the task: it uses {what}, which the grader "
                           f"cannot follow ({ref.where})")

    def _changes_minimoe(self, target: ast.AST, number: int) -> None:
        base, attrs = _chain(target.value if isinstance(target, ast.Subscript) else target)
        if isinstance(base, ast.Name):
            for p in self._paths_of(_Ref(base.id, attrs, "", False)):
                if p.path.split(".")[0] == "minimoe":
                    self._pend(f"changes minimoe: it assigns to {p.path} (code cell {number}, line {target.lineno})")

    def _objects(self, path: str) -> list:
        if path not in self._object_cache:
            self._object_cache[path] = objects_along(path)
        return self._object_cache[path]

    def _check(self, task: str) -> None:
        """Findings for `task` at its check cell: the pending ones, and where the learner's name leads."""
        found = self.findings[task]
        found += [f for f in self.pending if f not in found]
        forbidden = self.implementations[task]
        stack, seen = [_Ref(self.learners[task], (), "", True)], set()
        while stack:
            ref = stack.pop()
            binding = self.bindings.get(ref.root)
            if binding is None:
                continue
            for p in self._paths_of(ref):
                objects = self._objects(p.path)
                if any(obj is f for obj in objects for f in forbidden):
                    finding = f"uses minimoe's implementation of the task: {p.path}"
                elif not p.trusted and any(part.startswith("_") and not part.endswith("__")
                                           for part in p.path.split(".")[1:len(objects)]):
                    finding = f"uses minimoe's internals: {p.path}"
                else:
                    continue
                if not any(f.startswith(finding + " (") for f in found):  # once per path
                    found.append(f"{finding} ({p.where})")
            if ref.root not in seen:
                seen.add(ref.root)
                stack.extend(binding.refs)


def scan(cells: list[Cell], learners: dict[str, str], implementations: dict[str, list]) -> dict[str, list[str]]:
    """Findings per task (see the module docstring) for a notebook's code cells in order;
    learners: task -> the learner's function name; implementations: task -> minimoe objects."""
    state = _Scan(learners, implementations)
    for number, cell in enumerate(cells, start=1):
        state.cell(number, cell)
    return state.findings
