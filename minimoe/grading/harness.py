"""The grader's code inside the student's kernel, and the format of what it sends back.

`minimoe.grade` sends this file's source to the kernel before any student cell runs, as a module
of its own (`__minimoe_grader__` in the notebook's namespace), and before each locked check cell
calls `run_task` there: it looks up the learner's function by name, wraps it as the task's check
does, calls it on the inputs the grader generated (a pickle the grader wrote) while minimoe's
implementations of the task are guarded, and writes the outputs as data.

A result is one .npz file read with allow_pickle=False: entry "tree" is JSON
({"outputs": [...], "error": ..., "called": [...]}) whose values are JSON scalars or tagged lists
["list", items], ["dict", [[key, value], ...]], ["array", entry] and ["tensor", entry] naming
the other entries. Nothing the kernel writes can run code in the grader's process. Only
`read_result` runs there.
"""

import importlib
import json
import os
import pickle
import types

import numpy as np

GUARD_NAME = "__minimoe_guard__"  # put in a guarded function's module globals while the learner runs
MAX_RESULT_BYTES = 256 * 2**20
SCALARS = (type(None), bool, int, float, str)


class ImplementationUsed(RuntimeError):
    """Raised by a guarded implementation of minimoe called while the learner's function runs."""


# ---- outputs as data ------------------------------------------------------------------------------

def encode(value, arrays: dict[str, np.ndarray]):
    """A JSON-able tree for value (numbers, strings, None, arrays, tensors, and lists, tuples and
    str-keyed dicts of them); arrays go into `arrays`. TypeError for anything else."""
    if isinstance(value, SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return ["list", [encode(v, arrays) for v in value]]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("a dict whose keys are not all strings")
        return ["dict", [[key, encode(v, arrays)] for key, v in value.items()]]
    tag = "array"
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        tag, value = "tensor", value.detach().cpu()
        if not value.dtype.is_complex and value.dtype.itemsize < 4 and value.dtype.is_floating_point:
            value = value.float()  # half precision goes as float32: bfloat16 and float8 have no NumPy dtype
        value = value.numpy()
    array = np.asarray(value)
    if array.dtype.hasobject:
        raise TypeError(f"a {type(value).__name__}, which is not numbers")
    name = f"a{len(arrays)}"
    arrays[name] = array
    return [tag, name]


def decode(node, arrays: dict[str, np.ndarray]):
    """The value that `encode` turned into node (tensors come back as torch tensors); ValueError
    for anything encode does not write."""
    if isinstance(node, SCALARS):
        return node
    if isinstance(node, list) and len(node) == 2 and isinstance(node[1], list) and node[0] in ("list", "dict"):
        if node[0] == "list":
            return [decode(v, arrays) for v in node[1]]
        if all(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) for pair in node[1]):
            return {key: decode(v, arrays) for key, v in node[1]}
    if isinstance(node, list) and len(node) == 2 and node[0] in ("array", "tensor") and node[1] in arrays:
        if node[0] == "array":
            return arrays[node[1]]
        import torch
        return torch.from_numpy(arrays[node[1]].copy())
    raise ValueError(f"malformed result node {str(node)[:80]}")


def write_result(path: str, outputs: list, error: str | None, called: list[str], arrays: dict) -> None:
    """Write a result file: outputs already encoded, their arrays, the error and the guarded calls."""
    with open(path, "wb") as f:
        np.savez(f, tree=np.array(json.dumps({"outputs": outputs, "error": error, "called": called})), **arrays)


def read_result(path) -> dict:
    """{"outputs": [values], "error": str or None, "called": [names]} from a result file that the
    kernel wrote (grader side). ValueError if it is missing, too large or malformed."""
    if not os.path.isfile(path) or os.path.islink(path):
        raise ValueError("no result came back")
    if os.path.getsize(path) > MAX_RESULT_BYTES:
        raise ValueError(f"the result is larger than {MAX_RESULT_BYTES} bytes")
    try:
        with np.load(path, allow_pickle=False) as npz:
            tree = json.loads(str(npz["tree"][()]))
            arrays = {name: npz[name] for name in npz.files if name != "tree"}
    except Exception as error:  # noqa: BLE001  (whatever the kernel wrote, it is not a result)
        raise ValueError(f"unreadable result ({type(error).__name__}: {error})") from None
    if not (isinstance(tree, dict) and isinstance(tree.get("outputs"), list) and isinstance(tree.get("called"), list)
            and isinstance(tree.get("error"), (str, type(None)))):
        raise ValueError("malformed result")
    return {"outputs": [decode(node, arrays) for node in tree["outputs"]], "error": tree["error"],
            "called": [str(name) for name in tree["called"]]}


