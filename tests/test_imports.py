"""The import graph of ojbkq_core (module-level and function-local imports alike) has no cycle."""
import ast
import os

import ojbkq_core

PKG = os.path.dirname(os.path.abspath(ojbkq_core.__file__))


def _modules() -> dict[str, str]:
    """Dotted module name → file, for every module of the package."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its body."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                # `from pkg import module` needs the module (its parent package is loaded first by any import)
                targets = subs if all(t in mods for t in subs) else [base] + subs
            for t in targets:
                while t and t not in mods:           # `import a.b.c` names a, a.b and a.b.c
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("ojbkq_core"):
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_reads_relative_and_local_imports():
    g = import_graph()
    assert "ojbkq_core.errors" in g["ojbkq_core.config"]            # from .errors import InputError
    assert "ojbkq_core.registry" in g["ojbkq_core.spec"]            # a function-local import
    assert "ojbkq_core.hookspecs" in g["ojbkq_core.registry"]       # from . import hookspecs
    assert "ojbkq_core" not in g["ojbkq_core.registry"]
    assert "ojbkq_core.decoders.base" in g["ojbkq_core.calibrate"]  # from .decoders.base import Decoder


def test_ojbkq_core_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)