# ---- the guard --------------------------------------------------------------------------------

def _resolve(path: str):
    """The object a qualified name names in this kernel, or None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


def _functions(obj) -> list[types.FunctionType]:
    """The Python functions that stand for obj: itself (and what it wraps), or a class's methods."""
    if isinstance(obj, type):
        found = []
        for member in vars(obj).values():
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property):
                found += [f for f in (member.fget, member.fset) if isinstance(f, types.FunctionType)]
            elif isinstance(member, types.FunctionType):
                found.append(member)
        return found
    found = []
    while isinstance(obj, types.FunctionType) and obj not in found:
        found.append(obj)
        obj = getattr(obj, "__wrapped__", None)
    return found


def _stand_in_code(fn: types.FunctionType, name: str) -> types.CodeType:
    """Code for fn that calls the guard instead: `return __minimoe_guard__(name, args, kwargs)`,
    with as many free variables as fn has (a function's code can only be swapped for such)."""
    cells = [f"_c{i}" for i in range(len(fn.__code__.co_freevars))]
    source = ("def outer():\n" + "".join(f"    {c} = None\n" for c in cells)
              + "    def stand_in(*args, **kwargs):\n"
              + (f"        ({', '.join(cells)},)\n" if cells else "")
              + f"        return {GUARD_NAME}({name!r}, args, kwargs)\n    return stand_in\n")
    namespace: dict = {}
    exec(compile(source, "<minimoe guard>", "exec"), namespace)  # noqa: S102  (the grader's own code)
    return namespace["outer"]().__code__


class Guard:
    """While active, each function of minimoe's implementations of a task runs the guard instead
    of its code: the call is recorded in `called`, then raises ImplementationUsed (block=True) or
    runs the original (block=False, for warnings only)."""

    def __init__(self, paths: list[str], block: bool):
        self.block, self.called = block, []
        self._swapped: list[tuple[types.FunctionType, types.CodeType]] = []
        self._originals: dict[str, types.FunctionType] = {}
        self._globals: list[dict] = []
        for path in paths:
            for fn in _functions(_resolve(path)):
                if any(fn is swapped for swapped, _ in self._swapped):
                    continue
                original = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
                original.__kwdefaults__ = fn.__kwdefaults__
                self._originals[f"{fn.__module__}.{fn.__qualname__}"] = original
                self._swapped.append((fn, fn.__code__))
                if not any(g is fn.__globals__ for g in self._globals):
                    self._globals.append(fn.__globals__)

    def __call__(self, name: str, args: tuple, kwargs: dict):
        self.called.append(name)
        if self.block:
            raise ImplementationUsed(f"called {name}, minimoe's implementation of the task")
        return self._originals[name](*args, **kwargs)

    def __enter__(self) -> "Guard":
        for module_globals in self._globals:
            module_globals[GUARD_NAME] = self
        for fn, _ in self._swapped:
            fn.__code__ = _stand_in_code(fn, f"{fn.__module__}.{fn.__qualname__}")
        return self

    def __exit__(self, *exc) -> None:
        for fn, code in self._swapped:
            fn.__code__ = code
        for module_globals in self._globals:
            module_globals.pop(GUARD_NAME, None)


# ---- one task -----------------------------------------------------------------------------------

def run_task(user_ns: dict, task: str, name: str, check_module: str, check_name: str, implementations: list[str],
             block: bool, inputs_path: str, result_path: str) -> None:
    """Call the learner's function `name` from user_ns, wrapped as check_module.check_name wraps
    it, on each case of the pickled inputs, with `implementations` guarded (the outputs are
    encoded under the guard too); write the result."""
    outputs, arrays, error, guard = [], {}, None, None
    try:
        from minimoe.checks import CheckFailure, read_check
        if name not in user_ns:
            raise NameError(f"{name} is not defined")
        check = read_check(getattr(importlib.import_module(check_module), check_name), user_ns[name])
        if check.task != task:
            raise CheckFailure(f"{check_module}.{check_name} checks task {check.task}, not {task}")
        with open(inputs_path, "rb") as f:
            inputs = pickle.load(f)  # noqa: S301  (written by the grader)
        guard = Guard(implementations, block)
        with guard:
            for args in inputs:
                try:
                    outputs.append(encode(check.learner_fn(*args), arrays))
                except NotImplementedError:
                    raise CheckFailure(f"task {task}: not implemented yet") from None
    except (Exception, SystemExit) as failure:  # noqa: BLE001  (whatever the answer raises is its failure)
        outputs, arrays, error = [], {}, f"{type(failure).__name__}: {failure}"[:300]
    write_result(result_path, outputs, error, guard.called if guard is not None else [], arrays)
